"""The HTTP API, its SSE event stream, /metrics and the dashboard, in the agent's own loop.

`ApiServer` is a sink: the agent hands it every alert through `emit`, which
counts it (for the metrics) and pushes it to each SSE client's bounded queue.
A client that reads too slowly loses events (counted, and told with a `lost`
event) instead of ever slowing the agent down. The server itself is
ksift.interfaces.http's (asyncio + h11, bounded connections and timeouts),
started by `start()` when the agent's loop starts.

Other parts of ksift add routes through `route_providers` (callables taking
the http.Router), describing them in `router.openapi_paths`, and stream
their own events (remediation's "action") with `publish()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import hmac
import logging
import os
import re
import resource
import socket
import stat
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from ksift.errors import KsiftError, StoreError
from ksift.interfaces.http import (
    HttpError,
    HttpServer,
    Limits,
    Request,
    Response,
    Router,
    StreamResponse,
    dumps,
    error_response,
    json_response,
)
from ksift.interfaces.openapi import build_spec
from ksift.interfaces.settings import ApiSettings, is_loopback
from ksift.rules.model import SEVERITIES
from ksift.timeparse import parse_since, rfc3339

if TYPE_CHECKING:
    from ksift.agent import AgentView
    from ksift.store.sqlite import AlertStore

log = logging.getLogger("ksift.api")

# A route provider adds its routes to the router, and their OpenAPI path items to router.openapi_paths.
RouteProvider = Callable[[Router], None]

SESSION_COOKIE = "ksift_session"
MAX_LIMIT = 10_000
DEFAULT_LIMIT = 100
REPLAY_EVENTS = 256  # recent SSE events kept for clients that reconnect with Last-Event-ID
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_DASHBOARD_FILES = {  # route -> (file in ksift/interfaces/dashboard, content type)
    "/": ("index.html", "text/html"),
    "/dashboard/app.js": ("app.js", "text/javascript"),
    "/dashboard/style.css": ("style.css", "text/css"),
}
_ALERT_PARAMS = ("rule", "severity", "status", "since", "limit")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Answered without the token (docs/api.md, Authentication): liveness and readiness carry no alert data and
# probes (systemd, Kubernetes, a load balancer) must not need a secret; /login is where the token is given.
_OPEN_PATHS = ("/healthz", "/readyz", "/login")
# Answered without the token to clients on this host (loopback, the unix socket): counts and names of
# rules and sensors, never a command line, pid, user or path; a local Prometheus scrapes it as before.
_LOCAL_PATHS = ("/metrics",)
_LOGIN_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ksift: log in</title></head>
<body><h1>ksift</h1>
<form method="post" action="/login">
<label>API token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
<button type="submit">Log in</button>
</form>
<p>Without a configured token the agent makes one at first start: <code>api.token</code> next to its
alert store (for example <code>sudo cat /var/lib/ksift/api.token</code>), readable by root only.</p>
</body></html>
"""
# The dashboard loads nothing from elsewhere and runs no inline script.
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
)


class ApiStartError(KsiftError):
    """The API could not listen where it was told to (address in use, bad path...)."""


@dataclass(eq=False)
class Subscriber:
    """One SSE client: a bounded queue of encoded frames; None ends the stream."""

    queue: asyncio.Queue
    lost: int = 0  # events dropped because the queue was full
    reported_lost: int = 0  # how many of those the client has been told about

    def offer(self, frame: bytes) -> bool:
        try:
            self.queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            self.lost += 1
            return False

    def end(self) -> None:
        # The stream must end even when the queue is full: make room for the sentinel.
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self.queue.get_nowait()


def _bad(parameter: str, message: str) -> HttpError:
    return HttpError(400, message, parameter=parameter)


@dataclass(frozen=True)
class FdBudget:
    """How many connections the API may hold so that `reserve` open files stay for the funnel."""

    limit: int  # RLIMIT_NOFILE's soft limit
    in_use: int  # open files when the API starts
    connections: int


def connection_budget(wanted: int, reserve: int, *, limit: int | None = None,
                      in_use: int | None = None) -> FdBudget:
    """At most `wanted` connections, fewer if the open-file limit leaves less beside `reserve`.

    Each connection is one fd; the reserve is for what the funnel opens while it runs (BPF objects,
    /proc reads at alert time, the store, sinks), which a flood of clients must never take.
    """
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
    if in_use is None:
        in_use = len(os.listdir("/proc/self/fd"))
    room = limit - in_use - reserve
    if room < 1:
        raise ApiStartError(f"API cannot serve: the open-file limit is {limit}, {in_use} are in use and "
                            f"[api] fd_reserve keeps {reserve} for the funnel: raise LimitNOFILE (ulimit -n) "
                            "or lower fd_reserve")
    return FdBudget(limit, in_use, min(wanted, room))


def _package_version() -> str:
    # importlib.metadata (and the email package it parses metadata with, ~1.4 MiB resident) is
    # imported the first time something asks for the version, not by every agent at start.
    from importlib import metadata

    try:
        return metadata.version("ksift")
    except metadata.PackageNotFoundError:
        return "unknown"


class ApiServer:
    """A sink that serves the agent over HTTP (see the module docstring)."""

    name = "api"

    def __init__(self, settings: ApiSettings, store: AlertStore | None, *,
                 route_providers: Iterable[RouteProvider] = (), version: str | None = None,
                 clock: Callable[[], float] = time.time,
                 bpf_stats_enabled: Callable[[], bool] | None = None):
        self.settings = settings
        self.store = store
        self.route_providers: list[RouteProvider] = list(route_providers)
        self._version = version
        self.clock = clock
        self.bpf_stats_enabled = bpf_stats_enabled  # None: read kernel.bpf_stats_enabled
        self.delivered = 0
        self.failed = 0
        self.agent: AgentView | None = None
        self._registry = None  # prometheus registry, built at the first scrape
        # (status, rule, severity) -> alerts seen by emit(); the metrics read it.
        self.alert_counts: Counter[tuple[str, str, str]] = Counter()
        # Ids already counted: an alert sent again (its remediation decision changed) is streamed, not recounted.
        self._counted: OrderedDict[str, None] = OrderedDict()
        self.published = 0  # SSE events published
        self.lost = 0  # SSE events dropped for slow clients, all clients together
        self.addresses: list[str] = []  # where the server listens, once started
        self._subscribers: set[Subscriber] = set()
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_EVENTS)
        self._seq = 0
        self._server: HttpServer | None = None
        self._final_stats: dict[str, Any] | None = None
        self._router = Router()  # built by start(), once every provider is known
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._started_mono: float | None = None
        self._started_wall: float | None = None
        self._created_socket: str | None = None
        self._session = (hmac.new(settings.token.encode(), b"ksift dashboard session", hashlib.sha256).hexdigest()
                         if settings.token else None)

    # -- the sink side -------------------------------------------------------

    @property
    def version(self) -> str:
        """ksift's version, read at its first use (status, metrics, the OpenAPI spec)."""
        if self._version is None:
            self._version = _package_version()
        return self._version

    def bind(self, agent: AgentView) -> None:
        """Called by the Agent it serves, with its view (the API reads it at request time)."""
        self.agent = agent
        self._registry = None

    @property
    def registry(self):
        """This agent's Prometheus registry (None before bind), made at the first scrape:
        prometheus_client (2-3 MiB resident) is imported only once something reads the metrics."""
        if self._registry is None and self.agent is not None:
            from ksift.interfaces.metrics import build_registry, read_bpf_stats_enabled

            self._registry = build_registry(self.agent, lambda: dict(self.alert_counts), self.sse_stats,
                                            self.version, self.bpf_stats_enabled or read_bpf_stats_enabled,
                                            server_stats=self.server_stats)
        return self._registry

    def emit(self, alert: dict[str, Any]) -> None:
        try:
            if self._first_time(str(alert.get("id"))):
                self.alert_counts[(str(alert.get("status")), str(alert.get("rule")), str(alert.get("severity")))] += 1
                if alert.get("degraded"):  # /metrics: ksift_alerts_degraded_total
                    self.alert_counts[("degraded", str(alert.get("rule")), str(alert.get("severity")))] += 1
            self.publish("alert", alert)
        except Exception:
            self.failed += 1
            log.exception("api: could not publish alert %s", alert.get("id") if isinstance(alert, dict) else "?")
        else:
            self.delivered += 1

    def _first_time(self, alert_id: str, remember: int = 4096) -> bool:
        """Whether this alert id is new here (the newest `remember` ids are kept)."""
        if alert_id in self._counted:
            return False
        self._counted[alert_id] = None
        if len(self._counted) > remember:
            self._counted.popitem(last=False)
        return True

    def publish(self, event_type: str, data: Any) -> None:
        """Stream one event to every SSE client; never blocks, never raises for a slow client.

        Safe from any thread: from outside the loop it hops into it.
        """
        if not _EVENT_TYPE.fullmatch(event_type):
            raise ValueError(f"invalid SSE event type {event_type!r}: lowercase letters, digits, _ . -")
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread and not loop.is_closed():
            loop.call_soon_threadsafe(self._publish, event_type, data)
            return
        self._publish(event_type, data)

    def _publish(self, event_type: str, data: Any) -> None:
        self._seq += 1
        # JSON never contains a raw newline, so one data line carries the whole event.
        frame = f"id: {self._seq}\nevent: {event_type}\ndata: {dumps(data)}\n\n".encode()
        self._recent.append((self._seq, frame))
        self.published += 1
        for sub in list(self._subscribers):
            if not sub.offer(frame):
                self.lost += 1

    def subscribe(self) -> Subscriber:
        """A new SSE client's queue (public so tests and embedders can observe the stream)."""
        sub = Subscriber(asyncio.Queue(maxsize=self.settings.sse_queue))
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def sse_stats(self) -> dict[str, int]:
        return {"clients": len(self._subscribers), "published": self.published, "lost": self.lost}

    def close(self) -> None:
        for sub in list(self._subscribers):
            sub.end()
        self._subscribers.clear()

    # -- the server side -----------------------------------------------------

    async def start(self) -> None:
        """Listen on the configured TCP address and/or unix socket; ApiStartError if it cannot."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        budget = connection_budget(self.settings.max_connections, self.settings.fd_reserve)
        limits = Limits(max_connections=budget.connections,
                        max_connections_per_peer=min(self.settings.max_connections_per_peer, budget.connections),
                        header_timeout_s=self.settings.header_timeout_s, idle_timeout_s=self.settings.idle_timeout_s)
        self._router = self.build_router()
        server = HttpServer(self._handle, limits, default_headers=_SECURITY_HEADERS)
        where = ""
        addresses = []
        try:
            if self.settings.host is not None:
                where = self.settings.listen
                host, port = server.listen_tcp(self.settings.host, self.settings.port or 0)
                addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            if self.settings.unix_socket is not None:
                where = self.settings.unix_socket
                self._check_socket_free(where)
                server.listen_unix(where, 0o600)  # alerts carry command lines: owner only
                self._created_socket = where
                addresses.append(f"unix:{where}")
        except (OSError, ApiStartError) as exc:
            await server.close()
            self._remove_socket()
            if isinstance(exc, ApiStartError):
                raise
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (is another ksift running? choose another with [api] listen or --api HOST:PORT, " \
                   "or --api off)" if exc.errno == errno.EADDRINUSE else ""
            raise ApiStartError(f"API cannot listen on {where}: {reason.lower()}{hint}") from None
        self._server = server
        self._started_mono = time.monotonic()
        self._started_wall = self.clock()
        self.addresses = addresses
        log.info("API, metrics and dashboard on %s%s", ", ".join(self.addresses),
                 " (token required)" if self.settings.token else "")
        log.info("API: at most %d connections, %d per peer address (open files: limit %d, %d in use, "
                 "%d kept for the funnel); request head within %gs, idle keep-alive %gs",
                 limits.max_connections, limits.max_connections_per_peer, budget.limit, budget.in_use,
                 self.settings.fd_reserve, limits.header_timeout_s, limits.idle_timeout_s)

    async def stop(self) -> None:
        self.close()  # end every SSE stream so shutdown does not wait for them
        server, self._server = self._server, None
        if server is not None:
            self._final_stats = server.stats()
            await server.close()
        self._remove_socket()

    def server_stats(self) -> dict[str, Any]:
        """Connections and what the server closed, for the metrics (zeros before start)."""
        if self._server is not None:
            return self._server.stats()
        return self._final_stats or {"connections": 0, "max_connections": 0, "closed": {}, "accept_errors": {}}

    @property
    def urls(self) -> list[str]:
        """http:// base URLs of the TCP listeners (tests, logs)."""
        return [f"http://{a}" for a in self.addresses if not a.startswith("unix:")]

    @staticmethod
    def _check_socket_free(path: str) -> None:
        # A stale socket file must be removed before bind; never steal a live agent's socket.
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise ApiStartError(f"API cannot listen on {path}: a file that is not a socket is in the way")
        except FileNotFoundError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens
                return
        raise ApiStartError(f"API cannot listen on {path}: another process is serving on it")

    def _remove_socket(self) -> None:
        path, self._created_socket = self._created_socket, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def build_router(self) -> Router:
        """Every route (with the query parameters it takes), the providers' routes too."""
        r = Router()
        r.get("/healthz", self._healthz)
        r.get("/readyz", self._readyz)
        r.get("/api/v1/alerts", self._alerts, params=_ALERT_PARAMS)
        r.get("/api/v1/alerts/{id}", self._alert)
        r.get("/api/v1/incidents", self._incidents)
        r.get("/api/v1/events", self._events)
        r.get("/api/v1/funnel", self._funnel)
        r.get("/api/v1/status", self._status)
        r.get("/openapi.json", self._openapi)
        r.get("/metrics", self._metrics)
        r.post("/login", self._login)
        for route, (filename, content_type) in _DASHBOARD_FILES.items():
            # "/" takes ?token= (the dashboard login, answered before routing).
            r.get(route, functools.partial(self._dashboard_file, filename, content_type),
                  params=("token",) if route == "/" else ())
        for provider in self.route_providers:
            provider(r)
        return r

    # -- access control ------------------------------------------------------

    async def _handle(self, request: Request) -> Response | StreamResponse:
        """Every request: access control, then the route; errors become JSON."""
        local_and_open = request.path in _LOCAL_PATHS and self._from_this_host(request)
        if request.path not in _OPEN_PATHS and not local_and_open:
            if self.settings.token:
                if request.path == "/" and "token" in request.query:
                    return self._dashboard_login(request, request.single("token") or "")
                if not self._authorized(request):
                    if request.path == "/" and request.method in ("GET", "HEAD"):  # a browser: the login form
                        return Response(401, _LOGIN_PAGE, [("WWW-Authenticate", 'Bearer realm="ksift"'),
                                                           ("Cache-Control", "no-store")],
                                        content_type="text/html; charset=utf-8")
                    return json_response({"error": "authentication required: send Authorization: Bearer <token>"},
                                         status=401, headers=[("WWW-Authenticate", 'Bearer realm="ksift"')])
            elif not self._host_allowed(request):
                return self._foreign_host(request)
        elif local_and_open and not self._host_allowed(request):
            return self._foreign_host(request)
        try:
            return await self._router.dispatch(request)
        except StoreError as exc:
            log.warning("api: alert store: %s", exc)
            return error_response(503, f"alert store unavailable: {exc}")

    def _authorized(self, request: Request) -> bool:
        token = self.settings.token
        assert token is not None and self._session is not None
        scheme, _, value = request.header("Authorization").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
        cookie = request.cookie(SESSION_COOKIE) or ""
        if cookie and hmac.compare_digest(cookie.encode(), self._session.encode()):
            # A cookie is sent by the browser on its own: for actions, also require our own origin.
            return request.method in _SAFE_METHODS or request.header("Origin") == f"http://{request.host}"
        return False

    @staticmethod
    def _foreign_host(request: Request) -> Response:
        # Without a token only loopback clients get here; a foreign Host header means a web
        # page re-pointed its own name at 127.0.0.1 (DNS rebinding) to read the API.
        return error_response(403, f"Host {request.host!r} is not allowed: use 127.0.0.1 or localhost")

    @staticmethod
    def _from_this_host(request: Request) -> bool:
        return request.peer is None or is_loopback(request.peer)

    async def _login(self, request: Request) -> Response:
        """POST /login (the login form: token=T): the token for the session cookie."""
        if not self.settings.token:
            raise HttpError(404, "no token is configured: there is nothing to log in to")
        values = parse_qs(request.body.decode("utf-8", "replace")).get("token", [""])
        return self._dashboard_login(request, values[0].strip())

    def _dashboard_login(self, request: Request, token: str) -> Response:
        """The token given once (GET /?token=T or the login form) traded for a session cookie: a browser
        cannot send headers with EventSource."""
        assert self.settings.token is not None and self._session is not None
        if not hmac.compare_digest(token.encode(), self.settings.token.encode()):
            return error_response(401, "wrong token")
        # 303 to /: the token leaves the address bar and the history.
        return Response(303, headers=[("Location", "/"), ("Cache-Control", "no-store"),
                                      ("Set-Cookie", f"{SESSION_COOKIE}={self._session}; HttpOnly; Path=/; "
                                                     "SameSite=Strict")])

    def _host_allowed(self, request: Request) -> bool:
        if request.peer is None:  # the unix socket
            return True
        host = request.host
        if host.startswith("["):
            host = host[1:host.find("]")]
        else:
            host = host.rpartition(":")[0] if host.count(":") == 1 else host
        return is_loopback(host) or host == self.settings.host

    # -- handlers ------------------------------------------------------------

    def _need_agent(self) -> AgentView:
        if self.agent is None:
            raise HttpError(503, "the API is not bound to an agent")
        return self.agent

    async def _healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        agent = self.agent
        if agent is None:
            return json_response({"ready": False, "reason": "the API is not bound to an agent"}, status=503)
        reasons = []
        if not agent.ready:
            reasons.append("the agent loop is not running (starting or stopping)")
        sensors = agent.sensors()
        for sensor in sensors:
            if not sensor.attached:
                reasons.append(f"sensor {sensor.name} has no program attached")
        reasons += agent.sink_problems()  # e.g. an alert store that refuses writes
        if reasons:
            return json_response({"ready": False, "reason": "; ".join(reasons)}, status=503)
        return json_response({"ready": True, "sensors": [s.name for s in sensors]})

    async def _alerts(self, request: Request) -> Response:
        if self.store is None:
            return error_response(503, "this agent has no alert store")
        rule = request.single("rule")
        severity = request.single("severity")
        severities = None
        if severity is not None:
            if severity not in SEVERITIES:
                raise _bad("severity", f"severity: invalid value {severity!r} "
                                              f"(expected one of: {', '.join(SEVERITIES)})")
            severities = SEVERITIES[SEVERITIES.index(severity):]  # "at least"
        status = request.single("status")
        if status is not None and status not in ("open", "resolved"):
            raise _bad("status", f"status: invalid value {status!r} (expected open or resolved)")
        since = None
        if (since_text := request.single("since")) is not None:
            try:
                since = parse_since(since_text, datetime.fromtimestamp(self.clock(), timezone.utc))
            except ValueError as exc:
                raise _bad("since", f"since: {exc}") from None
        limit = DEFAULT_LIMIT
        if (limit_text := request.single("limit")) is not None:
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
                raise _bad("limit", f"limit: invalid value {limit_text!r} "
                                           f"(expected a whole number from 1 to {MAX_LIMIT})")
            limit = int(limit_text)
        # sqlite work leaves the loop so a large query never delays a tick.
        rows = await asyncio.to_thread(self.store.list, since=since, rule=rule, status=status,
                                       severities=severities, limit=limit)
        return json_response({"alerts": rows, "count": len(rows)})

    async def _alert(self, request: Request) -> Response:
        if self.store is None:
            return error_response(503, "this agent has no alert store")
        alert_id = request.params["id"]
        if len(alert_id) > 128:
            raise _bad("id", "id: longer than 128 characters")
        alert = await asyncio.to_thread(self.store.get, alert_id)
        if alert is None:
            return error_response(404, f"no alert with id {alert_id!r}")
        return json_response(alert)

    async def _incidents(self, request: Request) -> Response:
        agent = self._need_agent()
        incidents = [self._incident_view(agent, inc) for inc in agent.open_incidents()]
        incidents.sort(key=lambda i: i["opened_at"], reverse=True)
        return json_response({"incidents": incidents, "count": len(incidents)})

    @staticmethod
    def _incident_view(agent: AgentView, inc) -> dict[str, Any]:
        from ksift.alerts import generic_summary

        summary = None
        try:
            summary = agent.summarize(inc, "open")
        except Exception:
            log.exception("api: summarizing incident %s failed", inc.id)
        key = list(inc.key) if isinstance(inc.key, tuple) else inc.key
        task = inc.task
        subject = inc.context.get("subject") or {"pid": task.tgid, "ppid": task.ppid, "comm": task.comm,
                                                 "exe": task.exe or None, "uid": task.uid,
                                                 "cgroup_id": task.cgroup_id}
        wall_of = agent.wall_of
        return {
            "incident_id": inc.id,
            "rule": inc.rule.name,
            "severity": str(inc.rule.severity),
            "key": key,
            "summary": summary or generic_summary(inc, "open"),
            "opened_at": rfc3339(wall_of(inc.opened_ns)),
            "started_at": rfc3339(wall_of(inc.first_window_ns)),
            "count": inc.count,
            "peak_window_count": inc.peak_window_count,
            "crossings": inc.crossings,
            "suppressed": inc.suppressed,
            "window_s": inc.rule.window_s,
            "threshold": inc.rule.threshold,
            "degraded": {"records_lost": inc.records_lost} if inc.records_lost else None,
            "subject": subject,
            "ancestry": inc.context.get("ancestry") or [{"pid": p, "comm": c} for p, c in task.ancestry],
            "details": dict(inc.details) or None,
        }

    async def _events(self, request: Request) -> StreamResponse:
        sub = self.subscribe()
        last_id = request.header("Last-Event-ID")
        return StreamResponse(self._event_frames(sub, last_id), on_close=functools.partial(self.unsubscribe, sub),
                              headers=[("Content-Type", "text/event-stream; charset=utf-8"),
                                       ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")])

    async def _event_frames(self, sub: Subscriber, last_id: str) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n: ksift event stream\n\n"
        if last_id.isdigit():  # a reconnecting EventSource: replay what it missed, if we still have it
            for seq, frame in list(self._recent):
                if seq > int(last_id):
                    yield frame
        while True:
            try:
                async with asyncio.timeout(self.settings.heartbeat_s):
                    frame = await sub.queue.get()
            except TimeoutError:
                frame = b": heartbeat\n\n"
            if frame is None:
                return  # the server is stopping
            if sub.lost > sub.reported_lost:
                missed, sub.reported_lost = sub.lost - sub.reported_lost, sub.lost
                yield f"event: lost\ndata: {dumps({'lost': missed})}\n\n".encode()
            yield frame

    async def _funnel(self, request: Request) -> Response:
        agent = self._need_agent()
        report = agent.funnel_report()
        kernel = report.get("kernel", {})
        report["summary"] = {
            # Each sensor counts the events its programs ran on as <event>_seen.
            "kernel_events": sum(v for counters in kernel.values() for k, v in counters.items()
                                 if k.endswith("_seen")),
            "records_emitted": report.get("transport", {}).get("kernel_emitted", 0),
            "records_dropped": report.get("transport", {}).get("kernel_dropped", 0),
            "records_read": report.get("transport", {}).get("records_read", 0),
            "alerts_opened": report.get("alerts", {}).get("open", 0),
            "alerts_resolved": report.get("alerts", {}).get("resolved", 0),
            "open_incidents": report.get("rules", {}).get("open_incidents", 0),
        }
        report["ts"] = self.clock()
        report["uptime_s"] = self._uptime()
        return json_response(report)

    def _uptime(self) -> float | None:
        return None if self._started_mono is None else round(time.monotonic() - self._started_mono, 3)

    async def _status(self, request: Request) -> Response:
        agent = self._need_agent()
        sensors = []
        for sensor in agent.sensors():
            sensors.append({"name": sensor.name, "object": sensor.object_file,
                            "rules": list(sensor.rules), "attached": list(sensor.attached)})
        rules = [{"name": r.name, "enabled": r.enabled, "signal": r.signal, "key": r.key,
                  "severity": str(r.severity), "threshold": r.threshold, "window_s": r.window_s,
                  "sustain_s": r.sustain_s, "cooldown_s": r.cooldown_s, "description": r.description}
                 for r in agent.rules.rules]
        return json_response({
            "version": self.version,
            "pid": os.getpid(),
            "ready": agent.ready,
            "started_at": rfc3339(self._started_wall) if self._started_wall is not None else None,
            "uptime_s": self._uptime(),
            "rules_source": agent.rules.source,
            "rules": rules,
            "sensors": sensors,
            "api": {"listen": self.addresses, "auth": "token" if self.settings.token else "none (loopback only)",
                    "sse_clients": len(self._subscribers)},
        })

    async def _openapi(self, request: Request) -> Response:
        spec = build_spec(self.version, self._router.openapi_paths, token_required=bool(self.settings.token))
        return json_response(spec)

    async def _metrics(self, request: Request) -> Response:
        self._need_agent()
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        return Response(body=body, content_type=CONTENT_TYPE_LATEST)

    async def _dashboard_file(self, filename: str, content_type: str, request: Request) -> Response:
        try:
            body = resources.files("ksift.interfaces").joinpath("dashboard", filename).read_bytes()
        except OSError:
            log.error("api: dashboard file %s is missing from the installed package", filename)
            return error_response(503, f"dashboard file {filename} is missing from this installation")
        return Response(body=body, content_type=f"{content_type}; charset=utf-8",
                        headers=[("Cache-Control", "no-cache")])

