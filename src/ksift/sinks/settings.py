"""The [sinks] config section: where alerts are delivered over the network.

Each kind is written either as one table or as an array of tables (several
receivers of the same kind):

    [sinks.alertmanager]
    url = "http://127.0.0.1:9093"   # base URL; /api/v2/alerts is appended
    min_severity = "warning"        # info, warning, critical: send this and above (default info)
    queue_size = 1000               # alerts waiting for delivery; a full queue drops the oldest
    timeout = "5s"                  # one request, connect to response
    max_retries = 5                 # on network errors, 5xx and 429; other 4xx are not retried
    backoff = "500ms"               # first retry delay, doubled each retry, with jitter
    max_backoff = "30s"
    drain_timeout = "5s"            # at shutdown, how long queued alerts may still be sent
    headers = { Authorization = "Bearer ..." }   # extra request headers
    # Alertmanager only:
    instance = ""                   # the instance label; default $NODE_NAME, else the host name
    labels = { cluster = "prod" }   # static labels added to every alert
    generator_url = "https://ksift.example/alerts/{incident_id}"
    resend_interval = "1m"          # re-post open alerts so Alertmanager keeps them active; 0 = never

    [[sinks.webhook]]               # the alert JSON as is
    url = "https://hooks.example/ksift"
    name = "ops"                    # sink name in counters and logs (default: the kind, then kind-2...)

    [sinks.slack]                   # Slack incoming webhook
    url = "https://hooks.slack.com/services/..."

    [sinks.otlp]                    # OpenTelemetry log records over OTLP/HTTP (protobuf)
    endpoint = "http://otel-collector:4318"   # /v1/logs is appended unless the path already ends so
    compression = "gzip"            # or "none" (the default)
    resource_attributes = { "deployment.environment.name" = "prod" }

Every kind also takes ca_file = "/etc/ksift/ca.pem" (PEM certificates that verify
the receiver's TLS certificate instead of the system's). An Alertmanager cluster
is written `urls = ["http://am-0:9093", "http://am-1:9093"]` instead of `url`:
each replica gets the alerts from a sink of its own, named <name>@<host:port>,
with its own queue, worker and counters, so a dead replica delays no other.

Errors name the field: sinks.alertmanager.url, sinks.webhook[1].timeout.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ksift.errors import ConfigError
from ksift.rules.model import SEVERITIES
from ksift.settings_fields import FROM_TO, choice, duration_between, integer_between, non_empty_path, string
from ksift.units import format_duration, parse_duration

KINDS = ("alertmanager", "webhook", "slack", "otlp")
_COMMON = ("url", "name", "min_severity", "queue_size", "timeout", "max_retries", "backoff", "max_backoff",
           "drain_timeout", "headers", "ca_file")
_ALERTMANAGER_ONLY = ("urls", "instance", "labels", "generator_url", "resend_interval")
# OTLP names its receiver `endpoint`, as OpenTelemetry's own configuration does.
_OTLP_FIELDS = ("endpoint", *_COMMON[1:], "compression", "resource_attributes")
COMPRESSIONS = ("none", "gzip")
# What the OTLP sink imports (the `otlp` extra of pyproject.toml).
OTLP_DISTRIBUTIONS = ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-common")
OTLP_LOGS_PATH = "/v1/logs"
# Separates a cluster's sink name from a replica's address; never part of a configured name.
REPLICA_SEPARATOR = "@"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Labels the sink sets itself; a static label may not replace them.
_RESERVED_LABELS = ("alertname", "severity", "instance", "pid", "comm", "container", "namespace", "pod")
_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
_ATTRIBUTE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,254}")
# Resource attributes the OTLP sink sets itself (ksift.sinks.otlp.host_resource).
_OTLP_RESERVED_RESOURCE = ("service.name", "service.version", "host.name", "host.id", "k8s.node.name")


@dataclass(frozen=True)
class SinkSettings:
    """One configured receiver. Durations are seconds."""

    kind: str
    url: str
    name: str
    min_severity: str = "info"
    queue_size: int = 1000
    timeout_s: float = 5.0
    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    drain_timeout_s: float = 5.0
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    ca_file: str | None = None
    # Alertmanager only
    replicas: tuple[str, ...] = ()  # `urls`: every replica of one cluster (then url is the first)
    instance: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    generator_url: str | None = None
    resend_interval_s: float = 60.0
    # OTLP only (url holds the endpoint, /v1/logs included)
    compression: str = "none"
    resource_attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class SinksSettings:
    sinks: tuple[SinkSettings, ...] = ()

    def of_kind(self, kind: str) -> tuple[SinkSettings, ...]:
        return tuple(s for s in self.sinks if s.kind == kind)


def parse_sinks(table: dict, source: str) -> SinksSettings:
    """Parse the [sinks] table into validated settings; errors name sinks.<kind>[i].<field>."""
    for kind in table:
        if kind not in KINDS:
            raise ConfigError(source, f"unknown sink kind (allowed: {', '.join(KINDS)})", field=f"sinks.{kind}")
    parsed: list[tuple[str, SinkSettings]] = []
    for kind in KINDS:
        if kind not in table:
            continue
        entries = table[kind]
        if isinstance(entries, dict):
            items = [(f"sinks.{kind}", entries)]
        elif isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries):
            items = [(f"sinks.{kind}[{i}]", e) for i, e in enumerate(entries)]
        else:
            raise ConfigError(source, f"must be a table [sinks.{kind}] or tables [[sinks.{kind}]]",
                              field=f"sinks.{kind}")
        for i, (where, entry) in enumerate(items):
            default_name = kind if i == 0 else f"{kind}-{i + 1}"
            parsed.append((where, _parse_one(kind, entry, source, where, default_name)))
    seen: dict[str, str] = {}
    for where, settings in parsed:
        if settings.name in seen:
            raise ConfigError(source, f"duplicate sink name {settings.name!r} (also used by {seen[settings.name]}): "
                                      "set a distinct name", field=f"{where}.name")
        seen[settings.name] = where
        for i, url in enumerate(settings.replicas):
            replica = replica_name(settings.name, url)
            if replica in seen:
                raise ConfigError(source, f"two replicas at the same address ({replica!r}): list each Alertmanager "
                                          "once", field=f"{where}.urls[{i}]")
            seen[replica] = f"{where}.urls[{i}]"
    return SinksSettings(tuple(settings for _, settings in parsed))


def _parse_one(kind: str, entry: dict, source: str, where: str, default_name: str) -> SinkSettings:
    allowed = _OTLP_FIELDS if kind == "otlp" else _COMMON + (_ALERTMANAGER_ONLY if kind == "alertmanager" else ())
    for name in entry:
        if name not in allowed:
            raise ConfigError(source, f"unknown field (allowed: {', '.join(allowed)})", field=f"{where}.{name}")
    values: dict[str, Any] = {"kind": kind}
    if kind == "otlp":
        missing = [name for name in OTLP_DISTRIBUTIONS if not installed(name)]
        if missing:
            raise ConfigError(source, f"needs the OpenTelemetry packages {', '.join(missing)}, not installed here: "
                                      "pip install 'ksift[otlp]'", field=where)
        if "endpoint" not in entry:
            raise ConfigError(source, "missing: the collector's OTLP/HTTP http:// or https:// URL (port 4318)",
                              field=f"{where}.endpoint")
        values["url"] = otlp_logs_url(_url(entry["endpoint"], source, f"{where}.endpoint"))
    elif kind == "alertmanager" and "urls" in entry:
        if "url" in entry:
            raise ConfigError(source, "set url (one Alertmanager) or urls (every replica of a cluster), not both",
                              field=f"{where}.urls")
        replicas = entry["urls"]
        if not isinstance(replicas, list) or not replicas:
            raise ConfigError(source, f"invalid value {replicas!r}: must be a non-empty list of URLs, one per "
                                      "replica", field=f"{where}.urls")
        values["replicas"] = tuple(_url(u, source, f"{where}.urls[{i}]") for i, u in enumerate(replicas))
        values["url"] = values["replicas"][0]
    elif "url" not in entry:
        missing = "url (or urls, every replica of a cluster)" if kind == "alertmanager" else "url"
        raise ConfigError(source, f"missing: {missing}, the receiver's http:// or https:// URL",
                          field=f"{where}.url")
    else:
        values["url"] = _url(entry["url"], source, f"{where}.url")
    values["name"] = _name(entry.get("name", default_name), source, f"{where}.name")
    if "min_severity" in entry:
        values["min_severity"] = choice(entry["min_severity"], source, f"{where}.min_severity", SEVERITIES,
                                        fold_case=True)
    for key, attr, low, high in (("queue_size", "queue_size", 1, 1_000_000), ("max_retries", "max_retries", 0, 100)):
        if key in entry:
            values[attr] = integer_between(entry[key], source, f"{where}.{key}", low, high, FROM_TO)
    for key, attr, low, high in (("timeout", "timeout_s", 0.1, 300.0), ("backoff", "backoff_s", 0.01, 3600.0),
                                 ("max_backoff", "max_backoff_s", 0.01, 3600.0),
                                 ("drain_timeout", "drain_timeout_s", 0.0, 300.0)):
        if key in entry:
            values[attr] = duration_between(entry[key], source, f"{where}.{key}", low, high)
    if "headers" in entry:
        values["headers"] = _headers(entry["headers"], source, f"{where}.headers")
    if "ca_file" in entry:
        values["ca_file"] = _ca_file(entry["ca_file"], source, f"{where}.ca_file")
    if kind == "otlp":
        if "compression" in entry:
            values["compression"] = choice(entry["compression"], source, f"{where}.compression", COMPRESSIONS,
                                           fold_case=True)
        if "resource_attributes" in entry:
            values["resource_attributes"] = _attributes(entry["resource_attributes"], source,
                                                        f"{where}.resource_attributes")
    if kind == "alertmanager":
        if "instance" in entry:
            values["instance"] = string(entry["instance"], source, f"{where}.instance")
        if "labels" in entry:
            values["labels"] = _labels(entry["labels"], source, f"{where}.labels")
        if "generator_url" in entry:
            values["generator_url"] = _url(entry["generator_url"], source, f"{where}.generator_url")
        if "resend_interval" in entry:
            seconds = parse_duration(entry["resend_interval"], source=source, field=f"{where}.resend_interval")
            if seconds != 0 and not 1.0 <= seconds <= 3600.0:
                raise ConfigError(source, f"invalid value {entry['resend_interval']!r}: must be 0 (never) or "
                                          "between 1s and 1h", field=f"{where}.resend_interval")
            values["resend_interval_s"] = seconds
    settings = SinkSettings(**values)
    if settings.max_backoff_s < settings.backoff_s:
        raise ConfigError(source, f"invalid value {format_duration(settings.max_backoff_s)}: must be >= backoff "
                                  f"({format_duration(settings.backoff_s)})", field=f"{where}.max_backoff")
    return settings


# -- building the sinks --------------------------------------------------------


def build_sinks(settings: SinksSettings, env: Mapping[str, str] | None = None,
                hostname: Callable[[], str] = socket.gethostname, machine_id_path: str = "/etc/machine-id") -> list:
    """The configured network sinks, not started yet (the agent awaits their start()).

    An Alertmanager cluster (`urls`) gives one sink per replica. The OpenTelemetry
    SDK is imported only when an [sinks.otlp] is configured (ksift.sinks.otlp).
    """
    if not settings.sinks:
        return []  # nothing configured: do not even import the HTTP client
    from ksift.sinks.alertmanager import AlertmanagerSink, alerts_url
    from ksift.sinks.delivery import DeliverySettings
    from ksift.sinks.slack import SlackSink
    from ksift.sinks.webhook import WebhookSink

    env = os.environ if env is None else env
    # In a DaemonSet the pod's host name is the pod's; the node name says which machine.
    host = env.get("NODE_NAME") or hostname()
    sinks: list = []
    for s in settings.sinks:
        def delivery(url: str, name: str, s: SinkSettings = s) -> DeliverySettings:
            return DeliverySettings(url=url, name=name, min_severity=s.min_severity, queue_size=s.queue_size,
                                    timeout_s=s.timeout_s, max_retries=s.max_retries, backoff_s=s.backoff_s,
                                    max_backoff_s=s.max_backoff_s, drain_timeout_s=s.drain_timeout_s,
                                    headers=s.headers, ca_file=s.ca_file)

        if s.kind == "alertmanager":
            # Alertmanager asks clients to send every alert to every replica of a cluster, not through a
            # load balancer: each replica gets its own sink (queue, worker, retries, counters).
            targets = [(replica_name(s.name, u), u) for u in s.replicas] or [(s.name, s.url)]
            for name, url in targets:
                sinks.append(AlertmanagerSink(delivery(alerts_url(url), name), instance=s.instance or host,
                                              static_labels=s.labels, generator_url=s.generator_url,
                                              resend_interval_s=s.resend_interval_s))
        elif s.kind == "otlp":
            from ksift.sinks.otlp import OtlpLogSink, host_resource

            resource = host_resource(env, hostname, machine_id_path, s.resource_attributes)
            sinks.append(OtlpLogSink(delivery(s.url, s.name), resource, compression=s.compression))
        elif s.kind == "slack":
            sinks.append(SlackSink(delivery(s.url, s.name), host=host))
        else:
            sinks.append(WebhookSink(delivery(s.url, s.name)))
    return sinks


def installed(distribution: str) -> bool:
    """Whether a Python distribution is installed (its metadata only: nothing is imported)."""
    # importlib.metadata (and the email package it parses metadata with, ~1.4 MiB resident) only
    # when a sink that needs a distribution is configured.
    from importlib import metadata

    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def replica_name(cluster: str, url: str) -> str:
    """The sink name of one Alertmanager replica: the cluster's name, '@', the replica's host[:port]."""
    parts = urlsplit(url)
    address = parts.hostname or ""
    if ":" in address:
        address = f"[{address}]"  # IPv6
    return f"{cluster}{REPLICA_SEPARATOR}{address}{f':{parts.port}' if parts.port else ''}"


def otlp_logs_url(endpoint: str) -> str:
    """The OTLP/HTTP logs URL for a configured endpoint: a base URL gets /v1/logs appended (as
    OTEL_EXPORTER_OTLP_ENDPOINT does); one whose path already ends in /v1/logs is used as is."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if not path.endswith(OTLP_LOGS_PATH):
        path += OTLP_LOGS_PATH
    return parts._replace(path=path).geturl()


# -- field converters ------------------------------------------------------------


def _url(value: object, source: str, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, f"invalid value {value!r}: must be an http:// or https:// URL", field=field_name)
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Never echo a URL that may hold a secret (Slack's does): show only what is wrong.
        raise ConfigError(source, f"invalid URL (scheme {parts.scheme or 'missing'!r}, host "
                                  f"{parts.hostname or 'missing'!r}): must be http:// or https:// with a host",
                          field=field_name)
    try:
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ConfigError(source, "invalid URL: bad port", field=field_name) from None
    return value.strip()


def _name(value: object, source: str, field_name: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(source, f"invalid value {value!r}: letters, digits, '_', '.', '-' (at most 63)",
                          field=field_name)
    return value


def _headers(value: object, source: str, field_name: str) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(source, "must be a table of header = \"value\"", field=field_name)
    headers = {}
    for name, text in value.items():
        if not _HEADER_RE.fullmatch(name):
            raise ConfigError(source, f"invalid header name {name!r}", field=f"{field_name}.{name}")
        if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
            # The value may be a secret: say what is wrong, not what it is.
            raise ConfigError(source, "invalid value: must be a string without line breaks",
                              field=f"{field_name}.{name}")
        headers[name] = text
    return MappingProxyType(headers)


def _ca_file(value: object, source: str, field_name: str) -> str:
    """A PEM file of CA certificates, loaded once now so a bad one stops the agent at start."""
    path = non_empty_path(value, source, field_name, "path to a PEM file of CA certificates")
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, f"cannot load CA certificates from {path!r}: {exc}", field=field_name) from None
    return path


def _attributes(value: object, source: str, field_name: str) -> Mapping[str, str]:
    """OpenTelemetry resource attributes: dotted names to non-empty strings."""
    if not isinstance(value, dict):
        raise ConfigError(source, 'must be a table of "attribute.name" = "value"', field=field_name)
    attributes = {}
    for name, text in value.items():
        if not _ATTRIBUTE_RE.fullmatch(name):
            raise ConfigError(source, f"invalid attribute name {name!r}: letters, digits, '.', '_', '-'",
                              field=f"{field_name}.{name}")
        if name in _OTLP_RESERVED_RESOURCE:
            raise ConfigError(source, f"attribute {name!r} is set by ksift (reserved: "
                                      f"{', '.join(_OTLP_RESERVED_RESOURCE)})", field=f"{field_name}.{name}")
        if not isinstance(text, str) or not text:
            raise ConfigError(source, f"invalid value {text!r}: must be a non-empty string",
                              field=f"{field_name}.{name}")
        attributes[name] = text
    return MappingProxyType(attributes)


def _labels(value: object, source: str, field_name: str) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(source, "must be a table of label = \"value\"", field=field_name)
    labels = {}
    for name, text in value.items():
        if not _LABEL_RE.fullmatch(name) or name.startswith("__"):
            raise ConfigError(source, f"invalid label name {name!r}: [a-zA-Z_][a-zA-Z0-9_]*, not starting with __",
                              field=f"{field_name}.{name}")
        if name in _RESERVED_LABELS:
            raise ConfigError(source, f"label {name!r} is set by ksift (reserved: {', '.join(_RESERVED_LABELS)})",
                              field=f"{field_name}.{name}")
        if not isinstance(text, str) or not text:
            raise ConfigError(source, f"invalid value {text!r}: must be a non-empty string",
                              field=f"{field_name}.{name}")
        labels[name] = text
    return MappingProxyType(labels)
