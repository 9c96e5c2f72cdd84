"""A small HTTP/1.1 server on asyncio and h11, for the agent's API.

h11 parses requests and frames responses; this module owns the sockets and the
connection loop, because on a host shared with other users the server must
stay up whatever a local client does:

- Connections are bounded, in total and per peer address. Over a cap, the
  connection that has waited longest for a request head, and has sent nothing
  yet, is closed at once to make room (a client that sends nothing holds
  nothing); when none is waiting (all are mid-request or streaming) the new
  connection is closed at once. Both are counted.
- A request head (and its body) must arrive within header_timeout_s of the
  connection or of its first byte (slowloris); a keep-alive connection with no
  next request is closed after idle_timeout_s. A streaming response (SSE) is
  never idle-closed, but counts toward the caps.
- Accept errors (EMFILE, ENFILE, ...) are counted, logged at most once per
  interval, and accepting pauses for accept_pause_s instead of spinning.
  asyncio's own accept loop logs a traceback for every attempt, up to 100 per
  wake-up, which is why listening sockets are served here and not by
  asyncio.start_server.
- Bodies are limited; malformed requests get the same JSON error body as every
  other error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

log = logging.getLogger("ksift.api")

_READ_SIZE = 64 * 1024
_MAX_HEAD = 16 * 1024  # request line + headers
_MAX_QUERY_FIELDS = 64
_ACCEPT_BATCH = 256  # accepts per wake-up (each is cheap), so a connection flood cannot hold the loop
# A full accept queue drops a newcomer's SYN and its client waits a whole second to send it again: a
# reconnecting flood must not fill it while the loop is busy for a moment (the kernel caps it at somaxconn).
_BACKLOG = 4096
_CLOSE_REASONS = ("over_cap", "evicted", "header_timeout", "idle_timeout")


@dataclass(frozen=True)
class Limits:
    max_connections: int = 512
    max_connections_per_peer: int = 256
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_body: int = 64 * 1024
    accept_pause_s: float = 0.2
    accept_log_interval_s: float = 60.0


class HttpError(Exception):
    """Raised by a handler: answered as {"error": message[, "parameter": ...]} with this status."""

    def __init__(self, status: int, message: str, *, parameter: str | None = None,
                 headers: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.parameter = parameter
        self.headers = list(headers)


def dumps(data: Any) -> str:
    # default=str: keys may be tuples, details may carry odd types; never fail a response on that.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)


class Response:
    def __init__(self, status: int = 200, body: bytes = b"", headers: Iterable[tuple[str, str]] = (),
                 content_type: str | None = None):
        self.status = status
        self.body = body
        self.headers = list(headers)
        if content_type is not None:
            self.headers.append(("Content-Type", content_type))

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class StreamResponse:
    """A response whose body is written chunk by chunk as `chunks` yields (SSE).

    on_close runs once the stream is over, whatever ended it (the client, the
    server, or a HEAD request that never started the iterator).
    """

    def __init__(self, chunks: AsyncIterator[bytes], status: int = 200, headers: Iterable[tuple[str, str]] = (),
                 on_close: Callable[[], None] | None = None):
        self.status = status
        self.chunks = chunks
        self.headers = list(headers)
        self.on_close = on_close


def json_response(data: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, dumps(data).encode(), headers, content_type="application/json; charset=utf-8")


def error_response(status: int, message: str, *, parameter: str | None = None,
                   headers: Iterable[tuple[str, str]] = ()) -> Response:
    body: dict[str, Any] = {"error": message}
    if parameter is not None:
        body["parameter"] = parameter
    return json_response(body, status, headers)


class Request:
    """One parsed request. `peer` is the client's address, None over a unix socket."""

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                 peer: str | None):
        self.method = method
        parts = urlsplit(target)
        self.path = unquote(parts.path, errors="replace") or "/"
        try:
            self.query: dict[str, list[str]] = parse_qs(parts.query, keep_blank_values=True,
                                                        max_num_fields=_MAX_QUERY_FIELDS)
        except ValueError:
            raise HttpError(400, f"too many query parameters (at most {_MAX_QUERY_FIELDS})") from None
        joined: dict[str, str] = {}
        for raw_name, raw_value in headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            joined[name] = f"{joined[name]}{'; ' if name == 'cookie' else ', '}{value}" if name in joined else value
        self.headers = joined  # lower-case names
        self.body = body
        self.peer = peer
        self.params: dict[str, str] = {}  # path parameters ({id}), set by the router

    @property
    def host(self) -> str:
        return self.headers.get("host", "")

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def cookie(self, name: str) -> str | None:
        for item in self.headers.get("cookie", "").split(";"):
            key, sep, value = item.strip().partition("=")
            if sep and key == name:
                return value
        return None

    def single(self, name: str) -> str | None:
        """A query parameter given at most once and not empty (stripped), or None when absent."""
        values = self.query.get(name, [])
        if not values:
            return None
        if len(values) > 1:
            raise HttpError(400, f"{name}: given {len(values)} times, expected once", parameter=name)
        if not values[0].strip():
            raise HttpError(400, f"{name}: empty value", parameter=name)
        return values[0].strip()


Handler = Callable[[Request], Awaitable["Response | StreamResponse"]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # segments in braces are parameters: /api/v1/alerts/{id}
    handler: Handler
    params: tuple[str, ...] = ()  # the query parameters it takes; any other is a 400


class Router:
    """Method + path routing; every route declares its query parameters.

    `openapi_paths` collects extra OpenAPI path items from whoever adds routes.
    """

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.openapi_paths: dict[str, Any] = {}

    def add(self, method: str, path: str, handler: Handler, params: Iterable[str] = ()) -> None:
        self.routes.append(Route(method.upper(), path, handler, tuple(params)))

    def get(self, path: str, handler: Handler, params: Iterable[str] = ()) -> None:
        self.add("GET", path, handler, params)

    def post(self, path: str, handler: Handler, params: Iterable[str] = ()) -> None:
        self.add("POST", path, handler, params)

    def resolve(self, request: Request) -> Route:
        """The route for this request (request.params filled in); HttpError 404 or 405."""
        allowed = False
        for route in self.routes:
            params = _match(route.path, request.path)
            if params is None:
                continue
            if route.method == request.method or (route.method == "GET" and request.method == "HEAD"):
                request.params = params
                return route
            allowed = True
        if allowed:
            raise HttpError(405, f"{request.method} is not allowed on {request.path}")
        raise HttpError(404, f"no such endpoint: {request.path} (see /openapi.json)")

    async def dispatch(self, request: Request) -> Response | StreamResponse:
        route = self.resolve(request)
        for name in request.query:
            if name not in route.params:
                allowed = f"allowed: {', '.join(route.params)}" if route.params else "this endpoint takes none"
                raise HttpError(400, f"unknown parameter {name!r} ({allowed})", parameter=name)
        return await route.handler(request)


def _match(pattern: str, path: str) -> dict[str, str] | None:
    want, got = pattern.split("/"), path.split("/")
    if len(want) != len(got):
        return None
    params = {}
    for w, g in zip(want, got):
        if w.startswith("{") and w.endswith("}"):
            if not g:
                return None
            params[w[1:-1]] = g
        elif w != g:
            return None
    return params


class _Closed(Exception):
    """The connection is over (timeout, eviction, the peer left): close without answering."""


class _Conn:
    """One connection. Until its first byte arrives it is only a socket watched by the loop (no
    task, no streams): a flood of connections that send nothing costs an accept and a close each."""

    __slots__ = ("sock", "peer", "opened", "task", "transport", "timer", "loop")

    def __init__(self, sock: socket.socket, peer: str | None, loop: asyncio.AbstractEventLoop):
        self.sock = sock
        self.peer = peer
        self.loop = loop
        self.opened = time.monotonic()
        self.task: asyncio.Task | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None  # the header timeout, while nothing has arrived

    def stop_watching(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.loop.remove_reader(self.sock.fileno())

    def abort(self) -> None:
        """Close the socket now (its fd is what the caps protect), then end its task."""
        self.stop_watching()
        if self.transport is not None:
            self.transport.abort()
        elif self.task is None:
            self.sock.close()
        # else its transport is being made: the cancelled task closes the socket once asyncio let go
        # of it (closing it here would free the fd number while the loop still watches it).
        if self.task is not None:
            self.task.cancel()


class HttpServer:
    """Serves `app` on TCP and unix sockets under `limits` (see the module docstring).

    app: the request handler (routing, auth, errors); whatever it raises as
    HttpError is answered in JSON, anything else is a 500. default_headers are
    added to every response that does not set them.
    """

    def __init__(self, app: Handler, limits: Limits = Limits(), *,
                 default_headers: Iterable[tuple[str, str]] = ()):
        self.app = app
        self.limits = limits
        self.default_headers = list(default_headers)
        self.closed = Counter({reason: 0 for reason in _CLOSE_REASONS})  # connections closed by the server, why
        self.accept_errors: Counter[str] = Counter()  # by errno name
        self._conns: dict[_Conn, None] = {}
        self._per_peer: Counter[str | None] = Counter()
        # Connections waiting for a request head, longest-waiting first (dicts keep insertion order).
        self._waiting: dict[_Conn, None] = {}
        self._waiting_of: dict[str | None, dict[_Conn, None]] = {}
        self._listeners: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accept_errors_logged_at = -1e9
        self._accept_errors_unlogged = 0
        self._closing = False

    # -- listening -------------------------------------------------------------

    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (OSError if it cannot); the bound (host, port)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=_BACKLOG)
        self._serve_listener(sock)
        return sock.getsockname()[:2]

    def listen_unix(self, path: str, mode: int = 0o600) -> None:
        """Listen on a unix socket at path, private (mode) before anyone can connect."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)  # before listen(): nobody connects while it is still open to all
            sock.listen(_BACKLOG)
        except OSError:
            sock.close()
            raise
        self._serve_listener(sock)

    def _serve_listener(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._listeners.append(sock)
        self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(listener, exc)
                return
            self._admit(sock, address[0] if listener.family != socket.AF_UNIX else None)

    def _accept_failed(self, listener: socket.socket, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.accept_errors[name] += 1
        self._accept_errors_unlogged += 1
        now = time.monotonic()
        if now - self._accept_errors_logged_at >= self.limits.accept_log_interval_s:
            log.warning("API: cannot accept connections: %s (%d accept error(s) since the last report; "
                        "accepting pauses %.1fs after each; see ksift_api_accept_errors_total)",
                        exc.strerror or name, self._accept_errors_unlogged, self.limits.accept_pause_s)
            self._accept_errors_logged_at = now
            self._accept_errors_unlogged = 0
        # The listening socket stays readable while the error lasts: stop watching it for a moment.
        assert self._loop is not None
        self._loop.remove_reader(listener.fileno())
        self._loop.call_later(self.limits.accept_pause_s, self._resume_accepting, listener)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if not self._closing and listener in self._listeners:
            assert self._loop is not None
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _admit(self, sock: socket.socket, peer: str | None) -> None:
        limits = self.limits
        victim: _Conn | None | bool = False  # False: room enough
        if len(self._conns) >= limits.max_connections:
            victim = self._victim(self._waiting)
        elif self._per_peer[peer] >= limits.max_connections_per_peer:
            victim = self._victim(self._waiting_of.get(peer, {}))
        if victim is None:
            self.closed["over_cap"] += 1
            sock.close()
            return
        if isinstance(victim, _Conn):
            self.closed["evicted"] += 1
            self._forget(victim)
            victim.abort()
        assert self._loop is not None
        conn = _Conn(sock, peer, self._loop)
        self._conns[conn] = None
        self._per_peer[peer] += 1
        self._wait(conn)
        sock.setblocking(False)
        conn.timer = self._loop.call_later(limits.header_timeout_s, self._expire, conn)
        self._loop.add_reader(sock.fileno(), self._first_data, conn)

    def _first_data(self, conn: _Conn) -> None:
        """The connection became readable (a request, or EOF): serve it from now on."""
        conn.stop_watching()
        assert self._loop is not None
        conn.task = self._loop.create_task(self._serve(conn))

    def _expire(self, conn: _Conn) -> None:
        """Nothing arrived within the header timeout."""
        conn.timer = None
        self._loop.remove_reader(conn.sock.fileno())  # type: ignore[union-attr]
        self.closed["header_timeout"] += 1
        self._forget(conn)
        conn.abort()

    @staticmethod
    def _victim(waiting: dict[_Conn, None]) -> _Conn | None:
        """The connection that has waited longest for a request head and has nothing unread: one whose
        request already arrived (accepted in the same burst, not served yet) is passed over."""
        for conn in itertools.islice(waiting, 16):
            if not _has_unread_data(conn.sock):
                return conn
        return None

    def _wait(self, conn: _Conn) -> None:
        """conn now waits for a request head: the newest of the waiting."""
        self._unwait(conn)
        self._waiting[conn] = None
        self._waiting_of.setdefault(conn.peer, {})[conn] = None

    def _unwait(self, conn: _Conn) -> None:
        if conn in self._waiting:
            del self._waiting[conn]
            of_peer = self._waiting_of[conn.peer]
            del of_peer[conn]
            if not of_peer:
                del self._waiting_of[conn.peer]

    def _forget(self, conn: _Conn) -> None:
        self._unwait(conn)
        if conn in self._conns:
            del self._conns[conn]
            self._per_peer[conn.peer] -= 1
            if not self._per_peer[conn.peer]:
                del self._per_peer[conn.peer]

    def stats(self) -> dict[str, Any]:
        return {"connections": len(self._conns), "max_connections": self.limits.max_connections,
                "closed": dict(self.closed), "accept_errors": dict(self.accept_errors)}

    async def close(self, grace_s: float = 2.0) -> None:
        """Stop listening, close waiting connections at once, give busy ones grace_s to finish."""
        self._closing = True
        for sock in self._listeners:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        for conn in list(self._waiting):
            conn.abort()
        tasks = [c.task for c in self._conns if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- one connection ----------------------------------------------------------

    async def _serve(self, conn: _Conn) -> None:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn.sock, limit=_READ_SIZE)
            conn.transport = writer.transport
            h = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
            first = True
            while not self._closing:
                if not first:
                    self._wait(conn)
                try:
                    request = await self._read_request(conn, h, reader, first)
                except HttpError as exc:  # malformed, too large, bad target
                    if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send(h, writer, error_response(exc.status, str(exc), parameter=exc.parameter),
                                         "GET", close=True)
                    return
                if request is None:
                    return
                response = await self._call_app(request)
                if isinstance(response, StreamResponse):
                    await self._stream(h, reader, writer, request, response)
                    return
                await self._send(h, writer, response, request.method)
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return  # the client asked to close (or HTTP/1.0)
                h.start_next_cycle()
                first = False
        except (_Closed, ConnectionError, TimeoutError, h11.LocalProtocolError):
            pass
        except Exception:
            log.exception("API: connection from %s failed", conn.peer or "the unix socket")
        finally:
            self._forget(conn)
            if writer is not None:
                writer.transport.abort()
            else:
                conn.sock.close()

    async def _read_request(self, conn: _Conn, h: h11.Connection, reader: asyncio.StreamReader,
                            first: bool) -> Request | None:
        """The next request with its body, or None when the client closed; HttpError when malformed."""
        limits = self.limits
        if first:
            deadline, reason = conn.opened + limits.header_timeout_s, "header_timeout"
        else:  # keep-alive: the next request may take idle_timeout_s to begin
            deadline, reason = time.monotonic() + limits.idle_timeout_s, "idle_timeout"
        head = None
        body = bytearray()
        try:
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    remaining = deadline - time.monotonic()
                    try:
                        if remaining <= 0:
                            raise TimeoutError
                        async with asyncio.timeout(remaining):
                            data = await reader.read(_READ_SIZE)
                    except TimeoutError:
                        self.closed[reason] += 1
                        raise _Closed from None
                    if data and reason == "idle_timeout":
                        # The next request began: its head (and body) must follow within the header timeout.
                        deadline, reason = time.monotonic() + limits.header_timeout_s, "header_timeout"
                    h.receive_data(data)
                elif isinstance(event, h11.Request):
                    head = event
                    # h11 bounds a head that arrives in pieces; this bounds one that came in a single read.
                    if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > _MAX_HEAD:
                        raise HttpError(431, f"request head larger than {_MAX_HEAD} bytes")
                    length = dict(event.headers).get(b"content-length")
                    if length is not None and int(length) > limits.max_body:
                        raise HttpError(413, f"request body larger than {limits.max_body} bytes")
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.max_body:
                        raise HttpError(413, f"request body larger than {limits.max_body} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    self._unwait(conn)  # busy now: never evicted mid-request
                    assert head is not None
                    return Request(head.method.decode("ascii"), head.target.decode("ascii"), head.headers,
                                   bytes(body), conn.peer)
                else:  # ConnectionClosed (or PAUSED, which cannot happen in this loop)
                    return None
        except h11.RemoteProtocolError as exc:
            raise HttpError(exc.error_status_hint, f"malformed request: {exc}") from None

    async def _call_app(self, request: Request) -> Response | StreamResponse:
        try:
            return await self.app(request)
        except HttpError as exc:
            return error_response(exc.status, str(exc), parameter=exc.parameter, headers=exc.headers)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("API: %s %s failed", request.method, request.path)
            return error_response(500, "internal error (logged by the agent)")

    def _head(self, status: int, headers: list[tuple[str, str]], extra: Iterable[tuple[str, str]]) -> h11.Response:
        given = {name.lower() for name, _ in headers}
        merged = headers + [(n, v) for n, v in extra if n.lower() not in given]
        merged += [(n, v) for n, v in self.default_headers if n.lower() not in given]
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=status, headers=merged, reason=reason)

    async def _send(self, h: h11.Connection, writer: asyncio.StreamWriter, response: Response, method: str,
                    close: bool = False) -> None:
        extra = [("Content-Length", str(len(response.body)))]
        if close:
            extra.append(("Connection", "close"))
        data = h.send(self._head(response.status, response.headers, extra))
        if method != "HEAD" and response.body:
            data += h.send(h11.Data(data=response.body))
        data += h.send(h11.EndOfMessage())
        writer.write(data)
        # A client that does not read its answer does not hold the connection for ever.
        async with asyncio.timeout(self.limits.idle_timeout_s):
            await writer.drain()

    async def _stream(self, h: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      request: Request, response: StreamResponse) -> None:
        try:
            writer.write(h.send(self._head(response.status, response.headers, ())))
            if request.method == "HEAD":
                writer.write(h.send(h11.EndOfMessage()))
                await writer.drain()
                return
            # The client leaving (EOF) ends the stream at once, even while no event is due.
            gone = asyncio.ensure_future(_until_eof(reader))
            pump = asyncio.ensure_future(self._pump(h, writer, response.chunks))
            try:
                await asyncio.wait((gone, pump), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (gone, pump):
                    task.cancel()
                await asyncio.gather(gone, pump, return_exceptions=True)
        finally:
            if response.on_close is not None:
                response.on_close()

    @staticmethod
    async def _pump(h: h11.Connection, writer: asyncio.StreamWriter, chunks: AsyncIterator[bytes]) -> None:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                writer.write(h.send(h11.Data(data=chunk)))
                await writer.drain()
        writer.write(h.send(h11.EndOfMessage()))
        await writer.drain()


def _has_unread_data(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing yet (EAGAIN), or a broken connection: either way nothing worth keeping
        return False


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(_READ_SIZE):
        pass  # a streaming client has nothing to say; whatever it sends is ignored
