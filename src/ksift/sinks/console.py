"""Sink that prints alerts to a terminal or pipe, as text or JSON lines."""

from __future__ import annotations

import json
import logging
import shlex
from typing import Any, TextIO

logger = logging.getLogger(__name__)

MAX_CMDLINE_CHARS = 200
MAX_STACK_FRAMES = 16
MAX_STACKS = 2  # the hottest stacks of a cpu_hog alert shown in text (JSON carries them all)
MAX_DETAILS = 8
CONTAINER_ID_CHARS = 12  # the short form `docker ps` and `crictl ps` show


class ConsoleSink:
    """Writes alerts to `stream`: one compact JSON object per line, or text blocks."""

    name = "console"

    def __init__(self, stream: TextIO, json_lines: bool):
        self.stream = stream
        self.json_lines = json_lines
        self.delivered = 0
        self.failed = 0

    def emit(self, alert: dict[str, Any]) -> None:
        try:
            if self.json_lines:
                text = json.dumps(alert, separators=(",", ":"), ensure_ascii=False, default=str) + "\n"
            else:
                text = format_alert_text(alert)
            self.stream.write(text)
            # Flush per alert so `| jq` or `tail -f` see it now, not at exit.
            self.stream.flush()
        except Exception as exc:
            # Broken pipe, closed stream, unencodable text: count it, never raise.
            self.failed += 1
            # The stream usually stays broken, so warn once rather than per alert.
            log = logger.warning if self.failed == 1 else logger.debug
            log("console sink: cannot write alert: %s", exc)
        else:
            self.delivered += 1

    def close(self) -> None:
        # The stream belongs to the caller (often sys.stdout): flush, don't close.
        try:
            self.stream.flush()
        except Exception as exc:
            logger.debug("console sink: flush on close failed: %s", exc)


def format_alert_text(alert: dict[str, Any]) -> str:
    """Render an alert as a short multi-line block for a human.

    The first line says what happened; the indented lines below say who did it
    (process, parents, cgroup/container) and how bad it is. Lines whose fields
    are all missing are left out. Text from the traced process (comm, cmdline,
    paths) is escaped so it cannot forge extra lines in a log.
    """
    subject = _dict(alert.get("subject"))
    lines = [_headline(alert)]
    for label, value in (
        ("process", _process(subject)),
        ("parent", _parents(alert.get("ancestry"), subject.get("ppid"))),
        ("cgroup", _placement(subject)),
        ("incident", _incident(alert)),
        ("details", _details(alert.get("details"))),
        ("action", _remediation(alert.get("remediation"))),
    ):
        if value:
            lines.append(f"  {label + ':':<8} {value}")
    degraded = _dict(alert.get("degraded"))
    if degraded:
        reason = degraded.get("reason")
        lost = degraded.get("records_lost")
        lines.append(
            f"  DEGRADED: {_clean(lost if lost is not None else '?')} records lost"
            + (f" ({_clean(reason)})" if reason else "")
        )
    if alert.get("status") == "resolved":
        lines.append("  " + _resolution(alert))
    lines.extend(_stack(alert.get("stack")))
    return "\n".join(lines) + "\n"


def _remediation(remediation: Any) -> str:
    """Remediation's decision on the incident, in its own words (docs/safety.md)."""
    if not isinstance(remediation, dict):
        return ""
    text = remediation.get("summary") or remediation.get("status") or ""
    return _truncate(_clean(text), 300) if text else ""


def _details(details: Any) -> str:
    """The signal's own scalar figures (`key=value`); lists and tables stay in the JSON."""
    if not isinstance(details, dict):
        return ""
    shown = [f"{_clean(k)}={_truncate(_clean(v), 80)}" for k, v in details.items()
             if isinstance(v, (str, int, float)) and not isinstance(v, bool) and v != ""]
    more = len(shown) - MAX_DETAILS
    return " ".join(shown[:MAX_DETAILS]) + (f" (+{more} more)" if more > 0 else "")


def _headline(alert: dict[str, Any]) -> str:
    words = [
        _clean(alert.get("ts") or "-"),
        _clean(alert.get("severity") or "-").upper(),
        _clean(alert.get("rule") or "-"),
        _clean(alert.get("status") or "-").upper(),
    ]
    # Two spaces set the sentence apart from the fixed-width fields.
    return " ".join(words) + "  " + _clean(alert.get("summary") or "")


def _process(subject: dict[str, Any]) -> str:
    parts = []
    exe = subject.get("exe")
    if exe:
        parts.append(_clean(exe))
    cmdline = subject.get("cmdline")
    if isinstance(cmdline, (list, tuple)) and cmdline:
        # shlex quoting keeps argument boundaries visible and copy-pasteable; "..." marks a command line
        # the kernel captured cut short (cmdline_truncated), as it marks one cut here.
        text = _clean(shlex.join(str(arg) for arg in cmdline)) + ("..." if subject.get("cmdline_truncated") else "")
        parts.append(_truncate(text, MAX_CMDLINE_CHARS))
    elif isinstance(cmdline, str) and cmdline:
        parts.append(_truncate(_clean(cmdline), MAX_CMDLINE_CHARS))
    if not parts and subject.get("comm"):
        parts.append(_clean(subject["comm"]))
    if subject.get("uid") is not None:
        parts.append(f"(uid {_clean(subject['uid'])})")
    return " ".join(parts)


def _parents(ancestry: Any, ppid: Any) -> str:
    chain = []
    if isinstance(ancestry, list):
        for entry in ancestry:
            entry = _dict(entry)
            pid, comm = entry.get("pid"), entry.get("comm")
            if pid is None and not comm:
                continue
            text = _clean(pid if pid is not None else "?")
            chain.append(f"{text} ({_clean(comm)})" if comm else text)
    if not chain and ppid is not None:
        chain.append(_clean(ppid))
    return " <- ".join(chain)


def _placement(subject: dict[str, Any]) -> str:
    parts = []
    cgroup = subject.get("cgroup")
    if cgroup:
        parts.append(_clean(cgroup))
    elif subject.get("cgroup_id") is not None:
        parts.append(f"id {_clean(subject['cgroup_id'])}")
    unit = subject.get("systemd_unit")
    if unit and not (cgroup and str(unit) in str(cgroup)):
        parts.append(f"unit: {_clean(unit)}")
    container = subject.get("container_id")
    if container:
        text = f"container: {_clean(str(container)[:CONTAINER_ID_CHARS])}"
        runtime = subject.get("container_runtime")
        parts.append(f"{text} ({_clean(runtime)})" if runtime else text)
    if subject.get("pod_uid"):
        parts.append(f"pod: {_clean(subject['pod_uid'])}")
    return "  ".join(parts)


def _incident(alert: dict[str, Any]) -> str:
    parts = []
    if alert.get("incident_id"):
        parts.append(_clean(alert["incident_id"]))
    count, window, threshold = alert.get("count"), alert.get("window_s"), alert.get("threshold")
    if count is not None:
        text = f"count {_clean(count)}"
        duration, peak = alert.get("duration_s"), alert.get("peak_window_count")
        if isinstance(duration, (int, float)):
            # A resolved incident's count covers its whole life, not one window.
            text += f" over {_seconds(duration)}"
            if isinstance(peak, int) and isinstance(window, (int, float)):
                text += f", peak {peak} in {_seconds(window)}"
        elif isinstance(window, (int, float)):
            text += f" in {_seconds(window)}"
        if threshold is not None:
            text += f" (threshold {_clean(threshold)})"
        parts.append(text)
    suppressed = alert.get("suppressed")
    if isinstance(suppressed, int) and suppressed > 0:
        parts.append(f"suppressed {suppressed}")
    return "  ".join(parts)


def _resolution(alert: dict[str, Any]) -> str:
    duration = alert.get("duration_s")
    if isinstance(duration, (int, float)):
        return f"RESOLVED after {_seconds(duration)}"
    if alert.get("resolved_at"):
        return f"RESOLVED at {_clean(alert['resolved_at'])}"
    return "RESOLVED"


def _stack(stack: Any) -> list[str]:
    """A list of frames, or the hottest stacks ({samples, user, kernel}), innermost frame first."""
    if not isinstance(stack, list) or not stack:
        return []
    if not all(isinstance(entry, dict) for entry in stack):
        return ["  stack:", *_frames(stack, "    ")]
    lines = []
    for entry in stack[:MAX_STACKS]:
        lines.append(f"  stack ({_clean(entry.get('samples', '?'))} samples):")
        for side in ("user", "kernel"):
            frames = entry.get(side)
            if isinstance(frames, list) and frames:
                lines.append(f"    {side}:")
                lines.extend(_frames(frames, "      "))
    if len(stack) > MAX_STACKS:
        lines.append(f"  ... {len(stack) - MAX_STACKS} more stacks in the JSON")
    return lines


def _frames(frames: list, indent: str) -> list[str]:
    lines = [f"{indent}{_clean(frame)}" for frame in frames[:MAX_STACK_FRAMES]]
    if len(frames) > MAX_STACK_FRAMES:
        lines.append(f"{indent}... {len(frames) - MAX_STACK_FRAMES} more frames")
    return lines


def _seconds(value: float) -> str:
    """1.0 -> "1s", 3.25 -> "3.2s": enough precision for a human."""
    return f"{value:.1f}".rstrip("0").rstrip(".") + "s"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean(value: Any) -> str:
    """str(value) with control and other non-printable characters escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
