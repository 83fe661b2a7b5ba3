"""Starting the server: bind rules, token, TLS, and a handle for running it in a thread.

Security defaults: bind 127.0.0.1; a token is always required unless ``no_auth`` is asked for on
a loopback address; a non-loopback bind without a token is refused. TLS with ``ssl_certfile`` and
``ssl_keyfile`` (or a reverse proxy in front of a loopback bind).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import SAMSegmentError
from .state import Limits, ServerState

TOKEN_ENV = "SAMSEGMENT_TOKEN"
DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(token: str | None = None, token_file: str | Path | None = None, no_auth: bool = False,
                  host: str = "127.0.0.1") -> str | None:
    """The token the server requires (None: no authentication).

    Order: ``token``, the first line of ``token_file``, ``$SAMSEGMENT_TOKEN``, else a new random one.
    ``no_auth`` is refused on anything but a loopback address.
    """
    if no_auth:
        if not is_loopback(host):
            raise SAMSegmentError(f"--no-auth on {host} would let anyone on the network use the server",
                                  "bind 127.0.0.1, or give --token-file")
        return None
    if token:
        return token
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise SAMSegmentError(f"Cannot read the token file {token_file}: {exc.strerror}",
                                  "give a readable file whose first line is the token") from exc
        if not text or len(text[0].strip()) < 16:
            raise SAMSegmentError(f"The token in {token_file} is missing or shorter than 16 characters",
                                  "put a long random token on its first line (e.g. python -c "
                                  "'import secrets; print(secrets.token_urlsafe(32))')")
        return text[0].strip()
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)


class ServerHandle:
    """A running server in a background thread (tests, benchmarks, the local server's launcher)."""

    def __init__(self, state: ServerState, token: str | None, host: str = "127.0.0.1", port: int = 0,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None, log_level: str = "warning") -> None:
        import uvicorn

        from .app import create_app

        self.state, self.token, self.host = state, token, host
        config = uvicorn.Config(create_app(state, token), host=host, port=port, log_level=log_level,
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.scheme = "https" if ssl_certfile else "http"
        self._thread = threading.Thread(target=self.server.run, name="samsegment-server", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerHandle":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise SAMSegmentError(f"The server did not start on {self.host}", "check that the port is free")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.state.close()

    def __enter__(self) -> "ServerHandle":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          token_file: str | Path | None = None, no_auth: bool = False, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, device: str | None = None, runtime: str | None = None,
          limits: Limits | None = None, cache_bytes: int = 2 << 30, registry: str | None = None,
          port_file: str | Path | None = None, announce=print, checkpoints: dict[str, str] | None = None,
          encode_workers: int = 1) -> None:
    """Run the server in the foreground until Ctrl-C (``samsegment serve``).

    ``port`` 0 picks a free port; ``port_file`` (if given) receives ``<port>`` once listening, for a
    launcher that started the server. The token (generated when none is given) is announced once.
    """
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise SAMSegmentError("TLS needs both --ssl-certfile and --ssl-keyfile", "give both files, or neither")
    secret = resolve_token(token, token_file, no_auth, host)
    state = ServerState(limits, device=device, runtime=runtime, cache_bytes=cache_bytes, registry=registry,
                        checkpoints=checkpoints, encode_workers=encode_workers)
    handle = ServerHandle(state, secret, host, port, ssl_certfile, ssl_keyfile, log_level="info").start()
    if port_file is not None:
        tmp = Path(str(port_file) + ".tmp")
        tmp.write_text(str(handle.port), encoding="utf-8")
        os.replace(tmp, port_file)
    generated = secret is not None and not token and token_file is None and not os.environ.get(TOKEN_ENV)
    announce(f"SAMSegment server on {handle.url} (API v1)"
             + (f"; token: {secret}" if generated else "; token required" if secret else "; no authentication"))
    try:
        while handle._thread.is_alive():
            handle._thread.join(0.5)
    except KeyboardInterrupt:
        announce("Stopping the server")
    finally:
        handle.stop()
