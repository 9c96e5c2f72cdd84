"""The HTTP API, its SSE event stream, /metrics and the dashboard, in the agent's own loop.

`ApiServer` is a sink: the agent hands it every alert through `emit`, which
counts it (for the metrics) and pushes it to each SSE client's bounded queue.
A client that reads too slowly loses events (counted, and told with a `lost`
event) instead of ever slowing the agent down. The server itself is an
aiohttp AppRunner started by `start()` when the agent's loop starts.

Other parts of ksift add routes through `route_providers` (callables taking
the aiohttp Application), describing them in `app[OPENAPI_PATHS]`, and stream
their own events (remediation's "action") with `publish()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata, resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ksift.errors import KsiftError, StoreError
from ksift.interfaces.metrics import build_registry, read_bpf_stats_enabled
from ksift.interfaces.openapi import build_spec
from ksift.interfaces.settings import ApiSettings, is_loopback
from ksift.rules.model import SEVERITIES
from ksift.timeparse import parse_since, rfc3339

if TYPE_CHECKING:
    from ksift.agent import AgentView
    from ksift.store.sqlite import AlertStore

log = logging.getLogger("ksift.api")

# Extra OpenAPI path items that route providers register for their routes.
OPENAPI_PATHS = web.AppKey("ksift_openapi_paths", dict)

RouteProvider = Callable[[web.Application], None]

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
# The dashboard loads nothing from elsewhere and runs no inline script.
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
}


class ApiStartError(KsiftError):
    """The API could not listen where it was told to (address in use, bad path...)."""


class _BadRequest(Exception):
    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        super().__init__(message)


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


def _dumps(data: Any) -> str:
    # default=str: keys may be tuples, details may carry odd types; never fail a response on that.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)


def _json(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


def _package_version() -> str:
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
                 bpf_stats_enabled: Callable[[], bool] = read_bpf_stats_enabled):
        self.settings = settings
        self.store = store
        self.route_providers: list[RouteProvider] = list(route_providers)
        self.version = version or _package_version()
        self.clock = clock
        self.bpf_stats_enabled = bpf_stats_enabled
        self.delivered = 0
        self.failed = 0
        self.agent: AgentView | None = None
        self.registry = None  # prometheus registry, built in bind()
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
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._started_mono: float | None = None
        self._started_wall: float | None = None
        self._created_socket: str | None = None
        self._session = (hmac.new(settings.token.encode(), b"ksift dashboard session", hashlib.sha256).hexdigest()
                         if settings.token else None)

    # -- the sink side -------------------------------------------------------

    def bind(self, agent: AgentView) -> None:
        """Called by the Agent it serves, with its view (the API reads it at request time)."""
        self.agent = agent
        self.registry = build_registry(agent, lambda: dict(self.alert_counts), self.sse_stats, self.version,
                                       self.bpf_stats_enabled)

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
        frame = f"id: {self._seq}\nevent: {event_type}\ndata: {_dumps(data)}\n\n".encode()
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
        runner = web.AppRunner(self.build_app(), handle_signals=False, access_log=None,
                               handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        where = ""
        try:
            if self.settings.host is not None:
                where = self.settings.listen
                await web.TCPSite(runner, self.settings.host, self.settings.port).start()
            if self.settings.unix_socket is not None:
                where = self.settings.unix_socket
                self._check_socket_free(where)
                await web.UnixSite(runner, where).start()
                self._created_socket = where
                os.chmod(where, 0o600)  # alerts carry command lines: owner only
        except (OSError, ApiStartError) as exc:
            await runner.cleanup()
            self._remove_socket()
            if isinstance(exc, ApiStartError):
                raise
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (is another ksift running? choose another with [api] listen or --api HOST:PORT, " \
                   "or --api off)" if exc.errno == errno.EADDRINUSE else ""
            raise ApiStartError(f"API cannot listen on {where}: {reason.lower()}{hint}") from None
        self._runner = runner
        self._started_mono = time.monotonic()
        self._started_wall = self.clock()
        self.addresses = [self._format_address(a) for a in runner.addresses]
        log.info("API, metrics and dashboard on %s%s", ", ".join(self.addresses),
                 " (token required)" if self.settings.token else "")

    async def stop(self) -> None:
        self.close()  # end every SSE stream so shutdown does not wait for them
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._remove_socket()

    @property
    def urls(self) -> list[str]:
        """http:// base URLs of the TCP listeners (tests, logs)."""
        return [f"http://{a}" for a in self.addresses if not a.startswith("unix:")]

    @staticmethod
    def _format_address(address: Any) -> str:
        if isinstance(address, str):
            return f"unix:{address}"
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @staticmethod
    def _check_socket_free(path: str) -> None:
        # asyncio replaces an existing socket file blindly; do not steal a live agent's socket.
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
                return  # stale: nobody listens
        raise ApiStartError(f"API cannot listen on {path}: another process is serving on it")

    def _remove_socket(self) -> None:
        path, self._created_socket = self._created_socket, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def build_app(self) -> web.Application:
        """The aiohttp application: every route, the auth middleware, the providers' routes."""
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app[OPENAPI_PATHS] = {}
        r = app.router
        r.add_get("/healthz", self._healthz)
        r.add_get("/readyz", self._readyz)
        r.add_get("/api/v1/alerts", self._alerts)
        r.add_get("/api/v1/alerts/{id}", self._alert)
        r.add_get("/api/v1/incidents", self._incidents)
        r.add_get("/api/v1/events", self._events)
        r.add_get("/api/v1/funnel", self._funnel)
        r.add_get("/api/v1/status", self._status)
        r.add_get("/openapi.json", self._openapi)
        r.add_get("/metrics", self._metrics)
        for route, (filename, content_type) in _DASHBOARD_FILES.items():
            r.add_get(route, functools.partial(self._dashboard_file, filename, content_type))
        for provider in self.route_providers:
            provider(app)
        app.on_response_prepare.append(self._add_security_headers)
        return app

    # -- access control ------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path != "/healthz":
            if self.settings.token:
                if request.path == "/" and "token" in request.query:
                    return self._dashboard_login(request)
                if not self._authorized(request):
                    return _json({"error": "authentication required: send Authorization: Bearer <token>"},
                                 status=401, headers={"WWW-Authenticate": 'Bearer realm="ksift"'})
            elif not self._host_allowed(request):
                # Without a token only loopback clients get here; a foreign Host header means a web
                # page re-pointed its own name at 127.0.0.1 (DNS rebinding) to read the API.
                return _error(403, f"Host {request.host!r} is not allowed: use 127.0.0.1 or localhost")
        try:
            return await handler(request)
        except _BadRequest as exc:
            return _error(400, str(exc), parameter=exc.parameter)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                return _error(404, f"no such endpoint: {request.path} (see /openapi.json)")
            if exc.status == 405:
                return _error(405, f"{request.method} is not allowed on {request.path}")
            return _error(exc.status, exc.reason)
        except StoreError as exc:
            log.warning("api: alert store: %s", exc)
            return _error(503, f"alert store unavailable: {exc}")
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("api: %s %s failed", request.method, request.path)
            return _error(500, "internal error (logged by the agent)")

    def _authorized(self, request: web.Request) -> bool:
        token = self.settings.token
        assert token is not None and self._session is not None
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self._session.encode()):
            # A cookie is sent by the browser on its own: for actions, also require our own origin.
            return request.method in _SAFE_METHODS or \
                request.headers.get("Origin") == f"{request.scheme}://{request.host}"
        return False

    def _dashboard_login(self, request: web.Request) -> web.StreamResponse:
        """GET /?token=T: a browser cannot send headers with EventSource, so trade the token for a cookie."""
        assert self.settings.token is not None and self._session is not None
        if not hmac.compare_digest(request.query["token"].encode(), self.settings.token.encode()):
            return _error(401, "wrong token")
        # 303 to /: the token leaves the address bar and the history.
        response = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        response.set_cookie(SESSION_COOKIE, self._session, httponly=True, samesite="Strict", path="/")
        return response

    def _host_allowed(self, request: web.Request) -> bool:
        if self._via_unix_socket(request):
            return True
        host = request.host
        if host.startswith("["):
            host = host[1:host.find("]")]
        else:
            host = host.rpartition(":")[0] if host.count(":") == 1 else host
        return is_loopback(host) or host == self.settings.host

    @staticmethod
    def _via_unix_socket(request: web.Request) -> bool:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        return sock is not None and sock.family == socket.AF_UNIX

    @staticmethod
    async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)

    # -- handlers ------------------------------------------------------------

    def _need_agent(self) -> AgentView:
        if self.agent is None:
            raise web.HTTPServiceUnavailable(reason="the API is not bound to an agent")
        return self.agent

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        agent = self.agent
        if agent is None:
            return _json({"ready": False, "reason": "the API is not bound to an agent"}, status=503)
        reasons = []
        if not agent.ready:
            reasons.append("the agent loop is not running (starting or stopping)")
        sensors = agent.sensors()
        for sensor in sensors:
            if not sensor.attached:
                reasons.append(f"sensor {sensor.name} has no program attached")
        reasons += agent.sink_problems()  # e.g. an alert store that refuses writes
        if reasons:
            return _json({"ready": False, "reason": "; ".join(reasons)}, status=503)
        return _json({"ready": True, "sensors": [s.name for s in sensors]})

    async def _alerts(self, request: web.Request) -> web.Response:
        if self.store is None:
            return _error(503, "this agent has no alert store")
        query = request.query
        for name in query:
            if name not in _ALERT_PARAMS:
                raise _BadRequest(name, f"unknown parameter {name!r} (allowed: {', '.join(_ALERT_PARAMS)})")
        rule = self._single(query, "rule")
        severity = self._single(query, "severity")
        severities = None
        if severity is not None:
            if severity not in SEVERITIES:
                raise _BadRequest("severity", f"severity: invalid value {severity!r} "
                                              f"(expected one of: {', '.join(SEVERITIES)})")
            severities = SEVERITIES[SEVERITIES.index(severity):]  # "at least"
        status = self._single(query, "status")
        if status is not None and status not in ("open", "resolved"):
            raise _BadRequest("status", f"status: invalid value {status!r} (expected open or resolved)")
        since = None
        if (since_text := self._single(query, "since")) is not None:
            try:
                since = parse_since(since_text, datetime.fromtimestamp(self.clock(), timezone.utc))
            except ValueError as exc:
                raise _BadRequest("since", f"since: {exc}") from None
        limit = DEFAULT_LIMIT
        if (limit_text := self._single(query, "limit")) is not None:
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
                raise _BadRequest("limit", f"limit: invalid value {limit_text!r} "
                                           f"(expected a whole number from 1 to {MAX_LIMIT})")
            limit = int(limit_text)
        # sqlite work leaves the loop so a large query never delays a tick.
        rows = await asyncio.to_thread(self.store.list, since=since, rule=rule, status=status,
                                       severities=severities, limit=limit)
        return _json({"alerts": rows, "count": len(rows)})

    @staticmethod
    def _single(query, name: str) -> str | None:
        values = query.getall(name, [])
        if not values:
            return None
        if len(values) > 1:
            raise _BadRequest(name, f"{name}: given {len(values)} times, expected once")
        if not values[0].strip():
            raise _BadRequest(name, f"{name}: empty value")
        return values[0].strip()

    async def _alert(self, request: web.Request) -> web.Response:
        if self.store is None:
            return _error(503, "this agent has no alert store")
        alert_id = request.match_info["id"]
        if len(alert_id) > 128:
            raise _BadRequest("id", "id: longer than 128 characters")
        alert = await asyncio.to_thread(self.store.get, alert_id)
        if alert is None:
            return _error(404, f"no alert with id {alert_id!r}")
        return _json(alert)

    async def _incidents(self, request: web.Request) -> web.Response:
        agent = self._need_agent()
        incidents = [self._incident_view(agent, inc) for inc in agent.open_incidents()]
        incidents.sort(key=lambda i: i["opened_at"], reverse=True)
        return _json({"incidents": incidents, "count": len(incidents)})

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

    async def _events(self, request: web.Request) -> web.StreamResponse:
        sub = self.subscribe()
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                   "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await response.prepare(request)
            await response.write(b"retry: 2000\n: ksift event stream\n\n")
            last_id = request.headers.get("Last-Event-ID", "")
            if last_id.isdigit():  # a reconnecting EventSource: replay what it missed, if we still have it
                for seq, frame in list(self._recent):
                    if seq > int(last_id):
                        await response.write(frame)
            while True:
                try:
                    async with asyncio.timeout(self.settings.heartbeat_s):
                        frame = await sub.queue.get()
                except TimeoutError:
                    frame = b": heartbeat\n\n"
                if frame is None:
                    break  # the server is stopping
                if sub.lost > sub.reported_lost:
                    missed, sub.reported_lost = sub.lost - sub.reported_lost, sub.lost
                    await response.write(f"event: lost\ndata: {_dumps({'lost': missed})}\n\n".encode())
                await response.write(frame)
        except ConnectionError:
            pass  # the client went away; nothing to tell it
        finally:
            self.unsubscribe(sub)
        return response

    async def _funnel(self, request: web.Request) -> web.Response:
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
        return _json(report)

    def _uptime(self) -> float | None:
        return None if self._started_mono is None else round(time.monotonic() - self._started_mono, 3)

    async def _status(self, request: web.Request) -> web.Response:
        agent = self._need_agent()
        sensors = []
        for sensor in agent.sensors():
            sensors.append({"name": sensor.name, "object": sensor.object_file,
                            "rules": list(sensor.rules), "attached": list(sensor.attached)})
        rules = [{"name": r.name, "enabled": r.enabled, "signal": r.signal, "key": r.key,
                  "severity": str(r.severity), "threshold": r.threshold, "window_s": r.window_s,
                  "sustain_s": r.sustain_s, "cooldown_s": r.cooldown_s, "description": r.description}
                 for r in agent.rules.rules]
        return _json({
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

    async def _openapi(self, request: web.Request) -> web.Response:
        return _json(build_spec(self.version, request.app[OPENAPI_PATHS], token_required=bool(self.settings.token)))

    async def _metrics(self, request: web.Request) -> web.Response:
        self._need_agent()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _dashboard_file(self, filename: str, content_type: str, request: web.Request) -> web.Response:
        try:
            body = resources.files("ksift.interfaces").joinpath("dashboard", filename).read_bytes()
        except OSError:
            log.error("api: dashboard file %s is missing from the installed package", filename)
            return _error(503, f"dashboard file {filename} is missing from this installation")
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

