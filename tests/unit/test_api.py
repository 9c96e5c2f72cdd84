"""The HTTP API against a real Agent (no sensors) and a real SQLite store, through a real listening
server (127.0.0.1:0, or a unix socket) and httpx as the client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from agent_helpers import fork_storm_crossing, fork_storm_rules, plain_enricher
from alert_factory import make_alert

from ksift.agent import Agent
from ksift.cli.main import main as cli_main
from ksift.config import AgentConfig
from ksift.errors import ConfigError
from ksift.interfaces.api import ApiServer, ApiStartError
from ksift.interfaces.http import Request, Response, Router, json_response
from ksift.interfaces.settings import ApiSettings, parse_api
from ksift.sinks.store import StoreSink
from ksift.store.sqlite import AlertStore
from ksift.timeparse import rfc3339

TOKEN = "s3cret-token-0123456789"
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc).timestamp()
DEADLINE_S = 10.0


def run(coro: Awaitable) -> object:
    return asyncio.run(coro)


class Rig:
    """An Agent with no sensors, a real store and the API sink, as `ksift run` wires them."""

    def __init__(self, tmp_path: Path, settings: ApiSettings | None = None, **api_kw):
        self.store = AlertStore(tmp_path / "alerts.db")
        self.api = ApiServer(settings or parse_api({"listen": "127.0.0.1:0"}, "test"), self.store,
                             clock=api_kw.pop("clock", lambda: NOW), **api_kw)
        self.agent = Agent(AgentConfig(), fork_storm_rules(), [], plain_enricher(), [StoreSink(self.store), self.api])

    def feed(self, alert: dict) -> None:
        """What the agent does with an alert: every sink gets it."""
        for sink in self.agent.sinks:
            sink.emit(alert)

    def open_incident(self, pid: int = 31337) -> None:
        """A real crossing through the agent's engine, alert building and sinks."""
        self.agent._emit(self.agent.engine.observe(fork_storm_crossing(pid, count=80)))

    async def client(self) -> httpx.AsyncClient:
        """The API listening for real (as the agent's loop starts it), and a client of it."""
        await self.api.start()
        if self.api.urls:
            return httpx.AsyncClient(base_url=self.api.urls[0], timeout=DEADLINE_S)
        transport = httpx.AsyncHTTPTransport(uds=self.api.settings.unix_socket)
        return httpx.AsyncClient(base_url="http://ksift", transport=transport, timeout=DEADLINE_S)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.store.close()


def with_client(rig: Rig, body: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    async def go():
        client = await rig.client()
        try:
            await body(client)
        finally:
            await client.aclose()
            await rig.api.stop()

    run(go())


async def open_stream(client: httpx.AsyncClient, path: str = "/api/v1/events",
                      headers: dict | None = None) -> httpx.Response:
    """A streaming GET whose body is read line by line through response.lines (aclose() ends it)."""
    response = await client.send(client.build_request("GET", path, headers=headers), stream=True)
    response.lines = response.aiter_lines()
    return response


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def read_event(stream: httpx.Response, event_type: str = "alert") -> tuple[str | None, dict]:
    """The next SSE event of this type: (id, data)."""
    async with asyncio.timeout(DEADLINE_S):
        fields: dict[str, str] = {}
        while True:
            line = (await anext(stream.lines)).rstrip("\r\n")
            if line == "":
                if fields.get("event") == event_type:
                    return fields.get("id"), json.loads(fields["data"])
                fields = {}
            elif not line.startswith(":") and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.lstrip(" ")


def content_type(response: httpx.Response) -> str:
    return response.headers["Content-Type"].split(";")[0]


# -- plain endpoints -----------------------------------------------------------


def test_health_and_readiness(rig):
    async def body(client):
        response = await client.get("/healthz")
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "loop is not running" in response.json()["reason"]
        rig.agent.ready = True  # what Agent.run sets once every sensor is attached
        response = await client.get("/readyz")
        assert response.status_code == 200 and response.json()["ready"] is True

    with_client(rig, body)


def test_alerts_from_the_store_with_filters(rig):
    rig.feed(make_alert(1, severity="info", ts=rfc3339(NOW - 3600)))
    rig.feed(make_alert(2, severity="warning", ts=rfc3339(NOW - 1200)))
    rig.feed(make_alert(3, severity="critical", rule="oom_kill", ts=rfc3339(NOW - 300)))
    rig.feed(make_alert(4, severity="warning", status="resolved", ts=rfc3339(NOW - 60)))

    async def ids(client, query: str) -> list[str]:
        response = await client.get("/api/v1/alerts" + query)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["count"] == len(data["alerts"])
        return [a["id"] for a in data["alerts"]]

    async def body(client):
        assert await ids(client, "") == ["a1", "a2", "a3", "a4"]  # oldest first
        assert await ids(client, "?rule=fork_storm") == ["a1", "a2", "a4"]
        assert await ids(client, "?severity=warning") == ["a2", "a3", "a4"]  # at least warning
        assert await ids(client, "?severity=critical") == ["a3"]
        assert await ids(client, "?since=10m") == ["a3", "a4"]  # the API's clock is NOW
        assert await ids(client, "?since=" + rfc3339(NOW - 1300)) == ["a2", "a3", "a4"]
        assert await ids(client, "?limit=2") == ["a3", "a4"]  # the newest two
        assert await ids(client, "?status=resolved") == ["a4"]
        assert await ids(client, "?rule=fork_storm&severity=warning&since=1h&limit=1") == ["a4"]
        assert await ids(client, "?rule=nothing") == []

    with_client(rig, body)


@pytest.mark.parametrize("query, parameter, fragment", [
    ("limit=0", "limit", "from 1 to 10000"),
    ("limit=ten", "limit", "'ten'"),
    ("limit=10001", "limit", "from 1 to 10000"),
    ("severity=loud", "severity", "info, warning, critical"),
    ("since=yesterday", "since", "'yesterday'"),
    ("since=", "since", "empty value"),
    ("status=closed", "status", "open or resolved"),
    ("rule=a&rule=b", "rule", "given 2 times"),
    ("sevrity=warning", "sevrity", "unknown parameter"),
])
def test_bad_alert_queries_are_400_naming_the_parameter(rig, query, parameter, fragment):
    async def body(client):
        response = await client.get("/api/v1/alerts?" + query)
        assert response.status_code == 400
        data = response.json()
        assert data["parameter"] == parameter
        assert parameter in data["error"] and fragment in data["error"], data

    with_client(rig, body)


def test_one_alert_by_id_or_404(rig):
    rig.feed(make_alert(7))

    async def body(client):
        response = await client.get("/api/v1/alerts/a7")
        assert response.status_code == 200 and response.json()["summary"].startswith("PID 1234")
        response = await client.get("/api/v1/alerts/nope")
        assert response.status_code == 404
        assert "no alert with id 'nope'" in response.json()["error"]
        response = await client.get("/api/v1/alerts/" + "x" * 200)
        assert response.status_code == 400
        response = await client.get("/api/v2/nothing")
        assert response.status_code == 404 and "no such endpoint" in response.json()["error"]
        response = await client.post("/api/v1/alerts")
        assert response.status_code == 405 and "POST" in response.json()["error"]

    with_client(rig, body)


def test_open_incidents_carry_their_context(rig):
    rig.open_incident(pid=31337)

    async def body(client):
        data = (await client.get("/api/v1/incidents")).json()
        assert data["count"] == 1
        incident = data["incidents"][0]
        assert incident["rule"] == "fork_storm" and incident["severity"] == "warning"
        assert incident["key"] == 31337 and incident["count"] >= 80 and incident["threshold"] == 50
        assert incident["subject"]["pid"] == 31337 and incident["subject"]["comm"] == "ks-forker"
        assert incident["ancestry"][0]["pid"] == 1
        assert incident["summary"].startswith("PID 31337 (ks-forker)")
        # The same incident's open alert reached the store.
        stored = (await client.get("/api/v1/alerts")).json()
        assert [a["incident_id"] for a in stored["alerts"]] == [incident["incident_id"]]

    with_client(rig, body)


def test_funnel_and_status(rig):
    rig.open_incident()

    async def body(client):
        funnel = (await client.get("/api/v1/funnel")).json()
        assert funnel["alerts"] == {"open": 1, "resolved": 0}
        assert funnel["summary"]["alerts_opened"] == 1 and funnel["summary"]["open_incidents"] == 1
        assert funnel["sinks"]["api"] == {"delivered": 1, "failed": 0}
        assert funnel["ts"] == NOW
        status = (await client.get("/api/v1/status")).json()
        assert status["version"] and status["pid"] == os.getpid()
        assert [r["name"] for r in status["rules"]] == ["fork_storm"]
        assert status["sensors"] == []
        assert status["api"]["auth"].startswith("none")

    with_client(rig, body)


def test_dashboard_is_served_with_a_strict_policy(rig):
    async def body(client):
        page = await client.get("/")
        assert page.status_code == 200 and content_type(page) == "text/html"
        html = page.text
        assert "/dashboard/app.js" in html and "/dashboard/style.css" in html
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        script = await client.get("/dashboard/app.js")
        assert script.status_code == 200 and content_type(script) == "text/javascript"
        code = script.text
        # Alert data is attacker-influenced (comm, cmdline): the page must never parse it as HTML.
        assert "innerHTML" not in code and "insertAdjacentHTML" not in code and "EventSource" in code
        style = await client.get("/dashboard/style.css")
        assert style.status_code == 200 and content_type(style) == "text/css"

    with_client(rig, body)


# -- access control ----------------------------------------------------------------


def test_auth_is_required_off_loopback():
    with pytest.raises(ConfigError) as info:
        parse_api({"listen": "0.0.0.0:9466"}, "agent.toml")
    assert info.value.field == "api.listen" and "needs a token" in str(info.value)


def non_loopback_address() -> str | None:
    """An address of this host that is not loopback (none on a host without a network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


# /readyz was behind the token before issue 16 section 2; /metrics still is, from other hosts.
OPEN = {"/healthz", "/readyz"}
OPEN_FROM_THIS_HOST = {"/metrics"}


def test_token_is_enforced_on_every_endpoint_but_health_and_readiness(tmp_path):
    rig = Rig(tmp_path, parse_api({"listen": "0.0.0.0:0", "token": TOKEN}, "test"))
    rig.feed(make_alert(1))

    async def body(client):
        app_paths = sorted({r.path for r in rig.api.build_router().routes if r.method == "GET"})
        assert len(app_paths) >= 13
        for path in app_paths:
            url = path.replace("{id}", "a1")
            if path in OPEN | OPEN_FROM_THIS_HOST:
                assert (await client.get(url)).status_code in (200, 503), path  # /readyz: not running
                continue
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
                response = await client.get(url, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert "Bearer" in response.headers["WWW-Authenticate"]
                if path == "/":  # a browser gets the login form, which posts the token once
                    assert 'action="/login"' in response.text and content_type(response) == "text/html"
                else:
                    assert "authentication required" in response.json()["error"]
            # Headers only: the event stream's body never ends.
            response = await open_stream(client, url, headers={"Authorization": f"Bearer {TOKEN}"})
            await response.aclose()
            assert response.status_code in (200, 503), (path, response.status_code)  # /readyz: not running
        spec = (await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})).json()
        assert spec["security"] == [{"bearer": []}]
        assert spec["paths"]["/readyz"]["get"]["security"] == []
        # From another host, /metrics needs the token too.
        address = non_loopback_address()
        if address is not None:
            async with httpx.AsyncClient(base_url=f"http://{address}:{client.base_url.port}") as remote:
                assert (await remote.get("/metrics")).status_code == 401
                assert (await remote.get("/healthz")).status_code == 200
                metrics = await remote.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
                assert metrics.status_code == 200 and "ksift_build_info" in metrics.text

    with_client(rig, body)
    rig.store.close()


def test_the_login_form_trades_the_token_for_a_cookie(tmp_path):
    rig = Rig(tmp_path, parse_api({"token": TOKEN, "listen": "127.0.0.1:0"}, "test"))

    async def body(client):
        assert (await client.post("/login", data={"token": "wrong"})).status_code == 401
        response = await client.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert response.status_code == 303 and response.headers["Location"] == "/"
        assert "ksift_session=" in response.headers["Set-Cookie"]
        page = await client.get("/")  # the cookie jar carries the session now
        assert page.status_code == 200 and "/dashboard/app.js" in page.text

    with_client(rig, body)
    rig.store.close()


def test_unknown_parameters_are_refused_on_every_endpoint(rig):
    async def body(client):
        for route in rig.api.build_router().routes:
            if route.method != "GET":
                continue
            response = await client.get(route.path.replace("{id}", "a1") + "?bogus=1")
            assert response.status_code == 400, route.path
            assert response.json() == {"error": response.json()["error"], "parameter": "bogus"}
            assert "unknown parameter 'bogus'" in response.json()["error"]

    with_client(rig, body)


def test_dashboard_login_trades_the_token_for_a_cookie(tmp_path):
    actions: list[str] = []

    def remediation_routes(router: Router) -> None:
        async def approve(request: Request) -> Response:
            actions.append(request.params["id"])
            return json_response({"approved": request.params["id"]})

        router.post("/api/v1/actions/{id}/approve", approve)

    rig = Rig(tmp_path, parse_api({"token": TOKEN, "listen": "127.0.0.1:0"}, "test"),
              route_providers=[remediation_routes])

    async def body(client):
        assert (await client.get("/?token=wrong")).status_code == 401
        response = await client.get(f"/?token={TOKEN}", follow_redirects=False)
        assert response.status_code == 303 and response.headers["Location"] == "/"
        cookie = SimpleCookie(response.headers["Set-Cookie"])["ksift_session"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        assert TOKEN not in cookie.value  # derived, not the token itself
        # The client's cookie jar now carries the session: reads work, as EventSource needs.
        assert (await client.get("/api/v1/alerts")).status_code == 200
        assert (await client.get("/")).status_code == 200
        # An action by cookie alone needs our own Origin (a cross-site form would not have it).
        assert (await client.post("/api/v1/actions/x1/approve")).status_code == 401
        origin = f"http://{client.base_url.host}:{client.base_url.port}"
        response = await client.post("/api/v1/actions/x2/approve", headers={"Origin": origin})
        assert response.status_code == 200 and actions == ["x2"]

    with_client(rig, body)
    rig.store.close()


def test_foreign_host_names_are_refused_without_a_token(rig):
    async def body(client):
        response = await client.get("/api/v1/alerts", headers={"Host": "attacker.example:9466"})
        assert response.status_code == 403 and "not allowed" in response.json()["error"]
        for host in ("127.0.0.1:9466", "localhost:9466", "[::1]:9466", "localhost"):
            assert (await client.get("/api/v1/alerts", headers={"Host": host})).status_code == 200, host
        assert (await client.get("/healthz", headers={"Host": "attacker.example"})).status_code == 200

    with_client(rig, body)


# -- the event stream ------------------------------------------------------------------


def test_sse_delivers_alerts_and_survives_a_client_that_leaves(rig):
    async def body(client):
        first = await open_stream(client)
        assert first.status_code == 200 and first.headers["Content-Type"].startswith("text/event-stream")
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the first client to subscribe")
        rig.open_incident(pid=5001)
        event_id, alert = await read_event(first)
        assert alert["status"] == "open" and alert["subject"]["pid"] == 5001 and event_id == "1"

        await first.aclose()  # leaves mid-stream
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 0, "the server to notice the client left")
        rig.feed(make_alert(2))  # nobody listening: nothing blocks, nothing breaks

        second = await open_stream(client)
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the second client to subscribe")
        rig.feed(make_alert(3))
        _, alert = await read_event(second)
        assert alert["id"] == "a3"
        await second.aclose()
        assert rig.api.delivered == 3 and rig.api.failed == 0 and rig.api.lost == 0

    with_client(rig, body)


def test_reconnecting_client_gets_what_it_missed(rig):
    async def body(client):
        rig.feed(make_alert(1))
        rig.feed(make_alert(2))
        stream = await open_stream(client, headers={"Last-Event-ID": "1"})
        _, alert = await read_event(stream)
        assert alert["id"] == "a2"
        await stream.aclose()

    with_client(rig, body)


def test_a_slow_client_loses_events_counted_and_never_blocks(tmp_path):
    rig = Rig(tmp_path, parse_api({"listen": "127.0.0.1:0", "sse_queue": 2}, "test"))

    async def body(client):
        stalled = rig.api.subscribe()  # a client that never reads
        stream = await open_stream(client)
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 2, "the streaming client")
        started = time.monotonic()
        for n in range(5):  # no await in between: neither consumer can drain
            rig.feed(make_alert(n))
        assert time.monotonic() - started < 5  # emit returned at once (generous: a shared machine)
        assert rig.api.delivered == 5
        assert stalled.lost == 3 and rig.api.lost == 6  # both queues held 2 of 5
        # The streaming client is told how much it missed, then gets what its queue held.
        _, lost = await read_event(stream, "lost")
        assert lost == {"lost": 3}
        _, alert = await read_event(stream)
        assert alert["id"] == "a0"
        metrics = (await client.get("/metrics")).text
        assert "ksift_sse_events_lost_total 6.0" in metrics
        await stream.aclose()
        rig.api.unsubscribe(stalled)

    with_client(rig, body)
    rig.store.close()


def test_publish_streams_action_events_from_any_thread(rig):
    async def body(client):
        stream = await open_stream(client)
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the client")
        rig.api._loop = asyncio.get_running_loop()  # as start() records it
        rig.api._loop_thread = threading.get_ident()
        worker = threading.Thread(target=rig.api.publish, args=("action", {"action": "freeze", "pid": 7}))
        worker.start()
        worker.join()
        _, action = await read_event(stream, "action")
        assert action == {"action": "freeze", "pid": 7}
        with pytest.raises(ValueError, match="event type"):
            rig.api.publish("bad\nevent", {})
        await stream.aclose()

    with_client(rig, body)


# -- OpenAPI and route providers ---------------------------------------------------------


def test_openapi_lists_every_route_including_providers(tmp_path):
    def provider(router: Router) -> None:
        async def approve(request: Request) -> Response:
            return json_response({})

        router.post("/api/v1/actions/{id}/approve", approve)
        router.openapi_paths["/api/v1/actions/{id}/approve"] = {
            "post": {"summary": "approve a pending action", "responses": {"200": {"description": "approved"}}}}

    rig = Rig(tmp_path, route_providers=[provider])

    async def body(client):
        spec = (await client.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.") and spec["info"]["version"] == rig.api.version
        routes = {(r.path, r.method.lower()) for r in rig.api.build_router().routes}
        documented = {(path, method) for path, item in spec["paths"].items() for method in item
                      if method in ("get", "post", "put", "delete", "patch")}
        assert routes == documented  # every route described, nothing described that is not served
        for path, item in spec["paths"].items():
            for method, op in item.items():
                if method != "parameters":
                    assert op["responses"], (path, method)
        assert {"/api/v1/alerts", "/api/v1/events", "/metrics", "/"} <= set(spec["paths"])

    with_client(rig, body)
    rig.store.close()


# -- the real server in the agent's loop ---------------------------------------------------


def test_server_runs_in_the_agent_loop_and_stops_with_it(rig):
    async def go():
        task = asyncio.create_task(rig.agent.run(duration_s=30))
        await wait_for(lambda: rig.agent.ready, "the agent loop")
        [url] = rig.api.urls
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as session:
            response = await session.get("/readyz")
            assert response.status_code == 200
            stream = await open_stream(session)
            await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the client")
            rig.open_incident(pid=7007)
            _, alert = await read_event(stream)
            assert alert["subject"]["pid"] == 7007
            rig.agent._stop.set()  # what SIGTERM does
            async with asyncio.timeout(DEADLINE_S):
                await task  # an open SSE stream does not hold the shutdown up
            await stream.aclose()
            with pytest.raises(httpx.TransportError):
                await session.get("/healthz")

    run(go())


def test_port_in_use_is_one_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rig = Rig(tmp_path, parse_api({"listen": f"127.0.0.1:{port}"}, "test"))
        with pytest.raises(ApiStartError) as info:
            run(rig.api.start())
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "address already in use" in message and "\n" not in message
    rig.store.close()


def test_unix_socket_is_private_and_removed(tmp_path):
    path = tmp_path / "api.sock"
    rig = Rig(tmp_path, parse_api({"listen": "", "unix_socket": str(path)}, "test"))

    async def go():
        await rig.api.start()
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            transport = httpx.AsyncHTTPTransport(uds=str(path))
            async with httpx.AsyncClient(transport=transport) as session:
                response = await session.get("http://ksift/api/v1/alerts")
                assert response.status_code == 200  # any Host is fine over a local socket
            # A second server on the same live socket refuses instead of stealing it.
            other = ApiServer(rig.api.settings, rig.store)
            with pytest.raises(ApiStartError, match="another process"):
                await other.start()
        finally:
            await rig.api.stop()
        assert not path.exists()

    run(go())
    rig.store.close()


def test_cli_refuses_a_public_api_address_without_a_token(tmp_path, capsys):
    code = cli_main(["run", "--api", "0.0.0.0:9466", "--db", str(tmp_path / "a.db"), "--for", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("ksift: error: --api:") and "needs a token" in err
    assert cli_main(["run", "--api", "nowhere", "--db", str(tmp_path / "a.db")]) == 2
    assert "host:port" in capsys.readouterr().err


IMPORTS = """
import sys
from pathlib import Path
from agent_helpers import fork_storm_rules, plain_enricher
from ksift.agent import Agent
from ksift.config import parse_config
from ksift.sinks.factory import configured_sinks
from ksift.store.sqlite import AlertStore
config, rules = parse_config(sys.argv[2], "agent.toml"), fork_storm_rules()
sinks = configured_sinks(config, rules, AlertStore(Path(sys.argv[1]) / "a.db"))
Agent(config, rules, [], plain_enricher(), sinks)  # binds the API
api = [s for s in sinks if s.name == "api"][0]
before = {m: m in sys.modules for m in ("aiohttp", "httpx", "prometheus_client")}
api.registry
print(before, "prometheus_client" in sys.modules)
"""


@pytest.mark.parametrize("config, expected", [
    ("", "{'aiohttp': False, 'httpx': False, 'prometheus_client': False} True"),
    ('[sinks.webhook]\nurl = "http://127.0.0.1:1/"\n',
     "{'aiohttp': False, 'httpx': True, 'prometheus_client': False} True"),
])
def test_the_http_stack_loads_only_what_is_configured(tmp_path, config, expected):
    """Issue 9 (peak memory): the API never imports aiohttp (~15 MiB resident) nor httpx (~5.6 MiB, only with a
    network sink), and prometheus_client only when /metrics is first read."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", IMPORTS, str(tmp_path), config],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
