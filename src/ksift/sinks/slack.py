"""Slack sink: alerts as Slack incoming-webhook messages (`text` plus Block Kit `blocks`).

`text` is the plain fallback Slack shows in notifications; `blocks` lay out a
header (severity, rule, state), the alert sentence, the who/where fields and a
context line with the incident id. Everything from the traced process (comm,
cmdline, paths) is escaped for Slack's mrkdwn (&, <, >) so it cannot forge a
link or a mention, and every text is cut to Slack's documented block limits.
"""

from __future__ import annotations

import shlex
from typing import Any

from ksift.sinks.console import CONTAINER_ID_CHARS
from ksift.sinks.delivery import DeliverySettings, DeliverySink

HEADER_LIMIT = 150  # plain_text in a header block
SECTION_LIMIT = 3000  # text of a section block
FIELD_LIMIT = 2000  # each field of a section block
MAX_FIELDS = 10
TEXT_LIMIT = 4000  # the fallback text


class SlackSink(DeliverySink):
    kind = "slack"

    def __init__(self, settings: DeliverySettings, host: str = "", **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.host = host

    def render(self, alert: dict[str, Any]) -> dict[str, Any]:
        return slack_message(alert, self.host)


def slack_message(alert: dict[str, Any], host: str = "") -> dict[str, Any]:
    """The incoming-webhook payload for one alert."""
    subject = alert.get("subject") if isinstance(alert.get("subject"), dict) else {}
    resolved = alert.get("status") == "resolved"
    severity = str(alert.get("severity") or "info").upper()
    rule = str(alert.get("rule") or "alert")
    state = "resolved" if resolved else "firing"
    summary = str(alert.get("summary") or "")
    where = f" on {host}" if host else ""

    fields = [
        ("Process", _process(subject)),
        ("Command", _command(subject)),
        ("Host", host),
        ("Container", _container(subject)),
        ("Pod", _pod(subject)),
        ("Unit", subject.get("systemd_unit")),
        ("Count", _count(alert)),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(f"{severity}: {rule} {state}{where}",
                                                                        HEADER_LIMIT)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _cut(_escape(summary) or " ", SECTION_LIMIT)}},
    ]
    shown = [
        {"type": "mrkdwn", "text": _cut(f"*{label}*\n{_escape(value)}", FIELD_LIMIT)}
        for label, value in fields if value not in (None, "")
    ][:MAX_FIELDS]
    if shown:
        blocks.append({"type": "section", "fields": shown})
    remediation = alert.get("remediation") if isinstance(alert.get("remediation"), dict) else {}
    if remediation.get("summary"):
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(
            f"*Remediation*\n{_escape(remediation['summary'])}", SECTION_LIMIT)}})
    context = [f"incident {alert.get('incident_id') or '-'}", str(alert.get("ts") or "")]
    if resolved and isinstance(alert.get("duration_s"), (int, float)):
        context.append(f"lasted {alert['duration_s']:g}s")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(" · ".join(
        part for part in context if part))}]})
    return {
        "text": _cut(_escape(f"[{severity}] {rule} {state}{where}: {summary}"), TEXT_LIMIT),
        "blocks": blocks,
    }


def _process(subject: dict[str, Any]) -> str:
    comm, pid = subject.get("comm"), subject.get("pid")
    text = f"{comm} (pid {pid})" if comm else (f"pid {pid}" if pid is not None else "")
    if subject.get("exe"):
        text += f" {subject['exe']}"
    if subject.get("uid") is not None:
        text += f", uid {subject['uid']}"
    return text


def _command(subject: dict[str, Any]) -> str | None:
    cmdline = subject.get("cmdline")
    if isinstance(cmdline, list) and cmdline:
        return shlex.join(str(arg) for arg in cmdline)
    return None


def _container(subject: dict[str, Any]) -> str | None:
    name, cid = subject.get("container_name"), subject.get("container_id")
    if not (name or cid):
        return None
    parts = [str(name)] if name else []
    if cid:
        parts.append(str(cid)[:CONTAINER_ID_CHARS])
    if subject.get("container_runtime"):
        parts.append(f"({subject['container_runtime']})")
    return " ".join(parts)


def _pod(subject: dict[str, Any]) -> str | None:
    name, namespace = subject.get("pod_name"), subject.get("pod_namespace")
    if name:
        return f"{namespace}/{name}" if namespace else str(name)
    return f"uid {subject['pod_uid']}" if subject.get("pod_uid") else None


def _count(alert: dict[str, Any]) -> str | None:
    count = alert.get("count")
    if count is None:
        return None
    text = f"{count}"
    window = alert.get("window_s")
    if alert.get("threshold") is not None and isinstance(window, (int, float)):
        text += f" (threshold {alert['threshold']} in {window:g}s)"
    return text


def _escape(value: Any) -> str:
    # Slack's mrkdwn: these three are the only characters that must be escaped.
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
