"""Scale-out of ``samsegment serve`` on Ray Serve: the same FastAPI app on N replicas.

Optional (``pip install samsegment[cluster]``); nothing else in SAMSegmentLib imports this module,
so the default server needs no Ray. Two ways to start it::

    samsegment serve --ray --replicas 2 --token-file token.txt          # a local Ray, or --ray-address
    RAY_ADDRESS=auto SAMSEGMENT_TOKEN=... serve run SAMSegmentLib.server.ray_serve:build_app replicas=2

The second is Ray's own CLI (an application builder; in a Serve config file: ``import_path:
SAMSegmentLib.server.ray_serve:build_app`` with ``args: {replicas: 2, token_file: ...}``; the
proxy's host and port then come from Serve's ``http_options``, 127.0.0.1:8000 unless the config
says otherwise, and a token is always required). On a cluster where Serve already runs, Serve's
existing HTTP options apply to ``--ray-address`` too.

**Replicas.** Each replica is one Ray actor holding its own ``ServerState`` (models, volumes,
sessions, jobs, embedding cache) behind ``create_app`` unchanged: the same routes, token check,
limits and errors as ``samsegment serve``. One GPU per replica when the cluster has one for each
(a share of the GPUs when it has fewer), else the CPUs split evenly (torch threads to match).
``--cache-mib`` and the limits apply to each replica. The token and bind rules are
``serve.py``'s: the HTTP proxy binds 127.0.0.1 by default, a token unless ``--no-auth`` on a
loopback address, never a non-loopback bind without one; TLS at Ray's HTTP proxy. Ray's own
ports (GCS, raylet, workers) listen on every interface whatever the HTTP address: Ray guards them
with its own token (recent Ray, e.g. 2.60: ``~/.ray/auth_token``); firewall them on a shared network.

**Routing.** Clients send ``serve_multiplexed_model_id: <volume id>`` with every request of a
session (``SAMSegmentLib.client`` does; Ray's proxy turns the header into the request's routing
key). ``VolumeAffinityRouter`` sends a key to the replica that *holds* it (a replica registers a
key through Serve's model multiplexing once a request carrying it succeeded there), else to the
key's rendezvous-hash home among the live replicas: deterministic, so the upload, the session and
the first prompt of a new volume all meet on one replica even before any registration has
reached the proxy. A key's requests queue for its replica (no spill-over to another while it is
busy); requests without a key (info, health) go to the less loaded of two random replicas.

**Failure.** Routed elsewhere, or after the replica died (Serve starts a new one), a request
finds no volume or session there: the server answers 404 "... is not on this server" / "...
does not exist on this server", the client uploads the volume again and reopens its session
there (the embeddings are recomputed; no mask changes; prompt refinement history starts
afresh). A job lives in its replica: its polls carry the volume's key, so they reach the replica
that runs it as long as that lives. A dead replica's jobs die with it and are never reported as
finished: the next poll reaches the volume's new home and gets 404 "Job ... does not exist on
this server", which the client raises as ``PropagationInterrupted`` with the slices received so
far; ``propagate(..., resume=partial)`` starts the job again and delivers only the missing slices,
identical because propagation is deterministic. A request in flight on the replica when it died
gets Ray's proxy's own HTTP 500 (plain text, no SAMSegment error body); sent again, it reaches the
volume's new home and goes the way above (a retried prompt at worst starts a fresh history).
New replicas (a replacement, or more of them) take new volumes; held ones stay where they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ray import serve
from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from ..errors import SAMSegmentError
from .serve import DEFAULT_PORT, TOKEN_ENV, is_loopback, resolve_token

log = logging.getLogger("SAMSegment.server")

APP_NAME = "samsegment"
ROUTING_HEADER = "serve_multiplexed_model_id"
# Paths whose success says nothing about what the replica holds.
_UNKEYED_PATHS = ("/v1/info", "/v1/health", "/v1/replica")
# Volume keys a replica registers with the router (LRU beyond that; a key it lost routes there
# anyway until then and is simply uploaded again).
MAX_KEYS_PER_REPLICA = 64


# ------------------------------------------------------------------------------------------ routing
def home_replica(key: str, replica_ids: list[Any]) -> Any:
    """The rendezvous-hash (highest random weight) choice of ``key`` among ``replica_ids``: the same
    on every proxy, and only the keys of a replica that leaves (or some keys, when one joins) move."""
    def weight(replica_id: Any) -> bytes:
        name = getattr(replica_id, "unique_id", str(replica_id))
        return hashlib.sha256(f"{key}|{name}".encode()).digest()

    return max(replica_ids, key=weight)


class VolumeAffinityRouter(MultiplexMixin, RequestRouter):
    """Ray Serve request router: a routing key goes to the replica that holds it, else to its
    rendezvous-hash home; no key: the less loaded of two random replicas. Runs in Ray's proxy."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # wait (with backoff) for a busy home
        if not key:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        holders = [rid for rid in getattr(self, "_multiplexed_model_id_to_replica_ids", {}).get(key, ()) if rid in by_id]
        return [[by_id[home_replica(key, holders or list(by_id))]]]


def routing_key(headers: Any) -> str:
    """The routing key of a request (its ``serve_multiplexed_model_id`` header, also accepted with
    hyphens, as some reverse proxies rewrite it), or ''."""
    for name in (ROUTING_HEADER, ROUTING_HEADER.replace("_", "-")):
        value = headers.get(name)
        if value:
            return str(value)
    return ""


# ------------------------------------------------------------------------------------------ resources
def replica_resources(replicas: int, cluster_cpus: float, cluster_gpus: float, cpus: float | None = None,
                      gpus: float | None = None) -> tuple[dict[str, float], int]:
    """(``ray_actor_options`` resources, torch threads) of one replica.

    GPUs: ``gpus`` if given, else 1 per replica when the cluster has one for each, a share when it
    has fewer, none without. CPUs: ``cpus`` if given, else 1 for a GPU replica and the cluster's
    CPUs split evenly otherwise."""
    if replicas < 1:
        raise SAMSegmentError(f"--replicas must be at least 1, got {replicas}", "give --replicas 1 or more")
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= replicas else round(cluster_gpus / replicas, 3) if cluster_gpus > 0 else 0.0
    if cpus is None:
        cpus = 1.0 if gpus > 0 else max(0.1, round(max(cluster_cpus, 1.0) / replicas, 3))
    options = {"num_cpus": float(cpus)}
    if gpus > 0:
        options["num_gpus"] = float(gpus)
    return options, max(1, int(cpus))


# ------------------------------------------------------------------------------------------ replica
@serve.ingress()
class SAMSegmentReplica:
    """One replica: a ``ServerState`` behind ``create_app``, registering the volume keys it serves."""

    def __init__(self, config: dict[str, Any]) -> None:
        import warnings

        from .state import Limits, ServerState

        warnings.filterwarnings("ignore", category=FutureWarning, module="timm")  # as the CLI does
        threads = config.get("threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.token = config.get("token")
        self.state = ServerState(Limits(**config.get("limits", {})), device=config.get("device"),
                                 runtime=config.get("runtime"), cache_bytes=int(config.get("cache_bytes", 2 << 30)),
                                 registry=config.get("registry"), checkpoints=config.get("checkpoints"))
        if config.get("preload", True):
            self.state.backend(config.get("model"))  # the replica is ready once its model is loaded

    def __serve_build_asgi_app__(self):
        from fastapi import Request

        from .app import create_app

        app = create_app(self.state, self.token)
        replica = self

        @app.get("/v1/replica")
        def which_replica() -> dict[str, Any]:
            """Which replica answered (operators, tests): its id, its Ray actor's name (in Ray's "serve"
            namespace) and the devices of its models."""
            import ray

            context = serve.get_replica_context()
            return {"replica": context.replica_id.unique_id, "actor_name": ray.get_runtime_context().get_actor_name(),
                    "pid": os.getpid(), "loaded": replica.state.loaded_devices()}

        @app.middleware("http")
        async def register_key(request: Request, call_next: Callable):
            response = await call_next(request)
            key = routing_key(request.headers)
            if key and response.status_code < 400 and request.url.path not in _UNKEYED_PATHS:
                await replica.hold(key)  # later requests with this key come here
            return response

        return app

    @serve.multiplexed(max_num_models_per_replica=MAX_KEYS_PER_REPLICA)
    async def hold(self, key: str) -> str:
        return key

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None:
            state.close()


def replica_config(token: str | None, limits: Any = None, device: str | None = None, runtime: str | None = None,
                   cache_bytes: int = 2 << 30, registry: str | None = None, model: str | None = None,
                   threads: int | None = None, preload: bool = True,
                   checkpoints: dict[str, str] | None = None) -> dict[str, Any]:
    """What each replica builds its ``ServerState`` from (plain data: it travels to the replicas)."""
    return {"token": token, "limits": dict(limits.__dict__) if limits is not None else {}, "device": device,
            "runtime": runtime, "cache_bytes": int(cache_bytes), "registry": registry, "model": model,
            "threads": threads, "preload": preload, "checkpoints": dict(checkpoints or {})}


def application(config: dict[str, Any], replicas: int, actor_options: dict[str, Any],
                max_ongoing_requests: int = 64, max_queued_requests: int = 256):
    """The bound Serve application: ``replicas`` copies of the replica behind ``VolumeAffinityRouter``.

    ``max_ongoing_requests`` per replica (its own limits answer 429/503 first);
    ``max_queued_requests`` waiting at the proxy per replica set before Serve answers 503."""
    from ray.serve.config import RequestRouterConfig

    deployment = serve.deployment(SAMSegmentReplica, name="SAMSegment")
    return deployment.options(
        num_replicas=replicas, ray_actor_options=actor_options, max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests, health_check_period_s=2.0, graceful_shutdown_timeout_s=5.0,
        request_router_config=RequestRouterConfig(request_router_class=VolumeAffinityRouter,
                                                  request_routing_stats_period_s=2.0),
    ).bind(config)


def build_app(args: dict[str, Any]):
    """Application builder for Ray's CLI (``serve run SAMSegmentLib.server.ray_serve:build_app
    replicas=2 token_file=...``) and Serve config files (``import_path`` + ``args``).

    Args (all optional): replicas (2), token_file (else ``$SAMSEGMENT_TOKEN``: a token is required
    here, as the proxy's address is the config's), device, runtime, cache_mib (1024), registry,
    model, replica_cpus, replica_gpus, max_volume_voxels, max_request_mib."""
    import ray

    from .state import Limits

    token = resolve_token(None, args.get("token_file"), False, "0.0.0.0") if (
        args.get("token_file") or os.environ.get(TOKEN_ENV)) else None
    if token is None:
        raise SAMSegmentError("A SAMSegment Ray Serve application needs a token",
                              f"give token_file=PATH, or set ${TOKEN_ENV} where Ray runs")
    replicas = int(args.get("replicas", 2))
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    options, threads = replica_resources(replicas, resources.get("CPU", os.cpu_count() or 1), resources.get("GPU", 0.0),
                                         _float(args.get("replica_cpus")), _float(args.get("replica_gpus")))
    limits = Limits(max_volume_voxels=int(args.get("max_volume_voxels", Limits.max_volume_voxels)),
                    max_request_bytes=int(float(args.get("max_request_mib", 1024)) * 2**20))
    config = replica_config(token, limits, args.get("device"), args.get("runtime"),
                            int(float(args.get("cache_mib", 1024)) * 2**20), args.get("registry"), args.get("model"),
                            threads)
    return application(config, replicas, options)


def _float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


# ------------------------------------------------------------------------------------------ running it
def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class RayServeHandle:
    """A running SAMSegment application on Ray Serve (tests, benchmarks, ``samsegment serve --ray``)."""

    def __init__(self, url: str, replicas: int, started_ray: bool) -> None:
        self.url, self.replicas, self._started_ray = url, replicas, started_ray

    def stop(self) -> None:
        """Delete the application (its replicas close their state); shut down the Ray it started.
        Serve itself stays up on a cluster it joined (other applications may run there)."""
        import ray

        try:
            serve.delete(APP_NAME)
        finally:
            if self._started_ray:
                ray.shutdown()

    def __enter__(self) -> "RayServeHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(replicas: int = 2, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, limits: Any = None,
          device: str | None = None, runtime: str | None = None, cache_bytes: int = 2 << 30,
          registry: str | None = None, model: str | None = None, ray_address: str | None = None,
          replica_cpus: float | None = None, replica_gpus: float | None = None, num_cpus: int | None = None,
          max_ongoing_requests: int = 64, checkpoints: dict[str, str] | None = None) -> RayServeHandle:
    """Deploy the application and return once every replica has loaded its model.

    ``ray_address``: an existing cluster (``auto``, ``ray://...``); None starts a local Ray of
    ``num_cpus`` CPUs (default: all) that ``stop()`` shuts down. ``token`` None: no authentication
    (the caller enforces the bind rules, as ``serve()`` does). ``port`` 0: a free port."""
    import ray

    started = False
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, namespace="samsegment", log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="samsegment", log_to_driver=False,
                     _node_ip_address="127.0.0.1" if is_loopback(host) else None)
            started = True
    try:
        resources = ray.cluster_resources()
        options, threads = replica_resources(replicas, resources.get("CPU", 1.0), resources.get("GPU", 0.0),
                                             replica_cpus, replica_gpus)
        port = port or free_port(host)
        http_options: dict[str, Any] = {"host": host, "port": port, "keep_alive_timeout_s": 30}
        if ssl_certfile:
            http_options.update(ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        serve.start(http_options=http_options, proxy_location="HeadOnly")
        config = replica_config(token, limits, device, runtime, cache_bytes, registry, model, threads,
                                checkpoints=checkpoints)
        serve.run(application(config, replicas, options, max_ongoing_requests), name=APP_NAME, route_prefix="/",
                  blocking=False)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    scheme = "https" if ssl_certfile else "http"
    url_host = f"[{host}]" if ":" in host else host
    return RayServeHandle(f"{scheme}://{url_host}:{port}", replicas, started)


def serve_on_ray(replicas: int = 2, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
                 token_file: str | Path | None = None, no_auth: bool = False, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, port_file: str | Path | None = None, announce=print,
                 **options: Any) -> None:
    """``samsegment serve --ray``: deploy, announce, and run until Ctrl-C (then shut it down)."""
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise SAMSegmentError("TLS needs both --ssl-certfile and --ssl-keyfile", "give both files, or neither")
    secret = resolve_token(token, token_file, no_auth, host)
    handle = start(replicas, host, port, secret, ssl_certfile, ssl_keyfile, **options)
    try:
        if port_file is not None:
            tmp = Path(str(port_file) + ".tmp")
            tmp.write_text(handle.url.rsplit(":", 1)[1], encoding="utf-8")
            os.replace(tmp, port_file)
        generated = secret is not None and not token and token_file is None and not os.environ.get(TOKEN_ENV)
        announce(f"SAMSegment server on {handle.url} (API v1, Ray Serve, {replicas} replicas)"
                 + (f"; token: {secret}" if generated else "; token required" if secret else "; no authentication"))
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        announce("Stopping the server")
    finally:
        handle.stop()


__all__ = ["ROUTING_HEADER", "RayServeHandle", "SAMSegmentReplica", "VolumeAffinityRouter", "build_app",
           "home_replica", "replica_resources", "serve_on_ray", "start"]
