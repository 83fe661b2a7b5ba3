"""``samsegment serve``: the engine behind a versioned HTTP API (FastAPI + uvicorn).

``state`` holds models, volumes, sessions and jobs; ``jobs`` maps job requests onto the engine's
functions; ``app`` is the HTTP layer; ``serve`` starts it with the security rules (token,
loopback). FastAPI and uvicorn are imported only when a server is built (``pip install
samsegment[server]``).
"""
