"""OTLP sink: every alert transition as an OpenTelemetry log record, over OTLP/HTTP (protobuf).

A fleet sends ksift's incidents through an OpenTelemetry Collector, which fans
them out to Loki, Elasticsearch, Kafka, ClickHouse... Each alert the agent
emits (open, resolved, and the same alert again when a remediation decision on
its incident changes) becomes one log record:

  resource     service.name = ksift, service.version, host.name ($NODE_NAME,
               else the host name), host.id (/etc/machine-id), k8s.node.name
               (when $NODE_NAME is set), plus the configured resource_attributes
               and OTEL_RESOURCE_ATTRIBUTES (the SDK's own detector)
  scope        ksift, the package version
  event_name   ksift.alert
  timestamp    the alert's `ts` (the kernel's time of the crossing for `open`)
  severity     the rule's: info -> INFO, warning -> WARN, critical -> ERROR2
               (OpenTelemetry's mapping of syslog's Critical); text as ksift
               spells it
  body         the alert's summary sentence
  attributes   OpenTelemetry semantic conventions where one exists (process.pid,
               process.executable.path, container.id, k8s.pod.name, ...) and
               ksift.* for the rest (rule, incident id, status, count...):
               see ATTRIBUTES below and docs/deploy.md.

The record is made by the OpenTelemetry SDK (LoggerProvider, Logger.emit, its
attribute limits) and encoded by the OTLP exporter package's own encoder
(opentelemetry-exporter-otlp-proto-common: ExportLogsServiceRequest), never by
hand. Delivery is the shared core's (ksift.sinks.delivery): emit() only renders
and queues, one asyncio worker posts with httpx, so a collector that is down
never blocks the event loop (the SDK exporter's own retries would sleep in the
calling thread), and the queue, retries and counters are those of every
network sink. Retried as OTLP/HTTP says: 429, 502, 503, 504 and network errors;
an answer of 200 whose partial_success rejected the record counts as rejected.

This module imports the SDK: ksift.sinks.settings imports it only when an
[sinks.otlp] is configured, so an agent without one never pays its memory.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from importlib import metadata
from typing import Any

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.sdk._logs import LoggerProvider, LogRecordProcessor
from opentelemetry.sdk.resources import Resource

from ksift.sinks.delivery import DeliverySettings, DeliverySink
from ksift.timeparse import parse_timestamp

logger = logging.getLogger(__name__)

EVENT_NAME = "ksift.alert"
SCOPE = "ksift"
# OTLP/HTTP: "429, 502, 503, 504 are retryable; all other 4xx and 5xx are not".
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
SEVERITY_NUMBERS = {"info": SeverityNumber.INFO, "warning": SeverityNumber.WARN,
                    "critical": SeverityNumber.ERROR2}
MACHINE_ID = "/etc/machine-id"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Attribute names: OpenTelemetry semantic conventions where one exists (checked against the
# opentelemetry-semantic-conventions package by tests/unit/test_otlp.py), ksift.* otherwise.
ATTRIBUTES = {
    # the alert
    "id": "ksift.alert.id",
    "status": "ksift.alert.status",
    "incident_id": "ksift.incident.id",
    "rule": "ksift.rule",
    "severity": "ksift.severity",
    "count": "ksift.count",
    "peak_window_count": "ksift.peak_window_count",
    "window_s": "ksift.window_s",
    "threshold": "ksift.threshold",
    "suppressed": "ksift.suppressed",
    "started_at": "ksift.started_at",
    "resolved_at": "ksift.resolved_at",
    "duration_s": "ksift.duration_s",
    "subject_exited": "ksift.subject_exited",
}
SUBJECT_ATTRIBUTES = {
    "pid": "process.pid",
    "ppid": "process.parent_pid",
    "exe": "process.executable.path",
    "uid": "process.user.id",
    "comm": "ksift.process.comm",  # the kernel's task name: no convention (not the executable's name)
    "start_boottime_ns": "ksift.process.start_boottime_ns",
    "cgroup_id": "ksift.cgroup.id",
    "container_id": "container.id",
    "container_runtime": "container.runtime.name",
    "pod_uid": "k8s.pod.uid",
    "pod_name": "k8s.pod.name",
    "pod_namespace": "k8s.namespace.name",
    "container_name": "k8s.container.name",
    "systemd_unit": "ksift.systemd.unit",
}
# Semantic-convention names only: the tests check each exists in the conventions package.
SEMCONV_NAMES = ("process.pid", "process.parent_pid", "process.executable.path", "process.executable.name",
                 "process.user.id", "process.command", "process.command_args", "process.linux.cgroup",
                 "container.id", "container.runtime.name", "k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name",
                 "k8s.container.name", "k8s.node.name", "host.name", "host.id", "service.name",
                 "service.version")


def _version() -> str:
    try:
        return metadata.version("ksift")
    except metadata.PackageNotFoundError:
        return "unknown"


def read_machine_id(path: str = MACHINE_ID) -> str | None:
    """The host's machine id (systemd's /etc/machine-id), or None when it cannot be read."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def host_resource(env: Mapping[str, str], hostname: Callable[[], str], machine_id_path: str = MACHINE_ID,
                  extra: Mapping[str, str] | None = None) -> Resource:
    """The resource every record carries: this agent on this host."""
    attributes: dict[str, Any] = dict(extra or {})
    node = env.get("NODE_NAME")
    attributes.update({"service.name": "ksift", "service.version": _version(),
                       # In a DaemonSet the pod's host name is the pod's; the node name says which machine.
                       "host.name": node or hostname()})
    machine_id = read_machine_id(machine_id_path)
    if machine_id:
        attributes["host.id"] = machine_id
    if node:
        attributes["k8s.node.name"] = node
    # Resource.create adds the SDK's telemetry.sdk.* and OTEL_RESOURCE_ATTRIBUTES; ours win over the latter.
    return Resource.create(attributes)


class _Capture(LogRecordProcessor):
    """The SDK's processor slot: hands each record the Logger made straight back to the sink.

    The sink queues it itself (the delivery core's bounded queue): no BatchLogRecordProcessor
    thread, no second queue.
    """

    def __init__(self) -> None:
        self.last: Any = None

    def on_emit(self, log_record: Any) -> None:
        self.last = log_record

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class OtlpLogSink(DeliverySink):
    kind = "otlp"
    content_type = "application/x-protobuf"
    read_success_body = True  # partial_success says whether the collector kept the record

    def __init__(self, settings: DeliverySettings, resource: Resource, compression: str = "none", **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.compression = compression
        self.resource = resource
        self._provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self._capture = _Capture()
        self._provider.add_log_record_processor(self._capture)
        self._logger = self._provider.get_logger(SCOPE, _version())

    def render(self, alert: dict[str, Any]) -> Any:
        """The SDK's log record for one alert (encoded when its turn comes)."""
        severity = str(alert.get("severity") or "info")
        self._capture.last = None
        self._logger.emit(LogRecord(
            timestamp=_unix_ns(alert.get("ts")), observed_timestamp=time.time_ns(),
            severity_text=severity, severity_number=SEVERITY_NUMBERS.get(severity, SeverityNumber.UNSPECIFIED),
            body=str(alert.get("summary") or ""), attributes=log_attributes(alert), event_name=EVENT_NAME))
        record, self._capture.last = self._capture.last, None
        if record is None:
            raise RuntimeError("the OpenTelemetry logger dropped the record (OTEL_SDK_DISABLED?)")
        return record

    def encode(self, payload: Any) -> bytes:
        body = encode_logs([payload]).SerializeToString()
        return gzip.compress(body, compresslevel=6) if self.compression == "gzip" else body

    def request_headers(self) -> dict[str, str]:
        return {"Content-Encoding": "gzip"} if self.compression == "gzip" else {}

    def retryable(self, status: int) -> bool:
        return status in RETRYABLE_STATUSES

    def refused(self, body: bytes) -> str | None:
        if not body:
            return None
        response = ExportLogsServiceResponse()
        try:
            response.ParseFromString(body)
        except Exception:  # not protobuf (a proxy's page): the status said 2xx, so it is delivered
            return None
        partial = response.partial_success
        if partial.rejected_log_records:
            return f"{partial.rejected_log_records} record(s) rejected: {partial.error_message or 'no reason'}"
        return None

    def close(self) -> None:
        super().close()
        try:
            self._provider.shutdown()
        except Exception as exc:  # never raise from close
            logger.debug("otlp sink %s: provider shutdown: %s", self.name, exc)


def log_attributes(alert: Mapping[str, Any]) -> dict[str, Any]:
    """The record's attributes for one alert: only set values, each a type OTLP carries."""
    out: dict[str, Any] = {}
    for key, name in ATTRIBUTES.items():
        _put(out, name, alert.get(key))
    subject = alert.get("subject") if isinstance(alert.get("subject"), dict) else {}
    for key, name in SUBJECT_ATTRIBUTES.items():
        _put(out, name, subject.get(key))
    if subject.get("exe"):
        _put(out, "process.executable.name", os.path.basename(str(subject["exe"])))
    cmdline = subject.get("cmdline")
    if isinstance(cmdline, list) and cmdline:
        _put(out, "process.command", str(cmdline[0]))
        _put(out, "process.command_args", [str(arg) for arg in cmdline])
    if subject.get("cgroup"):
        # As /proc/<pid>/cgroup shows the unified (v2) hierarchy.
        _put(out, "process.linux.cgroup", f"0::{subject['cgroup']}")
    ancestry = alert.get("ancestry")
    if isinstance(ancestry, list) and ancestry:
        _put(out, "ksift.ancestry", " <- ".join(f"{a.get('pid')} ({a.get('comm')})" for a in ancestry
                                                if isinstance(a, dict)))
    degraded = alert.get("degraded")
    if isinstance(degraded, dict):
        _put(out, "ksift.degraded.records_lost", degraded.get("records_lost"))
        _put(out, "ksift.degraded.reason", degraded.get("reason"))
    details = alert.get("details")
    if isinstance(details, dict):
        for key, value in details.items():
            _put(out, f"ksift.details.{key}", value if _scalar(value) else json.dumps(value, default=str))
    remediation = alert.get("remediation")
    if isinstance(remediation, dict):
        for key in ("decision_id", "action", "mode", "status", "guard", "reason", "summary"):
            _put(out, f"ksift.remediation.{key}", remediation.get(key))
    return out


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float))


def _put(out: dict[str, Any], name: str, value: Any) -> None:
    if value is None or value == "":
        return
    if isinstance(value, list):
        out[name] = value
    elif _scalar(value):
        out[name] = value
    else:
        out[name] = str(value)


def _unix_ns(ts: Any) -> int:
    """An alert's RFC 3339 time as Unix nanoseconds (now if it has none or a bad one)."""
    try:
        return (parse_timestamp(ts) - _EPOCH) // timedelta(microseconds=1) * 1000
    except (TypeError, ValueError):
        return time.time_ns()
