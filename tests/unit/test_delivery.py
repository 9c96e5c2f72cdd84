"""Network sinks against real HTTP receivers on loopback (aiohttp servers started by the tests)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web
from alert_factory import CONTAINER_ID, make_alert, make_subject, resolved

from ksift.agent import Funnel
from ksift.errors import ConfigError
from ksift.sinks.alertmanager import AlertmanagerSink, alerts_url, postable_alert
from ksift.sinks.base import Sink
from ksift.sinks.delivery import DeliverySettings
from ksift.sinks.settings import build_sinks, parse_sinks
from ksift.sinks.slack import FIELD_LIMIT, HEADER_LIMIT, SlackSink, slack_message
from ksift.sinks.store import StoreSink
from ksift.sinks.webhook import WebhookSink
from ksift.store.sqlite import AlertStore

SOURCE = "agent.toml"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST and answers from a script."""

    def __init__(self, statuses: list[int] | None = None, headers: dict | None = None, hang: bool = False):
        self.statuses = list(statuses or [])
        self.headers = headers or {}
        self.hang = hang
        self.requests: list[tuple[str, dict, object]] = []
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers), await request.json()))
        self.arrived.set()
        if self.hang:
            await asyncio.Event().wait()  # never answers
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok" if status < 300 else "nope", headers=self.headers)

    def bodies(self) -> list:
        return [body for _, _, body in self.requests]


async def until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


async def no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


def settings(url: str, **overrides) -> DeliverySettings:
    values = dict(url=url, name="test", timeout_s=5.0, max_retries=3, backoff_s=0.01, max_backoff_s=0.05,
                  drain_timeout_s=5.0)
    values.update(overrides)
    return DeliverySettings(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


# -- webhook: the alert JSON as is ------------------------------------------------------


def test_webhook_receiver_gets_the_alert_json():
    async def main():
        async with Receiver() as rx:
            sink = WebhookSink(settings(rx.url + "/hook", headers={"Authorization": "Bearer s3cret"}))
            assert isinstance(sink, Sink)
            await sink.start()
            alert = make_alert()
            sink.emit(alert)
            await until(lambda: sink.delivered == 1)
            await sink.stop()
        path, headers, body = rx.requests[0]
        assert path == "/hook"
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer s3cret"
        assert body == alert
        assert sink.counters() == {"delivered": 1, "failed": 0, "retried": 0, "gave_up": 0, "rejected": 0,
                                   "dropped_queue_full": 0, "dropped_at_stop": 0, "filtered": 0, "queued": 0}

    asyncio.run(main())


def test_retries_on_500_then_succeeds():
    async def main():
        async with Receiver(statuses=[500, 503]) as rx:
            sink = WebhookSink(settings(rx.url))
            await sink.start()
            sink.emit(make_alert())
            await until(lambda: sink.delivered == 1)
            await sink.stop()
        assert len(rx.requests) == 3
        assert (sink.retried, sink.gave_up, sink.failed) == (2, 0, 0)

    asyncio.run(main())


def test_429_is_retried_after_its_retry_after():
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    async def main():
        async with Receiver(statuses=[429], headers={"Retry-After": "7"}) as rx:
            sink = WebhookSink(settings(rx.url, max_backoff_s=10.0), sleep=record)
            await sink.start()
            sink.emit(make_alert())
            await until(lambda: sink.delivered == 1)
            await sink.stop()
        assert len(rx.requests) == 2 and sink.retried == 1
        assert delays == [7.0]  # the receiver's Retry-After, within max_backoff

    asyncio.run(main())


@pytest.mark.parametrize("status", [400, 401, 404, 301])
def test_other_4xx_and_redirects_are_not_retried(status):
    async def main():
        async with Receiver(statuses=[status]) as rx:
            sink = WebhookSink(settings(rx.url))
            await sink.start()
            sink.emit(make_alert())
            await until(lambda: sink.failed == 1)
            await sink.stop()
        assert len(rx.requests) == 1
        assert (sink.rejected, sink.retried, sink.delivered, sink.gave_up) == (1, 0, 0, 0)

    asyncio.run(main())


def test_closed_port_gives_up_after_max_retries():
    async def main():
        sink = WebhookSink(settings(f"http://127.0.0.1:{free_port()}", max_retries=2), sleep=no_sleep)
        await sink.start()
        sink.emit(make_alert())
        await until(lambda: sink.gave_up == 1)
        await sink.stop()
        assert (sink.retried, sink.failed, sink.delivered) == (2, 1, 0)
        assert "ConnectError" in (sink.last_error or "")  # httpx names it so (was aiohttp's ClientConnectorError)

    asyncio.run(main())


def test_dead_receiver_delays_neither_emit_nor_the_other_sinks(tmp_path: Path):
    async def main():
        async with Receiver(hang=True) as rx:
            hung = WebhookSink(settings(rx.url, timeout_s=60.0, queue_size=10, drain_timeout_s=0.2))
            await hung.start()
            with AlertStore(tmp_path / "alerts.db") as store:
                stored = StoreSink(store)
                sinks = [hung, stored]
                hung.emit(make_alert(0))
                await asyncio.wait_for(rx.arrived.wait(), 20)  # the worker is now stuck in a request
                # The agent's loop: every sink gets every alert, in order, with no await in between.
                started = time.monotonic()
                for n in range(1, 51):
                    alert = make_alert(n)
                    for sink in sinks:
                        sink.emit(alert)
                elapsed = time.monotonic() - started
                assert len(store.list(limit=100)) == 50  # a read waits for the store sink's writer
                assert stored.delivered == 50
            # The receiver's request would run for a minute; all 50 were handed over long before.
            assert elapsed < 5.0, elapsed
            assert hung.dropped_queue_full == 40  # 10 fit the queue; the oldest went
            stop_started = time.monotonic()
            await hung.stop()
            assert time.monotonic() - stop_started < 30  # bounded by drain_timeout, not by the receiver
        assert hung.dropped_at_stop == 11  # the queued ten and the one in flight
        assert hung.failed == 51 and hung.delivered == 0

    asyncio.run(main())


def test_full_queue_drops_the_oldest_and_counts_it():
    async def main():
        async with Receiver() as rx:
            sink = WebhookSink(settings(rx.url, queue_size=3))
            for n in range(1, 6):  # not started yet: nothing drains the queue
                sink.emit(make_alert(n))
            assert sink.dropped_queue_full == 2 and sink.failed == 2
            assert sink.counters()["queued"] == 3
            await sink.start()
            await until(lambda: sink.delivered == 3)
            await sink.stop()
        assert [body["id"] for body in rx.bodies()] == ["a3", "a4", "a5"]  # in order, newest kept

    asyncio.run(main())


def test_min_severity_filters():
    async def main():
        async with Receiver() as rx:
            sink = WebhookSink(settings(rx.url, min_severity="warning"))
            await sink.start()
            sink.emit(make_alert(1, severity="info"))
            sink.emit(make_alert(2, severity="critical"))
            sink.emit(make_alert(3, severity="warning"))
            await until(lambda: sink.delivered == 2)
            await sink.stop()
        assert [body["id"] for body in rx.bodies()] == ["a2", "a3"]
        assert sink.filtered == 1 and sink.failed == 0

    asyncio.run(main())


def test_emit_after_stop_and_close_counts_losses_and_never_raises():
    async def main():
        sink = WebhookSink(settings(f"http://127.0.0.1:{free_port()}"))
        sink.emit(make_alert(1))
        sink.close()
        sink.close()
        sink.emit(make_alert(2))
        assert sink.dropped_at_stop == 2 and sink.failed == 2
        sink.emit("not a dict")  # a bug upstream is counted, not raised
        assert sink.failed == 3

    asyncio.run(main())


def test_backoff_is_exponential_capped_and_jittered():
    low = WebhookSink(settings("http://x", backoff_s=1.0, max_backoff_s=8.0), jitter=lambda: 0.0)
    high = WebhookSink(settings("http://x", backoff_s=1.0, max_backoff_s=8.0), jitter=lambda: 1.0)
    assert [high.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert [low.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]  # jitter: [d/2, d]
    assert high.backoff(1, retry_after=5.0) == 5.0
    assert high.backoff(1, retry_after=600.0) == 8.0  # capped


# -- Slack -------------------------------------------------------------------------------


def test_slack_payload_shape_and_escaping():
    alert = make_alert(summary="PID 1 (<evil> & co) forked", subject=make_subject(
        comm="<!channel>", cmdline=["x" * 5000], pod_name="web-0", pod_namespace="shop", container_name="nginx"))
    message = slack_message(alert, host="node-1")
    assert message["text"].startswith("[WARNING] fork_storm firing on node-1: PID 1 (&lt;evil&gt; &amp; co)")
    kinds = [block["type"] for block in message["blocks"]]
    assert kinds == ["header", "section", "section", "context"]
    header = message["blocks"][0]["text"]
    assert header["type"] == "plain_text" and len(header["text"]) <= HEADER_LIMIT
    assert message["blocks"][1]["text"] == {"type": "mrkdwn", "text": "PID 1 (&lt;evil&gt; &amp; co) forked"}
    fields = {f["text"].split("\n", 1)[0]: f["text"].split("\n", 1)[1] for f in message["blocks"][2]["fields"]}
    assert fields["*Process*"].startswith("&lt;!channel&gt; (pid 1234)")  # no mention can be forged
    assert fields["*Pod*"] == "shop/web-0"
    assert fields["*Container*"] == f"nginx {CONTAINER_ID[:12]} (docker)"
    assert all(len(f["text"]) <= FIELD_LIMIT for f in message["blocks"][2]["fields"])
    assert "inc-1" in message["blocks"][3]["elements"][0]["text"]
    gone = slack_message(resolved(make_alert()))
    assert gone["blocks"][0]["text"]["text"] == "WARNING: fork_storm resolved"
    assert "lasted 5s" in gone["blocks"][-1]["elements"][0]["text"]


def test_slack_sink_posts_the_message():
    async def main():
        async with Receiver() as rx:
            sink = SlackSink(settings(rx.url + "/services/T/B/X"), host="node-1")
            await sink.start()
            sink.emit(make_alert())
            await until(lambda: sink.delivered == 1)
            await sink.stop()
        body = rx.bodies()[0]
        assert set(body) == {"text", "blocks"} and body == slack_message(make_alert(), "node-1")

    asyncio.run(main())


# -- Alertmanager ---------------------------------------------------------------------------


def test_alertmanager_payload_shape():
    alert = make_alert(subject=make_subject(pod_name="web-0", pod_namespace="shop", container_name="nginx"))
    posted = postable_alert(alert, "node-1", {"cluster": "prod"}, "https://ksift.example/i/{incident_id}")
    assert posted["labels"] == {"cluster": "prod", "alertname": "fork_storm", "severity": "warning",
                                "instance": "node-1", "pid": "1234", "comm": "bash", "container": "nginx",
                                "namespace": "shop", "pod": "web-0"}
    assert posted["annotations"]["summary"] == alert["summary"]
    assert alert["summary"] in posted["annotations"]["description"]
    assert posted["annotations"]["incident_id"] == "inc-1"
    assert posted["startsAt"] == "2026-11-25T00:10:00.000Z"
    assert "endsAt" not in posted
    assert posted["generatorURL"] == "https://ksift.example/i/inc-1"
    # Without a name the container label is the short id; labels are the same on resolution.
    gone = postable_alert(resolved(make_alert()), "node-1")
    assert gone["labels"]["container"] == CONTAINER_ID[:12]
    assert gone["endsAt"] == "2026-11-25T00:10:05.000Z"
    assert gone["labels"] == postable_alert(make_alert(), "node-1")["labels"]
    assert "generatorURL" not in gone
    assert all(isinstance(v, str) for v in gone["labels"].values())


def test_alertmanager_sink_posts_lists_and_reposts_open_alerts():
    async def main():
        async with Receiver() as rx:
            sink = AlertmanagerSink(settings(alerts_url(rx.url + "/")), instance="node-1", resend_interval_s=0)
            await sink.start()
            first, second = make_alert(1), make_alert(2)
            sink.emit(first)
            sink.emit(second)
            sink.emit(resolved(first))
            await until(lambda: sink.delivered == 3)
            sink.resend_open()  # only the incident still open is posted again
            await until(lambda: sink.delivered == 4)
            await sink.stop()
        assert [path for path, _, _ in rx.requests] == ["/api/v2/alerts"] * 4
        bodies = rx.bodies()
        assert all(isinstance(body, list) and len(body) == 1 for body in bodies)
        assert [b[0]["annotations"]["incident_id"] for b in bodies] == ["inc-1", "inc-2", "inc-1", "inc-2"]
        assert "endsAt" in bodies[2][0] and "endsAt" not in bodies[3][0]
        assert sink.counters()["resent"] == 1 and sink.counters()["open_tracked"] == 1

    asyncio.run(main())


def test_funnel_reports_every_sink_counter(tmp_path: Path):
    class Engine:
        stats: dict = {}
        open: dict = {}

    with AlertStore(tmp_path / "a.db") as store:
        sink = WebhookSink(settings("http://127.0.0.1:1"))
        report = Funnel().as_dict(Engine(), [StoreSink(store), sink])
    assert {"retried", "gave_up", "dropped_queue_full"} <= set(report["sinks"]["test"])
    # The store queues for a writer thread: the same counters as the network sinks, and `unwritable`
    # (the part of `rejected` its database refused).
    assert report["sinks"]["store"] == dict(dict.fromkeys(report["sinks"]["test"], 0), unwritable=0)


# -- [sinks] config ---------------------------------------------------------------------------


def test_parse_and_build_every_kind():
    import tomllib

    text = """
[sinks.alertmanager]
url = "http://127.0.0.1:9093"
min_severity = "WARNING"
timeout = "2s"
labels = { cluster = "prod" }
resend_interval = "30s"

[[sinks.webhook]]
url = "https://hooks.example/a"
headers = { Authorization = "Bearer x" }

[[sinks.webhook]]
url = "https://hooks.example/b"
max_retries = 0

[sinks.slack]
url = "https://hooks.slack.com/services/T/B/X"
queue_size = 10
"""
    parsed = parse_sinks(tomllib.loads(text)["sinks"], SOURCE)
    am = parsed.of_kind("alertmanager")[0]
    assert (am.min_severity, am.timeout_s, dict(am.labels), am.resend_interval_s) == ("warning", 2.0,
                                                                                     {"cluster": "prod"}, 30.0)
    assert [s.name for s in parsed.of_kind("webhook")] == ["webhook", "webhook-2"]
    sinks = build_sinks(parsed, env={"NODE_NAME": "node-7"}, hostname=lambda: "pod-name")
    assert [(type(s).__name__, s.name) for s in sinks] == [
        ("AlertmanagerSink", "alertmanager"), ("WebhookSink", "webhook"), ("WebhookSink", "webhook-2"),
        ("SlackSink", "slack")]
    assert sinks[0].settings.url == "http://127.0.0.1:9093/api/v2/alerts"
    assert sinks[0].instance == "node-7" and sinks[3].host == "node-7"
    assert sinks[1].settings.headers["Authorization"] == "Bearer x"
    assert sinks[2].settings.max_retries == 0 and sinks[3].settings.queue_size == 10
    assert build_sinks(parse_sinks({}, SOURCE)) == []
    assert build_sinks(parsed, env={}, hostname=lambda: "box")[0].instance == "box"


@pytest.mark.parametrize(
    ("table", "field", "detail"),
    [
        ({"email": {}}, "sinks.email", "unknown sink kind (allowed: alertmanager, webhook, slack, otlp)"),
        ({"alertmanager": {}}, "sinks.alertmanager.url", "missing"),
        ({"alertmanager": {"url": "ftp://x"}}, "sinks.alertmanager.url", "scheme 'ftp'"),
        ({"alertmanager": {"url": "http://"}}, "sinks.alertmanager.url", "host 'missing'"),
        ({"alertmanager": {"url": "http://x:99999"}}, "sinks.alertmanager.url", "bad port"),
        ({"alertmanager": {"url": "http://x", "min_severity": "loud"}}, "sinks.alertmanager.min_severity",
         "'loud' (expected one of: info, warning, critical)"),
        ({"alertmanager": {"url": "http://x", "timeout": "0s"}}, "sinks.alertmanager.timeout",
         "must be between 100ms and 5m"),
        ({"alertmanager": {"url": "http://x", "queue_size": 0}}, "sinks.alertmanager.queue_size", "from 1 to"),
        ({"alertmanager": {"url": "http://x", "labels": {"severity": "x"}}}, "sinks.alertmanager.labels.severity",
         "reserved"),
        ({"alertmanager": {"url": "http://x", "labels": {"a-b": "x"}}}, "sinks.alertmanager.labels.a-b",
         "invalid label name"),
        ({"alertmanager": {"url": "http://x", "resend_interval": "10ms"}}, "sinks.alertmanager.resend_interval",
         "must be 0 (never) or between 1s and 1h"),
        ({"alertmanager": {"url": "http://x", "backoff": "2s", "max_backoff": "1s"}},
         "sinks.alertmanager.max_backoff", "must be >= backoff (2s)"),
        ({"webhook": [{"url": "http://x"}, {"url": "http://y", "tiemout": "1s"}]}, "sinks.webhook[1].tiemout",
         "unknown field"),
        ({"webhook": [{"url": "http://x", "instance": "n"}]}, "sinks.webhook[0].instance", "unknown field"),
        ({"webhook": [{"url": "http://x", "headers": {"X-A": "a\nb"}}]}, "sinks.webhook[0].headers.X-A",
         "without line breaks"),
        ({"webhook": [{"url": "http://x", "name": "ops"}, {"url": "http://y", "name": "ops"}]},
         "sinks.webhook[1].name", "duplicate sink name 'ops'"),
        ({"slack": "https://hooks.slack.com/x"}, "sinks.slack", "must be a table"),
        ({"alertmanager": {"url": "http://a", "urls": ["http://b"]}}, "sinks.alertmanager.urls", "not both"),
        ({"alertmanager": {"urls": []}}, "sinks.alertmanager.urls", "non-empty list of URLs"),
        ({"alertmanager": {"urls": "http://a"}}, "sinks.alertmanager.urls", "non-empty list of URLs"),
        ({"alertmanager": {"urls": ["http://a", "ftp://b"]}}, "sinks.alertmanager.urls[1]", "scheme 'ftp'"),
        ({"alertmanager": {"urls": ["http://a:9093", "https://a:9093/x"]}}, "sinks.alertmanager.urls[1]",
         "two replicas at the same address ('alertmanager@a:9093')"),
        ({"webhook": {"urls": ["http://a"]}}, "sinks.webhook.urls", "unknown field"),
        ({"slack": {"url": "http://x", "max_retries": True}}, "sinks.slack.max_retries", "must be an integer"),
    ],
)
def test_settings_errors_name_the_field(table, field, detail):
    with pytest.raises(ConfigError) as err:
        parse_sinks(table, SOURCE)
    assert err.value.field == field
    assert detail in err.value.message
    assert str(err.value).startswith(f"{SOURCE}: {field}: ")


def test_a_secret_url_is_never_echoed_in_errors():
    with pytest.raises(ConfigError) as err:
        parse_sinks({"slack": {"url": "hooks.slack.com/services/T000/B000/SECRETSECRET"}}, SOURCE)
    assert "SECRET" not in str(err.value)


def test_config_file_reaches_the_sinks_section():
    from ksift.config import parse_config

    config = parse_config('[sinks.webhook]\nurl = "http://127.0.0.1:8080/x"\n', SOURCE)
    assert config.section("sinks").of_kind("webhook")[0].url == "http://127.0.0.1:8080/x"
    assert parse_config("", SOURCE).section("sinks").sinks == ()
    assert json.dumps([s.kind for s in config.section("sinks").sinks]) == '["webhook"]'


# -- Alertmanager in high availability: every replica on its own ------------------------------


def test_a_cluster_gives_one_sink_per_replica():
    text = {"alertmanager": [{"urls": ["http://127.0.0.1:9093", "http://am-1.monitoring:9093/", "http://[::1]"],
                              "labels": {"cluster": "prod"}, "queue_size": 7},
                             {"url": "http://127.0.0.1:9094", "name": "other"}]}
    parsed = parse_sinks(text, SOURCE)
    sinks = build_sinks(parsed, env={"NODE_NAME": "node-7"})
    assert [(type(s).__name__, s.name, s.settings.url) for s in sinks] == [
        ("AlertmanagerSink", "alertmanager@127.0.0.1:9093", "http://127.0.0.1:9093/api/v2/alerts"),
        ("AlertmanagerSink", "alertmanager@am-1.monitoring:9093", "http://am-1.monitoring:9093/api/v2/alerts"),
        ("AlertmanagerSink", "alertmanager@[::1]", "http://[::1]/api/v2/alerts"),
        ("AlertmanagerSink", "other", "http://127.0.0.1:9094/api/v2/alerts")]
    # Same labels, instance and limits for every replica; a queue each.
    assert {(s.instance, s.static_labels["cluster"], s.settings.queue_size) for s in sinks[:3]} == {
        ("node-7", "prod", 7)}
    assert len({id(s._queue) for s in sinks}) == 4
    # A replica's name can never be a configured one ('@' is not allowed in names).
    with pytest.raises(ConfigError):
        parse_sinks({"webhook": {"url": "http://x", "name": "alertmanager@127.0.0.1:9093"}}, SOURCE)


def test_a_dead_replica_delays_no_other_and_each_counts_its_own(tmp_path: Path):
    async def main():
        async with Receiver(hang=True) as dead, Receiver() as alive:
            table = {"alertmanager": {"urls": [dead.url, alive.url], "timeout": "60s", "queue_size": 5,
                                      "drain_timeout": "200ms", "resend_interval": "0s"}}
            sinks = build_sinks(parse_sinks(table, SOURCE), env={"NODE_NAME": "n"})
            for sink in sinks:
                await sink.start()
            first = make_alert(0)
            for sink in sinks:
                sink.emit(first)
            await asyncio.wait_for(dead.arrived.wait(), 20)  # that replica's worker is stuck now
            stuck, healthy = sinks
            emitting = 0.0
            for n in range(1, 21):
                alert = make_alert(n)
                started = time.monotonic()
                for sink in sinks:  # the agent's loop: every sink gets every alert
                    sink.emit(alert)
                emitting += time.monotonic() - started
                # Alerts come one after another: the healthy replica keeps up, the other never will.
                await until(lambda n=n: healthy.delivered == n + 1)
            report = Funnel().as_dict(Engine(), sinks)
            for sink in sinks:
                await sink.stop()
            return stuck, healthy, alive, emitting, report

    class Engine:
        stats: dict = {}
        open: dict = {}

    stuck, healthy, alive, emitting, report = asyncio.run(main())
    assert emitting < 2.0, emitting
    assert [body[0]["annotations"]["incident_id"] for body in alive.bodies()] == [f"inc-{n}" for n in range(21)]
    assert healthy.failed == 0
    assert stuck.delivered == 0 and stuck.dropped_queue_full == 15 and stuck.failed == 21
    # The funnel (and so /metrics) shows each replica under its own name.
    assert report["sinks"][healthy.name]["delivered"] == 21
    assert report["sinks"][stuck.name]["dropped_queue_full"] == 15
