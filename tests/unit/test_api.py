"""The HTTP API against a real Agent (no sensors) and a real SQLite store, through aiohttp's test utilities."""

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
from pathlib import Path

import aiohttp
import pytest
from agent_helpers import fork_storm_crossing, fork_storm_rules, plain_enricher
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from alert_factory import make_alert

from ksift.agent import Agent
from ksift.cli.main import main as cli_main
from ksift.config import AgentConfig
from ksift.errors import ConfigError
from ksift.interfaces.api import OPENAPI_PATHS, ApiServer, ApiStartError
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

    async def client(self) -> TestClient:
        client = TestClient(TestServer(self.api.build_app()))
        await client.start_server()
        return client


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.store.close()


def with_client(rig: Rig, body: Callable[[TestClient], Awaitable[None]]) -> None:
    async def go():
        client = await rig.client()
        try:
            await body(client)
        finally:
            await client.close()

    run(go())


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def read_event(stream: aiohttp.StreamReader, event_type: str = "alert") -> tuple[str | None, dict]:
    """The next SSE event of this type: (id, data)."""
    async with asyncio.timeout(DEADLINE_S):
        fields: dict[str, str] = {}
        while True:
            line = (await stream.readline()).decode().rstrip("\n")
            if line == "":
                if fields.get("event") == event_type:
                    return fields.get("id"), json.loads(fields["data"])
                fields = {}
            elif not line.startswith(":") and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.lstrip(" ")


# -- plain endpoints -----------------------------------------------------------


def test_health_and_readiness(rig):
    async def body(client):
        response = await client.get("/healthz")
        assert response.status == 200 and (await response.json()) == {"status": "ok"}
        response = await client.get("/readyz")
        assert response.status == 503
        assert "loop is not running" in (await response.json())["reason"]
        rig.agent.ready = True  # what Agent.run sets once every sensor is attached
        response = await client.get("/readyz")
        assert response.status == 200 and (await response.json())["ready"] is True

    with_client(rig, body)


def test_alerts_from_the_store_with_filters(rig):
    rig.feed(make_alert(1, severity="info", ts=rfc3339(NOW - 3600)))
    rig.feed(make_alert(2, severity="warning", ts=rfc3339(NOW - 1200)))
    rig.feed(make_alert(3, severity="critical", rule="oom_kill", ts=rfc3339(NOW - 300)))
    rig.feed(make_alert(4, severity="warning", status="resolved", ts=rfc3339(NOW - 60)))

    async def ids(client, query: str) -> list[str]:
        response = await client.get("/api/v1/alerts" + query)
        assert response.status == 200, await response.text()
        data = await response.json()
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
        assert response.status == 400
        data = await response.json()
        assert data["parameter"] == parameter
        assert parameter in data["error"] and fragment in data["error"], data

    with_client(rig, body)


def test_one_alert_by_id_or_404(rig):
    rig.feed(make_alert(7))

    async def body(client):
        response = await client.get("/api/v1/alerts/a7")
        assert response.status == 200 and (await response.json())["summary"].startswith("PID 1234")
        response = await client.get("/api/v1/alerts/nope")
        assert response.status == 404
        assert "no alert with id 'nope'" in (await response.json())["error"]
        response = await client.get("/api/v1/alerts/" + "x" * 200)
        assert response.status == 400
        response = await client.get("/api/v2/nothing")
        assert response.status == 404 and "no such endpoint" in (await response.json())["error"]
        response = await client.post("/api/v1/alerts")
        assert response.status == 405 and "POST" in (await response.json())["error"]

    with_client(rig, body)


def test_open_incidents_carry_their_context(rig):
    rig.open_incident(pid=31337)

    async def body(client):
        data = await (await client.get("/api/v1/incidents")).json()
        assert data["count"] == 1
        incident = data["incidents"][0]
        assert incident["rule"] == "fork_storm" and incident["severity"] == "warning"
        assert incident["key"] == 31337 and incident["count"] >= 80 and incident["threshold"] == 50
        assert incident["subject"]["pid"] == 31337 and incident["subject"]["comm"] == "ks-forker"
        assert incident["ancestry"][0]["pid"] == 1
        assert incident["summary"].startswith("PID 31337 (ks-forker)")
        # The same incident's open alert reached the store.
        stored = await (await client.get("/api/v1/alerts")).json()
        assert [a["incident_id"] for a in stored["alerts"]] == [incident["incident_id"]]

    with_client(rig, body)


def test_funnel_and_status(rig):
    rig.open_incident()

    async def body(client):
        funnel = await (await client.get("/api/v1/funnel")).json()
        assert funnel["alerts"] == {"open": 1, "resolved": 0}
        assert funnel["summary"]["alerts_opened"] == 1 and funnel["summary"]["open_incidents"] == 1
        assert funnel["sinks"]["api"] == {"delivered": 1, "failed": 0}
        assert funnel["ts"] == NOW
        status = await (await client.get("/api/v1/status")).json()
        assert status["version"] and status["pid"] == os.getpid()
        assert [r["name"] for r in status["rules"]] == ["fork_storm"]
        assert status["sensors"] == []
        assert status["api"]["auth"].startswith("none")

    with_client(rig, body)


def test_dashboard_is_served_with_a_strict_policy(rig):
    async def body(client):
        page = await client.get("/")
        assert page.status == 200 and page.content_type == "text/html"
        html = await page.text()
        assert "/dashboard/app.js" in html and "/dashboard/style.css" in html
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        script = await client.get("/dashboard/app.js")
        assert script.status == 200 and script.content_type == "text/javascript"
        code = await script.text()
        # Alert data is attacker-influenced (comm, cmdline): the page must never parse it as HTML.
        assert "innerHTML" not in code and "insertAdjacentHTML" not in code and "EventSource" in code
        style = await client.get("/dashboard/style.css")
        assert style.status == 200 and style.content_type == "text/css"

    with_client(rig, body)


# -- access control ----------------------------------------------------------------


def test_auth_is_required_off_loopback():
    with pytest.raises(ConfigError) as info:
        parse_api({"listen": "0.0.0.0:9466"}, "agent.toml")
    assert info.value.field == "api.listen" and "needs a token" in str(info.value)


def test_token_is_enforced_on_every_endpoint_but_healthz(tmp_path):
    rig = Rig(tmp_path, parse_api({"listen": "0.0.0.0:0", "token": TOKEN}, "test"))
    rig.feed(make_alert(1))

    async def body(client):
        app_paths = sorted({r.resource.canonical for r in client.server.app.router.routes() if r.method == "GET"})
        assert len(app_paths) >= 13
        for path in app_paths:
            url = path.replace("{id}", "a1")
            if path == "/healthz":
                assert (await client.get(url)).status == 200
                continue
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
                response = await client.get(url, headers=headers)
                assert response.status == 401, (path, headers)
                assert "Bearer" in response.headers["WWW-Authenticate"]
                assert "authentication required" in (await response.json())["error"]
            response = await client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status in (200, 503), (path, response.status)  # /readyz: not running
        spec = await (await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})).json()
        assert spec["security"] == [{"bearer": []}]

    with_client(rig, body)
    rig.store.close()


def test_dashboard_login_trades_the_token_for_a_cookie(tmp_path):
    actions: list[str] = []

    def remediation_routes(app: web.Application) -> None:
        async def approve(request: web.Request) -> web.Response:
            actions.append(request.match_info["id"])
            return web.json_response({"approved": request.match_info["id"]})

        app.router.add_post("/api/v1/actions/{id}/approve", approve)

    rig = Rig(tmp_path, parse_api({"token": TOKEN, "listen": "127.0.0.1:0"}, "test"),
              route_providers=[remediation_routes])

    async def body(client):
        assert (await client.get("/?token=wrong")).status == 401
        response = await client.get(f"/?token={TOKEN}", allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == "/"
        cookie = response.cookies["ksift_session"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        assert TOKEN not in cookie.value  # derived, not the token itself
        # The client's cookie jar now carries the session: reads work, as EventSource needs.
        assert (await client.get("/api/v1/alerts")).status == 200
        assert (await client.get("/")).status == 200
        # An action by cookie alone needs our own Origin (a cross-site form would not have it).
        assert (await client.post("/api/v1/actions/x1/approve")).status == 401
        origin = f"http://{client.host}:{client.port}"
        response = await client.post("/api/v1/actions/x2/approve", headers={"Origin": origin})
        assert response.status == 200 and actions == ["x2"]

    with_client(rig, body)
    rig.store.close()


def test_foreign_host_names_are_refused_without_a_token(rig):
    async def body(client):
        response = await client.get("/api/v1/alerts", headers={"Host": "attacker.example:9466"})
        assert response.status == 403 and "not allowed" in (await response.json())["error"]
        for host in ("127.0.0.1:9466", "localhost:9466", "[::1]:9466", "localhost"):
            assert (await client.get("/api/v1/alerts", headers={"Host": host})).status == 200, host
        assert (await client.get("/healthz", headers={"Host": "attacker.example"})).status == 200

    with_client(rig, body)


# -- the event stream ------------------------------------------------------------------


def test_sse_delivers_alerts_and_survives_a_client_that_leaves(rig):
    async def body(client):
        first = await client.get("/api/v1/events")
        assert first.status == 200 and first.headers["Content-Type"].startswith("text/event-stream")
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the first client to subscribe")
        rig.open_incident(pid=5001)
        event_id, alert = await read_event(first.content)
        assert alert["status"] == "open" and alert["subject"]["pid"] == 5001 and event_id == "1"

        first.close()  # leaves mid-stream
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 0, "the server to notice the client left")
        rig.feed(make_alert(2))  # nobody listening: nothing blocks, nothing breaks

        second = await client.get("/api/v1/events")
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the second client to subscribe")
        rig.feed(make_alert(3))
        _, alert = await read_event(second.content)
        assert alert["id"] == "a3"
        second.close()
        assert rig.api.delivered == 3 and rig.api.failed == 0 and rig.api.lost == 0

    with_client(rig, body)


def test_reconnecting_client_gets_what_it_missed(rig):
    async def body(client):
        rig.feed(make_alert(1))
        rig.feed(make_alert(2))
        stream = await client.get("/api/v1/events", headers={"Last-Event-ID": "1"})
        _, alert = await read_event(stream.content)
        assert alert["id"] == "a2"
        stream.close()

    with_client(rig, body)


def test_a_slow_client_loses_events_counted_and_never_blocks(tmp_path):
    rig = Rig(tmp_path, parse_api({"listen": "127.0.0.1:0", "sse_queue": 2}, "test"))

    async def body(client):
        stalled = rig.api.subscribe()  # a client that never reads
        stream = await client.get("/api/v1/events")
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 2, "the streaming client")
        started = time.monotonic()
        for n in range(5):  # no await in between: neither consumer can drain
            rig.feed(make_alert(n))
        assert time.monotonic() - started < 5  # emit returned at once (generous: a shared machine)
        assert rig.api.delivered == 5
        assert stalled.lost == 3 and rig.api.lost == 6  # both queues held 2 of 5
        # The streaming client is told how much it missed, then gets what its queue held.
        _, lost = await read_event(stream.content, "lost")
        assert lost == {"lost": 3}
        _, alert = await read_event(stream.content)
        assert alert["id"] == "a0"
        metrics = await (await client.get("/metrics")).text()
        assert "ksift_sse_events_lost_total 6.0" in metrics
        stream.close()
        rig.api.unsubscribe(stalled)

    with_client(rig, body)
    rig.store.close()


def test_publish_streams_action_events_from_any_thread(rig):
    async def body(client):
        stream = await client.get("/api/v1/events")
        await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the client")
        rig.api._loop = asyncio.get_running_loop()  # as start() records it
        rig.api._loop_thread = threading.get_ident()
        worker = threading.Thread(target=rig.api.publish, args=("action", {"action": "freeze", "pid": 7}))
        worker.start()
        worker.join()
        _, action = await read_event(stream.content, "action")
        assert action == {"action": "freeze", "pid": 7}
        with pytest.raises(ValueError, match="event type"):
            rig.api.publish("bad\nevent", {})
        stream.close()

    with_client(rig, body)


# -- OpenAPI and route providers ---------------------------------------------------------


def test_openapi_lists_every_route_including_providers(tmp_path):
    def provider(app: web.Application) -> None:
        async def approve(request: web.Request) -> web.Response:
            return web.json_response({})

        app.router.add_post("/api/v1/actions/{id}/approve", approve)
        app[OPENAPI_PATHS]["/api/v1/actions/{id}/approve"] = {
            "post": {"summary": "approve a pending action", "responses": {"200": {"description": "approved"}}}}

    rig = Rig(tmp_path, route_providers=[provider])

    async def body(client):
        spec = await (await client.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.") and spec["info"]["version"] == rig.api.version
        routes = {(r.resource.canonical, r.method.lower()) for r in client.server.app.router.routes()
                  if r.method != "HEAD"}
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
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/readyz") as response:
                assert response.status == 200
            stream = await session.get(url + "/api/v1/events")
            await wait_for(lambda: rig.api.sse_stats()["clients"] == 1, "the client")
            rig.open_incident(pid=7007)
            _, alert = await read_event(stream.content)
            assert alert["subject"]["pid"] == 7007
            rig.agent._stop.set()  # what SIGTERM does
            async with asyncio.timeout(DEADLINE_S):
                await task  # an open SSE stream does not hold the shutdown up
            stream.close()
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(url + "/healthz")

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
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
                async with session.get("http://ksift/api/v1/alerts") as response:
                    assert response.status == 200  # any Host is fine over a local socket
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
