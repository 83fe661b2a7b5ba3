"""A small HTTP/1.1 client over non-blocking sockets, driven by ``poll()`` (stdlib only).

Why: inside 3D Slicer, Python worker threads barely run (PythonQt holds the GIL on the main
thread while Qt idles) and no main-thread call may block for more than ~50 ms. The Slicer module
therefore starts a request and calls ``PendingRequest.poll()`` from its QTimer until the response
is complete; blocking callers (the CLI) use ``request()``, which polls with a wait. No threads,
no Qt, no ``requests``: only ``socket``, ``ssl``, ``select`` and ``urllib.parse``.

What it speaks: one request per connection (``Connection: close``), ``Host``, ``Content-Length``
for bodies, ``Accept-Encoding: identity``; responses framed by ``Content-Length``, by
``Transfer-Encoding: chunked`` (uvicorn's streaming responses), or by the server closing the
connection. ``HEAD`` responses and 1xx/204/304 have no body; interim 1xx responses are skipped.
Large bodies are sent a slice at a time through a ``memoryview`` (never copied whole), as far as
the socket accepts on each ``poll()``. ``https`` URLs are wrapped in TLS (``ssl_context``, by
default ``ssl.create_default_context()``: certificate and host name are verified) and the
handshake is driven without blocking.

Blocking, honestly stated: ``PendingRequest(...)`` never blocks for a literal IP address or
``localhost``. For any other host name it calls ``socket.getaddrinfo`` once, which may block
briefly (a DNS lookup); the result is cached per host name in this module (and forgotten when no
address of it accepts a connection), so later requests to that host do not block.
A ``poll(wait=0)`` does at most ~20 ms of sending/receiving work and then returns.

Not supported (not needed for a SAMSegment server on loopback or the LAN): proxies, redirects,
keep-alive, compression, request streaming of unknown length.

Errors are ``TransportError`` (a ``SAMSegmentError``: problem + remedy): ``Unreachable`` (refused,
unknown host, reset or closed before any response), ``TimedOut`` (the request's deadline passed),
or a plain ``TransportError`` (TLS failure, a malformed or truncated response, cancelled).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import os
import select
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import SAMSegmentError

__all__ = ["HttpResponse", "PendingRequest", "TimedOut", "TransportError", "Unreachable", "request"]


class TransportError(SAMSegmentError):
    """The HTTP exchange failed; ``problem`` says how, ``remedy`` what to do about it."""


class Unreachable(TransportError):
    """No server answered: connection refused, host name unknown, or the connection was reset or
    closed before any response arrived."""


class TimedOut(TransportError):
    """The request's deadline (``timeout`` seconds from its start) passed before it completed."""


@dataclass(frozen=True)
class HttpResponse:
    """A complete HTTP response: ``status`` code, ``headers`` (lower-case names; repeated headers
    joined with ``", "``) and the decoded ``body`` (chunked framing removed)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (UTF-8); a ``TransportError`` when it is not JSON, so callers
        report "not a SAMSegment server" instead of a bare decoder traceback."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            preview = self.body[:80].decode("utf-8", "replace")
            raise TransportError(f"The server's response (HTTP {self.status}) is not JSON: {preview!r}",
                                 "check that the URL points to a SAMSegment server") from exc


# --- tuning -------------------------------------------------------------------------------------

_WORK_SLICE = 0.02            # seconds of send/receive work one poll() does before returning
_SEND_SLICE = 4 << 20         # bytes offered to one plain send(); the kernel takes what fits
_TLS_SEND_SLICE = 256 << 10   # bytes per TLS write (each is encrypted whole, so keep it small)
_RECV_SIZE = 256 << 10
_MERGE_BODY = 64 << 10        # bodies up to this size go out in the same send as the head
_MAX_HEAD = 64 << 10          # response status line + headers
_MAX_CHUNK_LINE = 4096

_WANT_READ = 1
_WANT_WRITE = 2

# request states
_CONNECTING, _HANDSHAKE, _SENDING, _RECEIVING, _DONE = range(5)
_STAGE = {_CONNECTING: "connecting", _HANDSHAKE: "in the TLS handshake", _SENDING: "sending the request",
          _RECEIVING: "waiting for the response", _DONE: "done"}
# response parser states
_P_HEAD, _P_LENGTH, _P_CHUNKED, _P_CLOSE = range(4)
# chunked decoder states
_C_SIZE, _C_DATA, _C_DATA_END, _C_TRAILER = range(4)

_IN_PROGRESS = {errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EAGAIN,
                getattr(errno, "WSAEWOULDBLOCK", 10035), getattr(errno, "WSAEINPROGRESS", 10036),
                getattr(errno, "WSAEALREADY", 10037)}
_CONNECTED = {0, errno.EISCONN, getattr(errno, "WSAEISCONN", 10056)}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# host name -> [(family, address string)]; see the module docstring
_DNS_CACHE: dict[str, list[tuple[int, str]]] = {}
_default_ssl_context: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    """One verifying client context per process: loading the system CA store costs tens of ms,
    too much to repeat on Slicer's main thread for every request."""
    global _default_ssl_context
    if _default_ssl_context is None:
        _default_ssl_context = ssl.create_default_context()
    return _default_ssl_context


_REASONS = {errno.ECONNREFUSED: "connection refused", 10061: "connection refused",
            errno.ETIMEDOUT: "connection timed out", 10060: "connection timed out",
            errno.EHOSTUNREACH: "host unreachable", 10065: "host unreachable",
            errno.ENETUNREACH: "network unreachable", 10051: "network unreachable",
            errno.ECONNRESET: "connection reset", 10054: "connection reset"}


def _describe(code: int) -> str:
    """A readable reason for an errno, Windows' WSA codes (which ``os.strerror`` does not know)
    included: ``"connection refused"``."""
    if code in _REASONS:
        return _REASONS[code]
    try:
        return os.strerror(code).lower()
    except (ValueError, OverflowError):
        return f"error {code}"


# --- URL, addresses and request head --------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str          # without IPv6 brackets
    port: int
    path: str          # path + query, as sent on the request line
    host_header: str


def _parse_url(url: str) -> _Target:
    """Split a full ``http(s)://host[:port]/path?query`` URL; a ``TransportError`` names a bad one
    (the URL is typically typed by the user into Slicer's server field)."""
    remedy = "give a URL like http://127.0.0.1:8765"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TransportError(f"Invalid server URL {url!r}: {exc}", remedy) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TransportError(f"Invalid server URL {url!r}: the scheme must be http or https", remedy)
    host = parts.hostname or ""
    if not host:
        raise TransportError(f"Invalid server URL {url!r}: no host", remedy)
    if parts.username is not None or parts.password is not None:
        raise TransportError(f"Invalid server URL {url!r}: credentials in URLs are not supported",
                             "remove user:password@ from the URL and pass the token as a header")
    if any(c in url for c in "\r\n\t ") or any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise TransportError(f"Invalid server URL {url!r}: it contains spaces or control characters", remedy)
    default = 443 if scheme == "https" else 80
    port = default if port is None else port
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    shown = f"[{host}]" if ":" in host else host
    return _Target(scheme, host, port, path, shown if port == default else f"{shown}:{port}")


def _resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """Candidate ``(family, sockaddr)`` pairs for ``host``, in the order to try them.

    A literal IP never touches DNS (``AI_NUMERICHOST``); ``localhost`` is 127.0.0.1 then ::1
    without a lookup; any other name is looked up once (may block briefly) and cached.
    Raises ``Unreachable`` when the name cannot be resolved.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        literal = True
    except ValueError:
        literal = False
    if literal:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror as exc:
            raise Unreachable(f"Invalid server address {host!r}: {exc.strerror}", "check the URL") from exc
        return [(info[0], info[4]) for info in infos]
    if host.lower().rstrip(".") == "localhost":
        return [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port, 0, 0))]
    cached = _DNS_CACHE.get(host.lower())
    if cached is None:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise Unreachable(f"Cannot resolve the server host name {host!r} ({reason})",
                              "check the host name in the URL and the network connection") from exc
        cached = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in cached:
                cached.append((family, sockaddr[0]))
        if not cached:
            raise Unreachable(f"The server host name {host!r} has no IPv4/IPv6 address",
                              "check the host name in the URL")
        _DNS_CACHE[host.lower()] = cached
    return [(family, (address, port) if family == socket.AF_INET else (address, port, 0, 0))
            for family, address in cached]


def _build_head(method: str, target: _Target, body_len: int | None, headers: Mapping[str, str] | None) -> bytes:
    """The request line and headers (latin-1). Caller headers override the defaults, except the
    framing ones this client owns (``Connection``, ``Content-Length``); ``Transfer-Encoding`` is
    refused, and CR/LF in any name or value raises ``ValueError`` (header injection)."""
    fields: dict[str, tuple[str, str]] = {}

    def put(name: str, value: str) -> None:
        fields[name.lower()] = (name, value)

    put("Host", target.host_header)
    put("User-Agent", "samsegment-http/1")
    put("Accept", "*/*")
    put("Accept-Encoding", "identity")
    for name, value in (headers or {}).items():
        name, value = str(name), str(value)
        if not name or not set(name) <= _TOKEN_CHARS:
            raise ValueError(f"invalid HTTP header name {name!r}")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid HTTP header value for {name!r}: contains CR, LF or NUL")
        low = name.lower()
        if low == "transfer-encoding":
            raise ValueError("Transfer-Encoding is not supported for requests: pass the body as bytes")
        if low in ("connection", "content-length"):
            continue
        put(name, value)
    if body_len is not None:
        put("Content-Length", str(body_len))
    elif method in ("POST", "PUT", "PATCH"):
        put("Content-Length", "0")
    put("Connection", "close")
    lines = [f"{method} {target.path} HTTP/1.1"] + [f"{name}: {value}" for name, value in fields.values()]
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"HTTP headers must be latin-1 text: {exc}") from exc


def _wait_fd(fd: int, want: int, timeout: float) -> bool:
    """Block up to ``timeout`` s until ``fd`` is readable/writable as ``want`` asks (or failed).

    ``select.poll`` where there is one (no FD_SETSIZE limit: Slicer may hold many descriptors),
    else ``select.select`` with the socket in the exceptional set too, which is how Windows
    reports a failed non-blocking connect.
    """
    timeout = max(0.0, timeout)
    if hasattr(select, "poll"):
        poller = select.poll()
        mask = (select.POLLIN if want & _WANT_READ else 0) | (select.POLLOUT if want & _WANT_WRITE else 0)
        poller.register(fd, mask)
        try:
            return bool(poller.poll(math.ceil(timeout * 1000)))
        except InterruptedError:
            return False
    readers = [fd] if want & _WANT_READ else []
    writers = [fd] if want & _WANT_WRITE else []
    try:
        r, w, x = select.select(readers, writers, [fd], timeout)
    except InterruptedError:
        return False
    return bool(r or w or x)


# --- the request --------------------------------------------------------------------------------

class PendingRequest:
    """One HTTP request in flight, advanced by ``poll()`` without blocking.

    ``url``: full ``http``/``https`` URL (host, port, path, query). ``body``: bytes-like (bytes,
    bytearray, memoryview, a C-contiguous numpy array...) sent as is, never copied whole, or None.
    ``headers``: extra request headers. ``timeout``: seconds for the whole request (connect,
    upload, response). ``ssl_context``: for https (default: a verifying system context).

    Creating it starts a non-blocking connect and returns at once (see the module docstring on
    DNS). Invalid arguments raise at once (``TransportError`` for a bad URL, ``ValueError`` for a
    bad method, header or body); a failure to reach the server is reported by ``response()``.
    """

    def __init__(self, url: str, method: str = "GET", body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not method or not set(method) <= _TOKEN_CHARS:
            raise ValueError(f"invalid HTTP method {method!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._target = _parse_url(url)
        self._method = method
        self._timeout = float(timeout)
        self._deadline = time.monotonic() + self._timeout
        self._ssl_context = ssl_context
        self._server = (f"[{self._target.host}]" if ":" in self._target.host else self._target.host) \
            + f":{self._target.port}"

        view: memoryview | None = None
        if body is not None:
            try:
                view = memoryview(body)
            except TypeError as exc:
                raise ValueError(f"body must be bytes-like, got {type(body).__name__}") from exc
            if not view.c_contiguous:
                raise ValueError("body must be C-contiguous bytes-like data")
            if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
                view = view.cast("B")
        head = _build_head(method, self._target, None if view is None else view.nbytes, headers)
        if view is not None and view.nbytes <= _MERGE_BODY:
            # one segment for small requests: a head/body write-write would meet Nagle + delayed ACK
            self._out: list[memoryview] = [memoryview(head + view.tobytes())]
        else:
            self._out = [memoryview(head)] + ([view] if view is not None and view.nbytes else [])
        self._out_index = 0
        self._out_offset = 0
        self._chunk_end: int | None = None   # a TLS write that wanted a retry must be retried alike

        self._sock: socket.socket | None = None
        self._state = _CONNECTING
        self._response: HttpResponse | None = None
        self._error: TransportError | None = None
        self._connect_errors: list[str] = []
        self._address = ""

        # response parsing
        self._pstate = _P_HEAD
        self._rbuf = bytearray()
        self._got_bytes = False
        self._status = 0
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._remaining = 0
        self._cstate = _C_SIZE

        try:
            self._addresses = _resolve(self._target.host, self._target.port)
        except TransportError as exc:
            self._addresses = []
            self._fail(exc)
            return
        self._connect_next()

    # -- public ----------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the response is complete or the request failed/was cancelled."""
        return self._state == _DONE

    def poll(self, wait: float = 0.0) -> bool:
        """Advance the request as far as possible, blocking at most ``wait`` seconds.

        With ``wait=0`` (Slicer's timer) it does at most ~20 ms of send/receive work and returns.
        Marks the request ``TimedOut`` once its deadline has passed. Returns ``done``.
        """
        if self._state == _DONE:
            return True
        start = time.monotonic()
        wait_end = start + max(0.0, wait)
        slice_end = start + _WORK_SLICE
        while True:
            try:
                want = self._advance(slice_end)
            except TransportError as exc:
                self._fail(exc)
            except BaseException:
                self._close()
                self._state = _DONE
                self._error = TransportError("The request failed with an internal error", "see the log")
                raise
            if self._state == _DONE:
                return True
            now = time.monotonic()
            if now >= self._deadline:
                self._fail(TimedOut(
                    f"No complete response from the SAMSegment server at {self._server} within "
                    f"{self._timeout:g} s ({self._method} {self._target.path}; stalled {_STAGE[self._state]})",
                    "the server may be busy or stuck: retry, allow a longer timeout, or check the server log"))
                return True
            if want == 0:                      # work slice used up; more could be done at once
                if now >= wait_end:
                    return False
                slice_end = now + _WORK_SLICE
                continue
            timeout = min(wait_end, self._deadline) - now
            if timeout <= 0:
                return False
            assert self._sock is not None
            _wait_fd(self._sock.fileno(), want, timeout)
            slice_end = time.monotonic() + _WORK_SLICE

    def response(self) -> HttpResponse:
        """The complete response; raises the request's ``TransportError`` if it failed or was
        cancelled, and ``RuntimeError`` if it is not done yet (call ``poll()`` until it is)."""
        if self._state != _DONE:
            raise RuntimeError("the request is still in progress: poll() until done")
        if self._error is not None:
            raise self._error.with_traceback(None)   # raised afresh each call; the cause stays chained
        assert self._response is not None
        return self._response

    def cancel(self) -> None:
        """Abandon the request: close its socket now; ``response()`` then raises
        ``TransportError("cancelled")``. A request already done keeps its outcome."""
        if self._state == _DONE:
            return
        self._fail(TransportError("The request was cancelled", ""))

    def __repr__(self) -> str:
        return f"<PendingRequest {self._method} {self._target.scheme}://{self._server}{self._target.path} " \
               f"{_STAGE[self._state]}>"

    # -- connection ------------------------------------------------------------------------------

    def _connect_next(self) -> None:
        """Start a non-blocking connect to the next candidate address; ``Unreachable`` (as the
        request's outcome) when none is left."""
        while self._addresses:
            family, sockaddr = self._addresses.pop(0)
            self._address = sockaddr[0]
            sock = None
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = sock.connect_ex(sockaddr)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                self._connect_errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            self._sock = sock
            if code in _CONNECTED:
                self._state = _CONNECTING   # confirmed (SO_ERROR) by the next _advance
                return
            if code in _IN_PROGRESS:
                self._state = _CONNECTING
                return
            sock.close()
            self._sock = None
            self._connect_errors.append(f"{sockaddr[0]}: {_describe(code)}")
        self._unreachable()

    def _unreachable(self) -> None:
        # a looked-up name may have moved: look it up afresh next time (no-op for literals/localhost)
        _DNS_CACHE.pop(self._target.host.lower(), None)
        errors = self._connect_errors
        if len(errors) == 1 and errors[0].startswith(self._target.host + ": "):
            reason = errors[0][len(self._target.host) + 2:]     # "connection refused", host is in the message
        else:
            reason = "; ".join(errors) or "no address"
        self._fail(Unreachable(f"Cannot reach the SAMSegment server at {self._server} ({reason})",
                               "start it (samsegment serve) or check the URL and port"))

    def _connected(self) -> None:
        """TCP is up: start TLS for https, else start sending."""
        if self._target.scheme != "https":
            self._state = _SENDING
            return
        context = self._ssl_context or _default_context()
        assert self._sock is not None
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=self._target.host,
                                             do_handshake_on_connect=False)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise TransportError(f"Cannot start TLS with {self._server}: {exc}",
                                 "check the ssl_context and the URL's host name") from exc
        self._state = _HANDSHAKE

    # -- the state machine -----------------------------------------------------------------------

    def _advance(self, slice_end: float) -> int:
        """Do non-blocking work until blocked or ``slice_end``; returns the readiness wanted when
        blocked (``_WANT_READ``/``_WANT_WRITE``), 0 when the slice ran out or the request is done.
        Failures are raised as ``TransportError`` (``poll`` records them)."""
        while self._state != _DONE:
            sock = self._sock
            assert sock is not None
            if self._state == _CONNECTING:
                if not _wait_fd(sock.fileno(), _WANT_WRITE, 0):
                    return _WANT_WRITE
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._connect_errors.append(f"{self._address}: {_describe(code)}")
                    self._close()
                    self._connect_next()
                    continue
                self._connected()
            elif self._state == _HANDSHAKE:
                want = self._handshake()
                if want:
                    return want
            elif self._state == _SENDING:
                self._receive_early()
                if self._state != _SENDING:
                    continue
                want = self._send_some()
                if want:
                    return want
            elif self._state == _RECEIVING:
                want = self._receive_some()
                if want:
                    return want
            if time.monotonic() >= slice_end:
                return 0
        return 0

    def _handshake(self) -> int:
        sock = self._sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return _WANT_READ
        except ssl.SSLWantWriteError:
            return _WANT_WRITE
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(
                f"The TLS certificate of {self._server} was rejected: {exc.verify_message or exc}",
                "give the client the server's certificate or its CA, and use the host name the "
                "certificate was issued for") from exc
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            raise TransportError(f"{self._server} closed the connection during the TLS handshake",
                                 "check that the server serves https on this port (or use http://)") from exc
        except ssl.SSLError as exc:
            raise TransportError(f"The TLS handshake with {self._server} failed: {exc.reason or exc}",
                                 "check that the server serves https on this port (or use http://)") from exc
        except OSError as exc:
            raise Unreachable(f"Lost the connection to the SAMSegment server at {self._server} during the "
                              f"TLS handshake ({exc.strerror or exc})", "check that the server is running") from exc
        self._state = _SENDING
        return 0

    def _send_some(self) -> int:
        """Send the next slice of the head/body; 0 after progress, else the readiness wanted."""
        sock = self._sock
        assert sock is not None
        buf = self._out[self._out_index]
        if self._chunk_end is None:
            step = _TLS_SEND_SLICE if isinstance(sock, ssl.SSLSocket) else _SEND_SLICE
            self._chunk_end = min(len(buf), self._out_offset + step)
        try:
            sent = sock.send(buf[self._out_offset:self._chunk_end])
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            return _WANT_WRITE | _WANT_READ
        except ssl.SSLWantReadError:
            return _WANT_READ
        except (ssl.SSLError, OSError):
            # the server closed or reset mid-request; it may have answered first (e.g. 413)
            self._chunk_end = None
            self._state = _RECEIVING
            return 0
        self._out_offset += sent
        if self._out_offset >= self._chunk_end:
            self._chunk_end = None
        if self._out_offset >= len(buf):
            self._out_index += 1
            self._out_offset = 0
            self._chunk_end = None
            if self._out_index >= len(self._out):
                self._out = []
                self._state = _RECEIVING
        return 0

    def _receive_early(self) -> None:
        """While uploading, take any early answer (an error such as 413 before the body is in)."""
        sock = self._sock
        assert sock is not None
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ssl.SSLError, OSError):
            self._state = _RECEIVING   # let the receive path report it
            return
        if not data:
            self._on_eof()
        else:
            self._feed(data)

    def _receive_some(self) -> int:
        sock = self._sock
        assert sock is not None
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return _WANT_READ
        except ssl.SSLWantWriteError:
            return _WANT_WRITE
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            data = b""
        except ssl.SSLError as exc:
            raise TransportError(f"TLS error from {self._server}: {exc.reason or exc}",
                                 "retry; check the server log if it persists") from exc
        except OSError as exc:
            if not self._got_bytes:
                raise Unreachable(f"The SAMSegment server at {self._server} dropped the connection before "
                                  f"answering ({exc.strerror or exc})",
                                  "check that the server is running and that the URL is right") from exc
            raise TransportError(f"The connection to {self._server} broke mid-response ({exc.strerror or exc})",
                                 "retry; check the server log if it persists") from exc
        if not data:
            self._on_eof()
        else:
            self._feed(data)
        return 0

    # -- response parsing ------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Take received bytes into the response (head, then body by its framing)."""
        self._got_bytes = True
        if self._pstate == _P_HEAD:
            self._rbuf += data
            self._parse_head()
        elif self._pstate == _P_LENGTH:
            self._take_length(data)
        elif self._pstate == _P_CHUNKED:
            self._rbuf += data
            self._decode_chunked()
        else:
            self._chunks.append(data)

    def _parse_head(self) -> None:
        while self._pstate == _P_HEAD and self._state != _DONE:
            end = self._rbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._rbuf) > _MAX_HEAD:
                    raise self._malformed("its headers exceed 64 KiB")
                return
            lines = bytes(self._rbuf[:end]).decode("latin-1").split("\r\n")
            del self._rbuf[:end + 4]
            version, _, rest = lines[0].partition(" ")
            code_text = rest.partition(" ")[0]
            if not version.startswith("HTTP/1.") or len(code_text) != 3 or not code_text.isdigit():
                raise self._malformed(f"its status line is {lines[0][:80]!r}")
            status = int(code_text)
            headers: dict[str, str] = {}
            last = ""
            for line in lines[1:]:
                if line[:1] in (" ", "\t") and last:      # obsolete line folding
                    headers[last] += " " + line.strip()
                    continue
                name, sep, value = line.partition(":")
                name = name.strip().lower()
                if not sep or not name:
                    raise self._malformed(f"it has a bad header line {line[:80]!r}")
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
                last = name
            if 100 <= status < 200 and status != 101:
                continue                                  # interim response (100 Continue...)
            self._status, self._headers = status, headers
            self._start_body()

    def _start_body(self) -> None:
        headers = self._headers
        if self._method == "HEAD" or self._status in (101, 204, 304):
            self._finish()
            return
        leftover = bytes(self._rbuf)
        self._rbuf.clear()
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if coding.split(",")[-1].strip().lower() == "chunked":
                self._pstate = _P_CHUNKED
                self._rbuf += leftover
                self._decode_chunked()
            else:
                self._pstate = _P_CLOSE
                if leftover:
                    self._chunks.append(leftover)
            return
        length = headers.get("content-length")
        if length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise self._malformed(f"its Content-Length is {length!r}")
            self._remaining = int(values.pop())
            self._pstate = _P_LENGTH
            if self._remaining == 0:
                self._finish()
            elif leftover:
                self._take_length(leftover)
            return
        self._pstate = _P_CLOSE
        if leftover:
            self._chunks.append(leftover)

    def _take_length(self, data: bytes) -> None:
        if len(data) > self._remaining:
            data = data[:self._remaining]
        self._chunks.append(data)
        self._remaining -= len(data)
        if self._remaining == 0:
            self._finish()

    def _decode_chunked(self) -> None:
        buf = self._rbuf
        pos = 0
        try:
            while self._state != _DONE:
                if self._cstate == _C_SIZE:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        if len(buf) - pos > _MAX_CHUNK_LINE:
                            raise self._malformed("a chunk size line is too long")
                        break
                    size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
                    if not size_text or not set(size_text) <= _HEX:
                        raise self._malformed(f"a chunk size is {size_text[:20]!r}")
                    pos = eol + 2
                    self._remaining = int(size_text, 16)
                    self._cstate = _C_DATA if self._remaining else _C_TRAILER
                elif self._cstate == _C_DATA:
                    take = min(self._remaining, len(buf) - pos)
                    if take:
                        self._chunks.append(bytes(buf[pos:pos + take]))
                        pos += take
                        self._remaining -= take
                    if self._remaining:
                        break
                    self._cstate = _C_DATA_END
                elif self._cstate == _C_DATA_END:
                    if len(buf) - pos < 2:
                        break
                    if buf[pos:pos + 2] != b"\r\n":
                        raise self._malformed("a chunk does not end with CRLF")
                    pos += 2
                    self._cstate = _C_SIZE
                else:  # trailer fields, up to the empty line
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        if len(buf) - pos > _MAX_HEAD:
                            raise self._malformed("its trailer is too long")
                        break
                    line_empty = eol == pos
                    pos = eol + 2
                    if line_empty:
                        self._finish()
        finally:
            del buf[:pos]

    def _on_eof(self) -> None:
        """The server closed its side: the end of a read-to-close body, or a failure."""
        if self._pstate == _P_CLOSE:
            self._finish()
            return
        if self._pstate == _P_HEAD and not self._got_bytes:
            raise Unreachable(f"The SAMSegment server at {self._server} closed the connection without answering",
                              "check that the server is running and that the URL (http/https, port) is right")
        if self._pstate == _P_HEAD:
            raise self._malformed("the connection closed in the middle of its headers")
        raise TransportError(f"The response from {self._server} was cut short (the connection closed before "
                             "the whole body arrived)", "retry; check the server log if it persists")

    def _malformed(self, why: str) -> TransportError:
        return TransportError(f"The response from {self._server} is not valid HTTP: {why}",
                              "check that the URL points to a SAMSegment server (http vs https, port)")

    # -- ending ----------------------------------------------------------------------------------

    def _finish(self) -> None:
        self._response = HttpResponse(self._status, self._headers, b"".join(self._chunks))
        self._chunks = []
        self._rbuf = bytearray()
        self._close()
        self._state = _DONE

    def _fail(self, error: TransportError) -> None:
        self._error = error
        self._chunks = []
        self._out = []
        self._close()
        self._state = _DONE

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:   # absent when __init__ refused its arguments
            self._close()


def request(url: str, method: str = "GET", body: bytes | None = None, headers: Mapping[str, str] | None = None,
            timeout: float = 60.0, ssl_context: ssl.SSLContext | None = None) -> HttpResponse:
    """Blocking convenience for the CLI and scripts: run a ``PendingRequest`` to the end, waiting
    in ``select`` between steps, and return its ``HttpResponse`` (or raise its ``TransportError``).
    Not for Slicer's main thread. Arguments as for ``PendingRequest``."""
    pending = PendingRequest(url, method, body, headers, timeout, ssl_context)
    try:
        while not pending.poll(wait=0.5):
            pass
    finally:
        pending.cancel()     # no-op when done; closes the socket on KeyboardInterrupt
    return pending.response()
