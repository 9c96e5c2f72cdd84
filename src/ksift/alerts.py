"""Turn incident transitions into alerts (ksift.alert_model), handed to sinks as their JSON dict."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable

from ksift.alert_model import Alert, Ancestor, Degraded, Subject
from ksift.enrich.context import Enricher
from ksift.rules.incidents import NS, Incident, Transition
from ksift.timeparse import rfc3339
from ksift.units import format_duration


@dataclass(frozen=True)
class Clocks:
    """Wall and kernel (CLOCK_MONOTONIC) clocks, injectable for tests."""

    wall: Callable[[], float]
    mono_ns: Callable[[], int]

    def wall_of(self, ktime_ns: int) -> float:
        """Wall time of a kernel timestamp taken with bpf_ktime_get_ns()."""
        return self.wall() - (self.mono_ns() - ktime_ns) / NS


def generic_summary(inc: Incident, status: str) -> str:
    who = f"PID {inc.task.tgid} ({inc.task.comm})"
    window = format_duration(inc.rule.window_s)
    if status == "open":
        return (f"{who} went over {inc.rule.name}: {inc.peak_window_count:,} in {window} "
                f"(threshold {inc.rule.threshold})")
    return f"{who} is back under {inc.rule.name} ({inc.count:,} in all)"


def build_alert(tr: Transition, enricher: Enricher, clocks: Clocks,
                summarize: Callable[[Incident, str], str | None] | None = None,
                details: Callable[[Incident, str], dict | None] | None = None) -> dict:
    """The alert for one transition, as the dict every sink receives (Alert.to_dict()).
    Context is captured once: at the incident's first crossing (IncidentEngine's capture),
    else here when it opens.

    summarize and details come from the sensor that owns the rule: its sentence
    and its signal's own figures (request path, exit status, address...).
    """
    inc = tr.incident
    if not inc.context:
        inc.context = enricher.context(inc.task)
    started = clocks.wall_of(inc.first_window_ns)
    resolved = clocks.wall_of(inc.resolved_ns) if inc.resolved_ns is not None else None
    now = clocks.wall_of(inc.opened_ns) if tr.kind == "open" else (resolved or clocks.wall())
    return Alert(
        id=uuid.uuid4().hex,
        incident_id=inc.id,
        status=tr.kind,
        ts=rfc3339(now),
        rule=inc.rule.name,
        severity=inc.severity or inc.rule.severity,
        summary=(summarize(inc, tr.kind) if summarize else None) or generic_summary(inc, tr.kind),
        count=inc.count,
        peak_window_count=inc.peak_window_count,
        window_s=inc.rule.window_s,
        threshold=inc.rule.threshold,
        subject=Subject.from_dict(inc.context["subject"]),
        ancestry=[Ancestor(**entry) for entry in inc.context["ancestry"]],
        details=(details(inc, tr.kind) if details else None) or inc.details or None,
        stack=inc.stack,
        suppressed=inc.suppressed,
        degraded=(Degraded(records_lost=inc.records_lost,
                           reason="the kernel could not hand over every record while this incident was open")
                  if inc.records_lost else None),
        started_at=rfc3339(started),
        resolved_at=rfc3339(resolved) if resolved is not None else None,
        duration_s=round(resolved - started, 3) if resolved is not None else None,
        subject_exited=inc.key_exited,
    ).to_dict()
