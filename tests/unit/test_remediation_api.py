"""Remediation's HTTP routes inside the real API server (listening on 127.0.0.1:0, httpx as the client):
listing, approving and rejecting, and the token that answers require."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from test_remediation_engine import Harness
from test_remediation_guards import SELF_PARENT

from ksift.interfaces.api import ApiServer
from ksift.interfaces.settings import parse_api
from ksift.remediation.api import route_provider

TOKEN = "s3cret-token-for-tests-only"


@contextlib.asynccontextmanager
async def _client(h: Harness, token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    settings = parse_api({"token": token, "listen": "127.0.0.1:0"} if token else {"listen": "127.0.0.1:0"},
                         "agent.toml")
    api = ApiServer(settings, h.alerts, route_providers=[route_provider(h.engine, bool(token))])
    await api.start()
    try:
        async with httpx.AsyncClient(base_url=api.urls[0], timeout=10) as client:
            yield client
    finally:
        await api.stop()


def _pending(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "ask"')
    return h, h.proc.add(3000, SELF_PARENT, "p")


def test_list_approve_and_reject_with_the_token(tmp_path):
    h, subject = _pending(tmp_path)
    second = h.proc.add(3001, SELF_PARENT, "q")
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def main():
        await h.engine.start()
        try:
            async with _client(h, TOKEN) as client:
                h.emit(subject, "i1", "a1")
                h.emit(second, "i2", "a2")
                await h.until(lambda: h.engine.stats["pending"] == 2)
                listing = await client.get("/api/v1/actions?status=pending", headers=auth)
                assert listing.status_code == 200
                body = listing.json()
                assert body["count"] == 2 and all(a["summary"].startswith("pending approval") for a in body["actions"])
                ids = {a["subject"]["pid"]: a["id"] for a in body["actions"]}

                ok = await client.post(f"/api/v1/actions/{ids[3000]}/approve", headers=auth)
                assert ok.status_code == 200 and ok.json()["status"] == "approved"
                no = await client.post(f"/api/v1/actions/{ids[3001]}/reject", headers=auth)
                assert no.status_code == 200 and no.json()["decided_by"].startswith("api (")
                await h.until(lambda: h.engine.stats["done"])

                again = await client.post(f"/api/v1/actions/{ids[3001]}/approve", headers=auth)
                assert again.status_code == 409 and "not pending" in again.json()["error"]
                missing = await client.post("/api/v1/actions/000000000000/approve", headers=auth)
                assert missing.status_code == 404
                one = await client.get(f"/api/v1/actions/{ids[3000]}", headers=auth)
                assert one.json()["status"] == "done"
                bad = await client.get("/api/v1/actions?status=maybe", headers=auth)
                assert bad.status_code == 400
                spec = (await client.get("/openapi.json", headers=auth)).json()
                assert "/api/v1/actions/{id}/approve" in spec["paths"]
        finally:
            await h.engine.stop()

    asyncio.run(main())
    assert h.proc.pidfds.signals() == [(3000, 19)]


def test_answers_need_a_token(tmp_path):
    h, subject = _pending(tmp_path)

    async def main():
        await h.engine.start()
        try:
            h.emit(subject)
            await h.until(lambda: h.engine.stats["pending"])
            [d] = h.decisions()
            # A token is configured: a request without it (or with a wrong one) is turned away.
            async with _client(h, TOKEN) as client:
                assert (await client.post(f"/api/v1/actions/{d.id}/approve")).status_code == 401
                wrong = await client.post(f"/api/v1/actions/{d.id}/approve", headers={"Authorization": "Bearer no"})
                assert wrong.status_code == 401
            # No token configured: reading works (loopback), answering is refused outright.
            async with _client(h, None) as client:
                assert (await client.get("/api/v1/actions")).status_code == 200
                refused = await client.post(f"/api/v1/actions/{d.id}/approve")
                assert refused.status_code == 403 and "needs an API token" in refused.json()["error"]
                # Every endpoint names a parameter it does not take.
                unknown = await client.get("/api/v1/actions?stauts=pending")
                assert unknown.status_code == 400 and unknown.json()["parameter"] == "stauts"
        finally:
            await h.engine.stop()

    asyncio.run(main())
    assert h.proc.pidfds.signals() == []
    assert h.decisions()[0].status == "expired"  # the agent stopped with it still pending


def test_decision_events_reach_the_api_stream(tmp_path):
    h, subject = _pending(tmp_path)
    settings = parse_api({"token": TOKEN}, "agent.toml")
    api = ApiServer(settings, h.alerts)
    h.engine.listeners.append(api.publish)

    async def main():
        sub = api.subscribe()
        await h.engine.start()
        try:
            h.emit(subject)
            await h.until(lambda: h.engine.stats["pending"])
            frame = await asyncio.wait_for(sub.queue.get(), 5)
        finally:
            await h.engine.stop()
        return frame

    frame = asyncio.run(main())
    assert b"event: action" in frame and b'"status":"pending"' in frame
