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

Errors name the field: sinks.alertmanager.url, sinks.webhook[1].timeout.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ksift.errors import ConfigError
from ksift.rules.model import SEVERITIES
from ksift.settings_fields import FROM_TO, choice, duration_between, integer_between, string
from ksift.units import format_duration, parse_duration

KINDS = ("alertmanager", "webhook", "slack")
_COMMON = ("url", "name", "min_severity", "queue_size", "timeout", "max_retries", "backoff", "max_backoff",
           "drain_timeout", "headers")
_ALERTMANAGER_ONLY = ("instance", "labels", "generator_url", "resend_interval")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Labels the sink sets itself; a static label may not replace them.
_RESERVED_LABELS = ("alertname", "severity", "instance", "pid", "comm", "container", "namespace", "pod")
_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


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
    # Alertmanager only
    instance: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    generator_url: str | None = None
    resend_interval_s: float = 60.0


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
    return SinksSettings(tuple(settings for _, settings in parsed))


def _parse_one(kind: str, entry: dict, source: str, where: str, default_name: str) -> SinkSettings:
    allowed = _COMMON + (_ALERTMANAGER_ONLY if kind == "alertmanager" else ())
    for name in entry:
        if name not in allowed:
            raise ConfigError(source, f"unknown field (allowed: {', '.join(allowed)})", field=f"{where}.{name}")
    if "url" not in entry:
        raise ConfigError(source, "missing: the receiver's http:// or https:// URL", field=f"{where}.url")
    values: dict[str, Any] = {"kind": kind, "url": _url(entry["url"], source, f"{where}.url")}
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
                hostname: Callable[[], str] = socket.gethostname) -> list:
    """The configured network sinks, not started yet (the agent awaits their start())."""
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
        url = alerts_url(s.url) if s.kind == "alertmanager" else s.url
        delivery = DeliverySettings(url=url, name=s.name, min_severity=s.min_severity, queue_size=s.queue_size,
                                    timeout_s=s.timeout_s, max_retries=s.max_retries, backoff_s=s.backoff_s,
                                    max_backoff_s=s.max_backoff_s, drain_timeout_s=s.drain_timeout_s,
                                    headers=s.headers)
        if s.kind == "alertmanager":
            sinks.append(AlertmanagerSink(delivery, instance=s.instance or host, static_labels=s.labels,
                                          generator_url=s.generator_url, resend_interval_s=s.resend_interval_s))
        elif s.kind == "slack":
            sinks.append(SlackSink(delivery, host=host))
        else:
            sinks.append(WebhookSink(delivery))
    return sinks


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
