"""The OTLP sink against a real OTLP/HTTP endpoint on loopback that decodes every request with the
OpenTelemetry protocol's own definitions (opentelemetry-proto), as a collector does."""

from __future__ import annotations

import asyncio
import importlib
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from alert_factory import make_alert, make_subject, resolved
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

from ksift.errors import ConfigError
from ksift.sinks.base import Sink
from ksift.sinks.delivery import DeliverySettings
from ksift.sinks.otlp import SEMCONV_NAMES, OtlpLogSink, host_resource, log_attributes
from ksift.sinks.settings import build_sinks, otlp_logs_url, parse_sinks

SOURCE = "agent.toml"
REPO = Path(__file__).resolve().parents[2]


def any_value(value):
    """A decoded AnyValue as a Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(pb) -> dict:
    return {kv.key: any_value(kv.value) for kv in pb}


class Collector:
    """A real OTLP/HTTP logs endpoint on 127.0.0.1: decodes each request, answers from a script.

    Each entry of `answers` is a status, or (status, partial-success rejected count); then 200.
    """

    def __init__(self, answers: list | None = None, hang: bool = False, ssl_context: ssl.SSLContext | None = None):
        self.answers = list(answers or [])
        self.hang = hang
        self.ssl_context = ssl_context
        self.requests: list[tuple[str, dict, ExportLogsServiceRequest]] = []
        self.arrived = asyncio.Event()
        self.url = ""

    async def __aenter__(self) -> "Collector":
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip itself, as a collector does
        decoded = ExportLogsServiceRequest()
        decoded.ParseFromString(body)
        self.requests.append((request.path, dict(request.headers), decoded))
        self.arrived.set()
        if self.hang:
            await asyncio.Event().wait()
        answer = self.answers.pop(0) if self.answers else 200
        status, rejected = answer if isinstance(answer, tuple) else (answer, 0)
        response = ExportLogsServiceResponse()
        if rejected:
            response.partial_success.rejected_log_records = rejected
            response.partial_success.error_message = "attribute limit"
        return web.Response(status=status, body=response.SerializeToString() if status == 200 else b"no",
                            content_type="application/x-protobuf")

    def records(self) -> list:
        """(resource attributes, scope, log record) of every record received, in order."""
        out = []
        for _, _, request in self.requests:
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    for record in sl.log_records:
                        out.append((attributes(rl.resource.attributes), sl.scope, record))
        return out


async def until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def otlp_sink(endpoint: str, tmp_path: Path | None = None, env: dict | None = None, **table) -> OtlpLogSink:
    """An OTLP sink built as the agent builds it, from a [sinks.otlp] table."""
    table = {"endpoint": endpoint, "max_retries": 2, "backoff": "10ms", "max_backoff": "50ms", **table}
    machine_id = tmp_path / "machine-id" if tmp_path else Path("/nonexistent/machine-id")
    if tmp_path:
        machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    (sink,) = build_sinks(parse_sinks({"otlp": table}, SOURCE), env={"NODE_NAME": "node-7"} if env is None else env,
                          hostname=lambda: "pod-xyz", machine_id_path=str(machine_id))
    return sink


# -- what a collector receives ---------------------------------------------------------------


def test_collector_gets_resource_event_severity_and_attributes(tmp_path: Path):
    subject = make_subject(pod_name="web-0", pod_namespace="shop", container_name="app", pod_uid="u-1",
                           systemd_unit=None)
    opened = make_alert(1, subject=subject, severity="critical", details={"path": "/api", "bytes": 12,
                                                                            "hist": [1, 2]})

    async def main():
        async with Collector() as rx:
            sink = otlp_sink(rx.url, tmp_path, headers={"Authorization": "Bearer s3cret"},
                             resource_attributes={"deployment.environment.name": "prod"})
            assert isinstance(sink, Sink) and sink.name == "otlp"
            await sink.start()
            sink.emit(opened)
            sink.emit(resolved(opened))
            await until(lambda: sink.delivered == 2)
            await sink.stop()
        return rx, sink

    rx, sink = asyncio.run(main())
    path, headers, _ = rx.requests[0]
    assert path == "/v1/logs"
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["Authorization"] == "Bearer s3cret"
    (resource, scope, record), (resource2, _, record2) = rx.records()
    # The host (node name in a DaemonSet, machine id) and the agent.
    assert resource["service.name"] == "ksift" and resource["service.version"]
    assert resource["host.name"] == "node-7" and resource["k8s.node.name"] == "node-7"
    assert resource["host.id"] == "0123456789abcdef0123456789abcdef"
    assert resource["deployment.environment.name"] == "prod"
    assert resource["telemetry.sdk.name"] == "opentelemetry"  # the SDK made it
    assert resource2 == resource
    assert scope.name == "ksift"
    # The record: event name, severity, body, time of the alert.
    assert record.event_name == "ksift.alert"
    assert record.severity_number == SeverityNumber.SEVERITY_NUMBER_ERROR2
    assert record.severity_text == "critical"
    assert record.body.string_value == opened["summary"]
    assert record.time_unix_nano == 1795565400123000000  # 2026-11-25T00:10:00.123Z
    assert record.observed_time_unix_nano >= record.time_unix_nano
    attrs = attributes(record.attributes)
    assert {k: attrs[k] for k in ("ksift.rule", "ksift.incident.id", "ksift.alert.id", "ksift.alert.status",
                                  "ksift.count", "ksift.threshold", "ksift.window_s")} == {
        "ksift.rule": "fork_storm", "ksift.incident.id": "inc-1", "ksift.alert.id": "a1",
        "ksift.alert.status": "open", "ksift.count": 57, "ksift.threshold": 50, "ksift.window_s": 1.0}
    # Semantic conventions for the subject: process, container, pod.
    assert attrs["process.pid"] == 1234 and attrs["process.parent_pid"] == 1200
    assert attrs["process.executable.path"] == "/usr/bin/bash" and attrs["process.executable.name"] == "bash"
    assert attrs["process.command_args"] == ["bash", "-c", "f(){ f|f& };f"]
    assert attrs["process.user.id"] == 0 and attrs["ksift.process.comm"] == "bash"
    assert attrs["process.linux.cgroup"] == "0::" + subject["cgroup"]
    assert attrs["container.id"] == subject["container_id"] and attrs["container.runtime.name"] == "docker"
    assert (attrs["k8s.pod.name"], attrs["k8s.namespace.name"], attrs["k8s.container.name"],
            attrs["k8s.pod.uid"]) == ("web-0", "shop", "app", "u-1")
    assert attrs["ksift.ancestry"] == "1200 (sshd) <- 1 (systemd)"
    assert attrs["ksift.details.path"] == "/api" and attrs["ksift.details.bytes"] == 12
    assert json.loads(attrs["ksift.details.hist"]) == [1, 2]
    assert "ksift.resolved_at" not in attrs and "ksift.systemd.unit" not in attrs  # unset: left out
    # The resolution: same incident, its own status, time and duration.
    attrs2 = attributes(record2.attributes)
    assert attrs2["ksift.alert.status"] == "resolved" and attrs2["ksift.incident.id"] == "inc-1"
    assert attrs2["ksift.duration_s"] == 5.0 and attrs2["ksift.resolved_at"] == "2026-11-25T00:10:05.000Z"
    assert record2.severity_number == record.severity_number and record2.event_name == "ksift.alert"
    assert sink.counters() == {"delivered": 2, "failed": 0, "retried": 0, "gave_up": 0, "rejected": 0,
                               "dropped_queue_full": 0, "dropped_at_stop": 0, "filtered": 0, "queued": 0}


def test_remediation_decisions_and_degraded_alerts_are_attributes():
    alert = make_alert(2, degraded={"records_lost": 3, "reason": "ring buffer full"},
                       remediation={"decision_id": "d-9", "action": "kill_tree", "mode": "enforce",
                                    "status": "done", "guard": None, "reason": "", "summary": "killed 4",
                                    "outcome": {"text": "quiet"}})
    attrs = log_attributes(alert)
    assert attrs["ksift.degraded.records_lost"] == 3 and attrs["ksift.degraded.reason"] == "ring buffer full"
    assert (attrs["ksift.remediation.decision_id"], attrs["ksift.remediation.action"],
            attrs["ksift.remediation.status"], attrs["ksift.remediation.summary"]) == (
        "d-9", "kill_tree", "done", "killed 4")
    assert "ksift.remediation.guard" not in attrs and "ksift.remediation.reason" not in attrs
    # A sparse alert (an old stored one, a bug upstream) still makes a record.
    assert log_attributes({"id": "x", "subject": None}) == {"ksift.alert.id": "x"}


def test_gzip_and_a_full_logs_url(tmp_path: Path):
    async def main():
        async with Collector() as rx:
            sink = otlp_sink(rx.url + "/otlp/v1/logs/", tmp_path, compression="gzip")
            await sink.start()
            sink.emit(make_alert())
            await until(lambda: sink.delivered == 1)
            await sink.stop()
        return rx

    rx = asyncio.run(main())
    path, headers, _ = rx.requests[0]
    assert path == "/otlp/v1/logs" and headers["Content-Encoding"] == "gzip"
    assert rx.records()[0][2].event_name == "ksift.alert"


def test_the_resource_without_a_node_name_or_machine_id():
    resource = host_resource({}, lambda: "box", "/nonexistent/machine-id").attributes
    assert resource["host.name"] == "box" and resource["service.name"] == "ksift"
    assert "host.id" not in resource and "k8s.node.name" not in resource


# -- a collector that fails, refuses, is absent or hangs --------------------------------------


def test_failing_collector_is_retried_then_counted():
    async def main():
        async with Collector(answers=[503, 502, 503, 503, 429]) as rx:
            sink = otlp_sink(rx.url)  # max_retries 2: three attempts per alert
            await sink.start()
            sink.emit(make_alert(1))
            await until(lambda: sink.failed == 1)
            sink.emit(make_alert(2))  # 503, 429, then 200
            await until(lambda: sink.delivered == 1)
            await sink.stop()
        return rx, sink

    rx, sink = asyncio.run(main())
    assert len(rx.requests) == 6
    assert (sink.gave_up, sink.retried, sink.delivered, sink.failed) == (1, 4, 1, 1)


@pytest.mark.parametrize("answer", [500, 400, 401, 404, (200, 1)])
def test_what_otlp_says_not_to_retry_is_rejected_at_once(answer):
    async def main():
        async with Collector(answers=[answer]) as rx:
            sink = otlp_sink(rx.url)
            await sink.start()
            sink.emit(make_alert())
            await until(lambda: sink.failed == 1)
            await sink.stop()
        return rx, sink

    rx, sink = asyncio.run(main())
    assert len(rx.requests) == 1  # OTLP/HTTP: only 429, 502, 503, 504 are retryable
    assert (sink.rejected, sink.retried, sink.delivered) == (1, 0, 0)


def test_absent_collector_gives_up_and_counts():
    async def main():
        sink = otlp_sink(f"http://127.0.0.1:{free_port()}")
        await sink.start()
        sink.emit(make_alert())
        await until(lambda: sink.failed == 1)
        await sink.stop()
        return sink

    sink = asyncio.run(main())
    assert (sink.gave_up, sink.retried, sink.delivered) == (1, 2, 0)
    assert "ConnectError" in (sink.last_error or "")  # httpx names it so (was aiohttp's ClientConnectorError)


def test_a_hung_collector_delays_nothing_and_loses_only_the_overflow():
    async def main():
        async with Collector(hang=True) as rx:
            sink = otlp_sink(rx.url, timeout="60s", queue_size=10, drain_timeout="200ms")
            await sink.start()
            sink.emit(make_alert(0))
            await asyncio.wait_for(rx.arrived.wait(), 20)  # the worker now waits on the collector
            started = time.monotonic()
            for n in range(1, 51):
                sink.emit(make_alert(n))
            elapsed = time.monotonic() - started
            # The loop stays free while the request hangs: other coroutines run at once.
            tick = time.monotonic()
            await asyncio.sleep(0.01)
            assert time.monotonic() - tick < 1.0
            stop_started = time.monotonic()
            await sink.stop()
            return sink, elapsed, time.monotonic() - stop_started

    sink, elapsed, stopping = asyncio.run(main())
    assert elapsed < 2.0, elapsed  # 50 renders and queueings, no network
    assert stopping < 10.0  # bounded by drain_timeout, not by the collector
    assert sink.dropped_queue_full == 40  # 10 fit; the oldest went, counted
    assert sink.dropped_at_stop == 11 and sink.failed == 51 and sink.delivered == 0


# -- TLS with the configured CA ------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path):
    """A self-signed certificate for 127.0.0.1 (openssl), as a private CA would give a collector."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    done = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                           "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {done.stderr.strip()}")
    return key, cert


def test_tls_collector_verified_with_the_configured_ca(tls_files):
    key, cert = tls_files
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)

    async def main():
        async with Collector(ssl_context=server_ssl) as rx:
            trusted = otlp_sink(rx.url, ca_file=str(cert), name="trusted")
            untrusted = otlp_sink(rx.url, name="untrusted", max_retries=0)  # the system's CAs only
            for sink in (trusted, untrusted):
                await sink.start()
                sink.emit(make_alert())
            await until(lambda: trusted.delivered == 1 and untrusted.failed == 1)
            for sink in (trusted, untrusted):
                await sink.stop()
        return rx, untrusted

    rx, untrusted = asyncio.run(main())
    assert len(rx.requests) == 1
    assert "certificate" in (untrusted.last_error or "").lower()


# -- [sinks.otlp] config ------------------------------------------------------------------------


def test_parse_the_otlp_table():
    parsed = parse_sinks({"otlp": {"endpoint": "https://otel.example:4318", "compression": "GZIP",
                                   "timeout": "2s", "headers": {"Authorization": "Bearer x"},
                                   "resource_attributes": {"deployment.environment.name": "prod"}}}, SOURCE)
    (s,) = parsed.of_kind("otlp")
    assert (s.url, s.compression, s.timeout_s, s.name) == ("https://otel.example:4318/v1/logs", "gzip", 2.0, "otlp")
    assert dict(s.resource_attributes) == {"deployment.environment.name": "prod"}
    assert otlp_logs_url("http://c:4318/") == "http://c:4318/v1/logs"
    assert otlp_logs_url("http://c:4318/gw/v1/logs") == "http://c:4318/gw/v1/logs"
    assert otlp_logs_url("http://c/prefix") == "http://c/prefix/v1/logs"


@pytest.mark.parametrize(
    ("table", "field", "detail"),
    [
        ({}, "sinks.otlp.endpoint", "missing"),
        ({"url": "http://c:4318"}, "sinks.otlp.url", "unknown field (allowed: endpoint, name,"),
        ({"endpoint": "grpc://c:4317"}, "sinks.otlp.endpoint", "scheme 'grpc'"),
        ({"endpoint": "http://c", "compression": "zstd"}, "sinks.otlp.compression",
         "'zstd' (expected one of: none, gzip)"),
        ({"endpoint": "http://c", "resource_attributes": {"service.name": "x"}},
         "sinks.otlp.resource_attributes.service.name", "set by ksift"),
        ({"endpoint": "http://c", "resource_attributes": {"env": 3}}, "sinks.otlp.resource_attributes.env",
         "non-empty string"),
        ({"endpoint": "http://c", "ca_file": "/nonexistent/ca.pem"}, "sinks.otlp.ca_file",
         "cannot load CA certificates from '/nonexistent/ca.pem'"),
        ({"endpoint": "http://c", "labels": {"a": "b"}}, "sinks.otlp.labels", "unknown field"),
    ],
)
def test_otlp_settings_errors_name_the_field(table, field, detail):
    with pytest.raises(ConfigError) as err:
        parse_sinks({"otlp": table}, SOURCE)
    assert err.value.field == field
    assert detail in err.value.message
    assert str(err.value).startswith(f"{SOURCE}: {field}: ")


def test_missing_sdk_is_a_config_error_that_says_what_to_install(monkeypatch):
    import ksift.sinks.settings as settings

    monkeypatch.setattr(settings, "installed", lambda name: name != "opentelemetry-sdk")
    with pytest.raises(ConfigError) as err:
        parse_sinks({"otlp": {"endpoint": "http://c:4318"}}, SOURCE)
    assert err.value.field == "sinks.otlp"
    assert "opentelemetry-sdk" in err.value.message and "pip install 'ksift[otlp]'" in err.value.message
    assert settings.installed("opentelemetry-sdk") is False and parse_sinks({}, SOURCE).sinks == ()


def test_a_bad_ca_file_is_a_config_error(tmp_path: Path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as err:
        parse_sinks({"webhook": {"url": "https://h", "ca_file": str(bad)}}, SOURCE)
    assert err.value.field == "sinks.webhook.ca_file"


# -- the SDK costs nothing unless configured ------------------------------------------------------

IMPORTS = """
import sys
from ksift.config import parse_config
from ksift.rules.parse import parse_rules, default_rules_text
from ksift.sinks.factory import configured_sinks
config = parse_config(sys.argv[1], "agent.toml")
sinks = configured_sinks(config, parse_rules(default_rules_text(), "rules.toml"), None)
print(sorted(type(s).__name__ for s in sinks))
print(sorted({m.split(".")[0] for m in sys.modules if m.startswith(("opentelemetry", "google.protobuf"))}))
"""

WITHOUT_OTLP = """
[sinks.alertmanager]
urls = ["http://127.0.0.1:9093", "http://127.0.0.2:9093"]
[[sinks.webhook]]
url = "http://127.0.0.1:8080/x"
[sinks.slack]
url = "https://hooks.slack.com/services/T/B/X"
"""


def sinks_and_modules(config: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", IMPORTS, config], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=True)
    built, modules = done.stdout.strip().splitlines()
    return built, modules


def test_the_sdk_is_imported_only_when_an_otlp_sink_is_configured():
    built, modules = sinks_and_modules(WITHOUT_OTLP)
    assert built == "['AlertmanagerSink', 'AlertmanagerSink', 'ApiServer', 'SlackSink', 'WebhookSink']"
    assert modules == "[]"  # neither the SDK nor protobuf
    built, modules = sinks_and_modules(WITHOUT_OTLP + '[sinks.otlp]\nendpoint = "http://127.0.0.1:4318"\n')
    assert "OtlpLogSink" in built
    assert modules == "['google', 'opentelemetry']"


# -- attribute names follow the semantic conventions ---------------------------------------------


def test_convention_names_exist_in_the_semantic_conventions_package():
    import opentelemetry.semconv as semconv

    known: set[str] = set()
    root = Path(semconv.__path__[0])
    # Stable and incubating (a namespace package: pkgutil does not walk it) attribute modules.
    for path in root.rglob("*_attributes.py"):
        name = ".".join((semconv.__name__, *path.relative_to(root).with_suffix("").parts))
        module = importlib.import_module(name)
        known |= {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str)}
    assert len(known) > 500  # the package's conventions were found
    assert set(SEMCONV_NAMES) <= known, sorted(set(SEMCONV_NAMES) - known)
    # Names the sink sets that are not ksift.* are all conventions.
    alert = make_alert(subject=make_subject(pod_name="p", pod_namespace="n", container_name="c", pod_uid="u"))
    used = set(log_attributes(alert)) | set(host_resource({"NODE_NAME": "n"}, lambda: "h").attributes)
    assert {name for name in used if not name.startswith(("ksift.", "telemetry.sdk.", "service.instance"))} \
        <= set(SEMCONV_NAMES)


def test_emit_never_raises_and_counts_a_bad_alert():
    sink = OtlpLogSink(DeliverySettings(url="http://127.0.0.1:1/v1/logs", name="otlp"),
                       host_resource({}, lambda: "h", "/nonexistent"))
    sink.emit("not a dict")
    assert sink.failed == 1
    sink.emit(make_alert(ts="not a time"))  # the record still goes, stamped now
    assert sink.counters()["queued"] == 1
    sink.close()
    sink.close()
    assert sink.dropped_at_stop == 1
