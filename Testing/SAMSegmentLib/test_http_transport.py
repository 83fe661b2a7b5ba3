"""The non-blocking HTTP transport against a real uvicorn + FastAPI server (and a few raw sockets).

Every server here listens on 127.0.0.1 on a free port, runs in a daemon thread and stops at the
end of its fixture; every client loop is bounded by a deadline. Responses are compared with what
``urllib.request`` gets from the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request, Response  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from SAMSegmentLib import http_transport  # noqa: E402
from SAMSegmentLib.errors import SAMSegmentError  # noqa: E402
from SAMSegmentLib.http_transport import (  # noqa: E402
    HttpResponse,
    PendingRequest,
    TimedOut,
    TransportError,
    Unreachable,
    request,
)

STREAM_PIECES = [b"first piece\n", b"x" * 300_000, b"", b"last\n"]   # the empty one is skipped by h11
BIG_DOWNLOAD = bytes(range(256)) * (5 * 4096)                          # 5 MiB, Content-Length framed


def make_app() -> FastAPI:
    """Routes for each framing the transport must handle."""
    app = FastAPI()

    @app.get("/info")
    async def info(x: str = "") -> dict:
        return {"ok": True, "x": x, "items": [1, 2, 3]}

    @app.put("/upload")
    async def upload(request: Request) -> dict:
        body = await request.body()
        return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream",
                        headers={"X-Seen-Type": request.headers.get("content-type", "")})

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def pieces():
            for piece in STREAM_PIECES:
                await asyncio.sleep(0.01)
                yield piece
        return StreamingResponse(pieces(), media_type="text/plain")

    @app.api_route("/resource", methods=["GET", "HEAD"])
    async def resource() -> Response:
        return Response(b"r" * 1000, media_type="application/octet-stream", headers={"X-Thing": "yes"})

    @app.get("/big")
    async def big() -> Response:
        return Response(BIG_DOWNLOAD, media_type="application/octet-stream")

    @app.get("/nocontent")
    async def nocontent() -> Response:
        return Response(status_code=204)

    @app.get("/slow")
    async def slow() -> dict:
        await asyncio.sleep(1.5)
        return {"late": True}

    return app


@contextlib.contextmanager
def run_uvicorn(app: FastAPI, **ssl_files: str) -> Iterator[int]:
    """A uvicorn server on 127.0.0.1:<free port> in a daemon thread; yields the port."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=2, **ssl_files)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-http-transport-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with run_uvicorn(make_app()) as port:
        yield f"http://127.0.0.1:{port}"


def urllib_get(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """What the standard library's client gets (no proxies from the environment)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=data, method=method)
    with opener.open(req, timeout=20) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def run_polling(pending: PendingRequest, limit: float = 20.0, pause: float = 0.0) -> list[float]:
    """Drive ``pending`` with ``poll(wait=0)`` only, as Slicer's timer does; returns each poll's
    duration. Bounded by ``limit`` seconds."""
    durations: list[float] = []
    deadline = time.monotonic() + limit
    while True:
        start = time.perf_counter()
        done = pending.poll(0.0)
        durations.append(time.perf_counter() - start)
        if done:
            return durations
        assert time.monotonic() < deadline, "request did not finish in time"
        if pause:
            time.sleep(pause)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- plain HTTP against uvicorn -----------------------------------------------------------------

def test_json_get_matches_urllib(base_url):
    url = f"{base_url}/info?x=a%20b&y=2"
    status, headers, body = urllib_get(url)
    got = request(url)
    assert isinstance(got, HttpResponse)
    assert (got.status, got.body) == (status, body)
    assert got.json() == {"ok": True, "x": "a b", "items": [1, 2, 3]} == json.loads(body)
    assert got.headers["content-type"] == headers["content-type"] == "application/json"
    assert got.headers["content-length"] == str(len(body))
    assert all(name == name.lower() for name in got.headers)


def test_404_is_a_response_not_an_error(base_url):
    got = request(f"{base_url}/missing")
    assert got.status == 404 and got.json() == {"detail": "Not Found"}


def test_post_body_and_headers(base_url):
    payload = b"\x00\x01binary\r\n\r\n0\r\n" * 100
    got = request(f"{base_url}/echo", "POST", payload, {"Content-Type": "application/x-test"})
    assert got.status == 200 and got.body == payload and got.headers["x-seen-type"] == "application/x-test"
    assert request(f"{base_url}/echo", "POST", memoryview(payload)).body == payload
    assert request(f"{base_url}/echo", "POST").body == b""           # Content-Length: 0


def test_large_upload_by_nonblocking_polls(base_url):
    """50 MB sent purely by poll(wait=0) calls; no single poll may hog the (Slicer) main thread."""
    payload = bytes(range(256)) * (50 * 4096)                          # 50 MiB
    digest = hashlib.sha256(payload).hexdigest()
    start = time.perf_counter()
    pending = PendingRequest(f"{base_url}/upload", "PUT", payload, {"Content-Type": "application/octet-stream"},
                             timeout=60)
    construct = time.perf_counter() - start
    durations = run_polling(pending, limit=40, pause=0.002)
    total = time.perf_counter() - start
    got = pending.response()
    assert got.status == 200 and got.json() == {"length": len(payload), "sha256": digest}
    print(f"\n50 MiB upload: {total:.2f} s, {len(durations)} polls, max poll {max(durations) * 1000:.1f} ms, "
          f"median {sorted(durations)[len(durations) // 2] * 1000:.2f} ms, constructor {construct * 1000:.2f} ms")
    assert construct < 0.05
    assert max(durations) < 0.25     # ~20 ms of work per poll; generous slack for a shared 2-core machine


def test_large_download_matches_urllib(base_url):
    status, _headers, body = urllib_get(f"{base_url}/big")
    pending = PendingRequest(f"{base_url}/big")
    durations = run_polling(pending, pause=0.001)
    got = pending.response()
    assert got.status == status == 200 and got.body == body == BIG_DOWNLOAD
    assert max(durations) < 0.25


def test_chunked_streaming_response(base_url):
    status, _headers, body = urllib_get(f"{base_url}/stream")
    pending = PendingRequest(f"{base_url}/stream")
    run_polling(pending, pause=0.002)
    got = pending.response()
    assert got.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in got.headers
    assert (got.status, got.body) == (status, body) == (200, b"".join(STREAM_PIECES))


def test_head_has_no_body(base_url):
    status, headers, body = urllib_get(f"{base_url}/resource", "HEAD")
    got = request(f"{base_url}/resource", "HEAD")
    assert got.status == status == 200 and got.body == body == b""
    assert got.headers["content-length"] == headers["content-length"] == "1000"
    assert got.headers["x-thing"] == "yes"
    assert request(f"{base_url}/resource").body == b"r" * 1000


def test_204_has_no_body(base_url):
    got = request(f"{base_url}/nocontent")
    assert got.status == 204 and got.body == b""


def test_timeout(base_url):
    start = time.monotonic()
    pending = PendingRequest(f"{base_url}/slow", timeout=0.3)
    deadline = start + 5
    while not pending.poll(wait=0.05):
        assert time.monotonic() < deadline
    elapsed = time.monotonic() - start
    with pytest.raises(TimedOut) as info:
        pending.response()
    assert 0.3 <= elapsed < 1.0
    assert "0.3 s" in info.value.problem and info.value.remedy
    with pytest.raises(TimedOut):
        request(f"{base_url}/slow", timeout=0.2)


def test_cancel(base_url):
    pending = PendingRequest(f"{base_url}/slow")
    for _ in range(5):
        assert not pending.poll(wait=0.02)
    with pytest.raises(RuntimeError):
        pending.response()
    pending.cancel()
    assert pending.done and pending.poll() is True
    with pytest.raises(TransportError, match="cancelled"):
        pending.response()
    assert pending._sock is None                      # the socket is closed at once
    done = request(f"{base_url}/info")                # cancelling after completion keeps the result
    finished = PendingRequest(f"{base_url}/info")
    while not finished.poll(wait=0.5):
        pass
    finished.cancel()
    assert finished.response().body == done.body


def test_blocking_request_waits_instead_of_spinning(base_url):
    start = time.process_time()
    wall = time.monotonic()
    with pytest.raises(TimedOut):
        request(f"{base_url}/slow", timeout=0.5)
    assert time.monotonic() - wall >= 0.5
    assert time.process_time() - start < 0.3          # select() waits; no busy loop


# --- failures -----------------------------------------------------------------------------------

def test_connection_refused_is_prompt_and_clear():
    port = free_port()
    start = time.monotonic()
    pending = PendingRequest(f"http://127.0.0.1:{port}/info", timeout=10)
    deadline = start + 5
    while not pending.poll(wait=0.05):
        assert time.monotonic() < deadline
    assert time.monotonic() - start < 1.0
    with pytest.raises(Unreachable) as info:
        pending.response()
    err = info.value
    assert isinstance(err, TransportError) and isinstance(err, SAMSegmentError)
    assert f"Cannot reach the SAMSegment server at 127.0.0.1:{port}" in err.problem
    assert "refused" in err.problem and "start it" in err.remedy
    with pytest.raises(Unreachable):
        request(f"http://localhost:{port}/", timeout=5)       # 127.0.0.1 then ::1, both refused


def test_dns_failure_and_cache(monkeypatch):
    calls: list[str] = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        if host == "nowhere.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]

    monkeypatch.setattr(http_transport.socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(http_transport, "_DNS_CACHE", {})
    pending = PendingRequest("http://nowhere.invalid:8765/")
    assert pending.done
    with pytest.raises(Unreachable, match="Cannot resolve the server host name 'nowhere.invalid'"):
        pending.response()

    port = free_port()
    for _ in range(2):
        with pytest.raises(Unreachable):
            request(f"http://samsegment.test:{port}/", timeout=5)
    assert calls.count("samsegment.test") == 2            # refused: the cached address was forgotten
    with run_uvicorn(make_app()) as live:
        for _ in range(3):
            assert request(f"http://samsegment.test:{live}/info").status == 200
    assert calls.count("samsegment.test") == 3            # looked up once, then cached
    assert "127.0.0.1" not in calls and "localhost" not in calls


def test_literal_and_localhost_do_not_resolve(monkeypatch, base_url):
    def no_dns(host, port, *args, flags=0, **kwargs):
        assert flags & socket.AI_NUMERICHOST, f"blocking DNS lookup of {host!r}"
        return real(host, port, *args, flags=flags, **kwargs)

    real = socket.getaddrinfo
    monkeypatch.setattr(http_transport.socket, "getaddrinfo", no_dns)
    port = base_url.rsplit(":", 1)[1]
    assert request(f"http://localhost:{port}/info").status == 200
    assert request(f"http://127.0.0.1:{port}/info").status == 200


def test_invalid_arguments():
    for url in ("ftp://127.0.0.1/", "http:///path", "127.0.0.1:8765", "http://127.0.0.1:99999/",
                "http://user:pw@127.0.0.1/"):
        with pytest.raises(TransportError, match="Invalid server URL"):
            PendingRequest(url)
    with pytest.raises(ValueError):
        PendingRequest("http://127.0.0.1:1/", headers={"X-Evil": "a\r\nInjected: yes"})
    with pytest.raises(ValueError):
        PendingRequest("http://127.0.0.1:1/", "GET / HTTP/1.1")
    with pytest.raises(ValueError):
        PendingRequest("http://127.0.0.1:1/", "POST", body="text, not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PendingRequest("http://127.0.0.1:1/", timeout=0)


def test_json_error_is_clear():
    with pytest.raises(TransportError, match="not JSON"):
        HttpResponse(200, {}, b"<html>").json()


# --- raw servers: framings and failures uvicorn does not produce --------------------------------

@contextlib.contextmanager
def raw_server(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    """A one-connection TCP server on 127.0.0.1: reads the request head, then ``handler(conn)``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            handler(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(10)


def send_slowly(data: bytes, piece: int = 7) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), piece):
            conn.sendall(data[i:i + piece])
            time.sleep(0.001)
    return handler


def test_chunked_and_headers_split_across_tiny_reads():
    wire = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Multi: a\r\nx-multi: b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
    with raw_server(send_slowly(wire)) as port:
        pending = PendingRequest(f"http://127.0.0.1:{port}/")
        run_polling(pending, limit=10, pause=0.001)
    got = pending.response()
    assert got.status == 200 and got.body == b"hello" + b"z" * 26
    assert got.headers["x-multi"] == "a, b" and got.headers["content-type"] == "text/plain"


def test_read_to_close_body():
    wire = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end" + b"." * 100_000
    with raw_server(lambda conn: conn.sendall(wire)) as port:
        got = request(f"http://127.0.0.1:{port}/", timeout=10)
    assert got.status == 200 and got.body == b"until the end" + b"." * 100_000


def test_truncated_and_malformed_responses():
    cases = [(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", TransportError, "cut short"),
             (b"SSH-2.0-OpenSSH\r\n\r\n", TransportError, "not valid HTTP"),
             (b"", Unreachable, "closed the connection without answering")]    # closes without a word
    for wire, error, message in cases:
        with raw_server(lambda conn, wire=wire: conn.sendall(wire)) as port, pytest.raises(error, match=message):
            request(f"http://127.0.0.1:{port}/", timeout=10)


def test_early_answer_during_upload():
    """A server that refuses a large upload after its head (413) is heard, not reported as a reset."""
    def refuse(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
        conn.shutdown(socket.SHUT_WR)
        end = time.monotonic() + 5                           # drain, as a polite server does
        with contextlib.suppress(OSError):
            while time.monotonic() < end and conn.recv(1 << 20):
                pass

    with raw_server(refuse) as port:
        got = request(f"http://127.0.0.1:{port}/upload", "PUT", b"\0" * (20 << 20), timeout=20)
    assert got.status == 413 and got.body == b"too large"


# --- TLS --------------------------------------------------------------------------------------

def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 only (so ``localhost`` mismatches); skips the
    TLS tests when neither ``cryptography`` nor the ``openssl`` CLI is available."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("no TLS test: neither the cryptography package nor the openssl CLI is available")
        result = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                 "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                                check=False, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            pytest.skip(f"no TLS test: openssl could not make a certificate: {result.stderr.strip()[:200]}")
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    cert, key = make_self_signed(tmp_path_factory.mktemp("tls"))
    with run_uvicorn(make_app(), ssl_certfile=str(cert), ssl_keyfile=str(key)) as port:
        yield port, cert


def test_https_with_custom_context(tls_server):
    port, cert = tls_server
    context = ssl.create_default_context(cafile=str(cert))
    got = request(f"https://127.0.0.1:{port}/info?x=tls", ssl_context=context)
    assert got.status == 200 and got.json()["x"] == "tls"

    payload = bytes(range(256)) * (8 * 4096)                  # 8 MiB through TLS, by polls
    pending = PendingRequest(f"https://127.0.0.1:{port}/upload", "PUT", payload, ssl_context=context)
    durations = run_polling(pending, pause=0.002)
    assert pending.response().json() == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert max(durations) < 0.25

    pending = PendingRequest(f"https://127.0.0.1:{port}/stream", ssl_context=context)
    run_polling(pending, pause=0.002)
    assert pending.response().body == b"".join(STREAM_PIECES)


def test_https_rejects_unknown_certificate_and_wrong_host(tls_server):
    port, cert = tls_server
    with pytest.raises(TransportError, match="TLS certificate of 127.0.0.1:.* was rejected") as info:
        request(f"https://127.0.0.1:{port}/info", timeout=10)     # default context: self-signed, untrusted
    assert not isinstance(info.value, Unreachable)
    context = ssl.create_default_context(cafile=str(cert))
    with pytest.raises(TransportError, match="rejected.*(mismatch|localhost)"):
        request(f"https://localhost:{port}/info", ssl_context=context, timeout=10)


def test_https_client_against_plain_server_fails_clearly(base_url):
    with pytest.raises(TransportError) as info:
        request(base_url.replace("http://", "https://") + "/info", timeout=10)
    assert "TLS" in info.value.problem and "https" in info.value.remedy
