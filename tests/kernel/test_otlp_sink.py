"""A real agent sends a real fork storm's incident as OpenTelemetry log records to an OTLP/HTTP endpoint on
loopback, which decodes them with the protocol's own definitions (opentelemetry-proto); a second,
absent collector delays nothing and counts its losses."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from harness import (
    LoopbackHttpServer,
    QuietHandler,
    free_port,
    packaged_rule,
    run_forker,
    start_agent,
    wait_for,
    write_rules,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber


def any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class OtlpCollector(LoopbackHttpServer):
    """POST /v1/logs: every ExportLogsServiceRequest decoded and kept as (resource, record) pairs."""

    def __init__(self):
        self.records: list[tuple[dict, object]] = []
        self.content_types: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802 - the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportLogsServiceRequest()
                request.ParseFromString(body)
                with lock:
                    outer.content_types.append(self.headers.get("Content-Type", ""))
                    for rl in request.resource_logs:
                        resource = {kv.key: any_value(kv.value) for kv in rl.resource.attributes}
                        for sl in rl.scope_logs:
                            outer.records.extend((resource, r) for r in sl.log_records)
                answer = ExportLogsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        super().__init__(Handler)

    def for_pid(self, pid: int) -> list[tuple[dict, object, dict]]:
        out = []
        for resource, record in list(self.records):
            attrs = {kv.key: any_value(kv.value) for kv in record.attributes}
            if attrs.get("process.pid") == pid:
                out.append((resource, record, attrs))
        return out


def test_a_fork_storm_reaches_the_collector_as_log_records(tmp_path: Path):
    collector = OtlpCollector()
    agent = None
    try:
        rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[[sinks.otlp]]\nendpoint = "{collector.base_url}"\nheaders = {{ Authorization = "Bearer t0ken" }}\n'
            f'[[sinks.otlp]]\nname = "absent"\nendpoint = "http://127.0.0.1:{free_port()}"\n'
            'max_retries = 1\nbackoff = "100ms"\n')
        agent = start_agent(tmp_path / "agent", "--rules", str(rules), "--config", str(config))
        agent.wait_ready()

        work = run_forker(rate=200, seconds=3, comm="ks-otlp")
        pid = work["pid"]
        records = wait_for("the open and resolved records", lambda: (r := collector.for_pid(pid))
                           and {a["ksift.alert.status"] for _, _, a in r} == {"open", "resolved"} and r)
        assert set(collector.content_types) == {"application/x-protobuf"}
        opened = next(a for a in agent.alerts_of("fork_storm", pid) if a["status"] == "open")
        (resource, record, attrs), = [r for r in records if r[2]["ksift.alert.status"] == "open"]
        host = os.environ.get("NODE_NAME") or socket.gethostname()
        assert resource["service.name"] == "ksift" and resource["host.name"] == host
        assert resource["host.id"] == Path("/etc/machine-id").read_text().strip()
        assert record.event_name == "ksift.alert"
        assert record.severity_number == SeverityNumber.SEVERITY_NUMBER_WARN and record.severity_text == "warning"
        assert record.body.string_value == opened["summary"]
        assert attrs["ksift.rule"] == "fork_storm" and attrs["ksift.incident.id"] == opened["incident_id"]
        assert attrs["ksift.alert.id"] == opened["id"] and attrs["ksift.count"] == opened["count"]
        assert attrs["ksift.process.comm"] == "ks-otlp" and attrs["process.parent_pid"] == work["ppid"]
        assert attrs["process.executable.path"] == opened["subject"]["exe"]
        assert attrs["process.linux.cgroup"] == "0::" + opened["subject"]["cgroup"]

        assert agent.terminate() == 0, agent.stderr()
        sinks = agent.stats()["sinks"]
        assert sinks["otlp"]["failed"] == 0 and sinks["otlp"]["delivered"] >= 2
        # The absent collector lost what it was given, counted; it held up neither the other nor the agent.
        assert sinks["absent"]["delivered"] == 0 and sinks["absent"]["failed"] >= 2
        assert sinks["absent"]["gave_up"] + sinks["absent"]["dropped_at_stop"] == sinks["absent"]["failed"]
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.terminate()
        collector.close()
