"""One alert per incident.

An incident opens on the first crossing of a (rule, key) (after `sustain`, when
the rule asks for one), folds every later crossing into `count`/`suppressed`,
and resolves once the key stayed under the threshold for a whole window. After
a resolution the key is in cooldown: crossings then are counted, not alerted,
and reported as `suppressed` by the next incident of that key.

Everything here runs on kernel timestamps (CLOCK_MONOTONIC ns) passed in by the
caller, so it is pure and testable without a kernel.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ksift.events import TaskContext
from ksift.rules.model import Rule, severity_rank
from ksift.rules.windows import KeyedWindows

NS = 1_000_000_000


@dataclass(frozen=True)
class Crossing:
    """The kernel's report that a key went over a rule's threshold in a window."""

    rule: str
    key: Hashable  # what the rule groups by: a tgid, or a tuple such as (tgid, address, port)
    ktime_ns: int
    window_start_ns: int
    window_count: int  # events in that window when it crossed
    total: int  # the key's running event total (monotonic) at the crossing
    task: TaskContext
    details: Mapping[str, Any] = field(default_factory=dict)  # what this signal adds (path, latency, address...)
    stack: Any = None  # symbolized stack(s) when the signal captures them
    severity: str | None = None  # louder than the rule's, when the signal says so (a pressure rule's critical level)


@dataclass(frozen=True)
class KeyExit:
    """A key's process is gone; the kernel shipped its final totals."""

    rule: str
    key: Hashable
    total: int
    exit_code: int | None = None
    window_start_ns: int = 0  # the key's last window, and its count then
    window_count: int = 0


@dataclass(frozen=True)
class KeyState:
    """A key's live counters, read from the kernel's aggregate map."""

    total: int
    window_start_ns: int
    window_count: int


@dataclass
class Incident:
    id: str
    rule: Rule
    key: Hashable
    task: TaskContext
    opened_ns: int  # kernel time the incident opened (alert time)
    first_window_ns: int  # start of the first hot window
    base_total: int  # the key's total just before the first hot window
    latest_total: int
    peak_window_count: int
    last_window_ns: int
    crossings: int = 1
    suppressed: int = 0  # repeats folded into this incident (plus cooldown crossings before it)
    status: str = "open"
    resolved_ns: int | None = None
    key_exited: bool = False
    exit_code: int | None = None
    records_lost: int = 0
    held_until_ns: int = 0  # its sensor said the cause is still there: not judged again before this
    severity: str | None = None  # set when a crossing asked for more than the rule's severity
    context: dict = field(default_factory=dict)  # enrichment captured at its first crossing
    details: dict = field(default_factory=dict)  # the signal's own figures, first crossing then updates
    stack: Any = None

    @property
    def count(self) -> int:
        """Events by the key since the incident's first hot window began."""
        return max(self.latest_total - self.base_total, self.peak_window_count)


@dataclass(frozen=True)
class Transition:
    kind: str  # "open" | "resolved"
    incident: Incident


class IncidentEngine:
    """Tracks open incidents for every enabled rule."""

    def __init__(self, rules: list[Rule] | tuple[Rule, ...], grace_ns: int = 0,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex, max_open: int = 10_000,
                 loss_memory: int = 1024, capture: Callable[[TaskContext], dict] | None = None):
        self.rules = {r.name: r for r in rules}
        self.grace_ns = grace_ns  # transit slack: a record may reach us one tick late
        self.new_id = new_id
        self.max_open = max_open
        self.open: dict[tuple[str, Hashable], Incident] = {}
        self.windows = {r.name: KeyedWindows(max(int(r.window_s * NS), 1)) for r in rules}
        self._cooldown_until: dict[tuple[str, Hashable], int] = {}
        self._cooldown_folded: dict[tuple[str, Hashable], int] = {}
        self._run_base: dict[tuple[str, Hashable], int] = {}  # key's total before its current hot run (sustain)
        # capture(task): the context an incident keeps (the enricher's subject and ancestry), taken at
        # the first crossing of a hot run, when the process first looked interesting: with `sustain`
        # it may be gone by the time the incident opens. Without it the alert builds it at opening.
        self._capture = capture
        self._run_context: dict[tuple[str, Hashable], tuple[int, dict]] = {}  # (run start, context)
        self._losses: deque[tuple[int, int]] = deque(maxlen=loss_memory)
        self.stats = {"crossings": 0, "opened": 0, "resolved": 0, "folded": 0, "cooldown_suppressed": 0,
                      "pending": 0, "refused_full": 0, "unknown_rule": 0}

    # -- inputs --------------------------------------------------------------

    def observe(self, c: Crossing) -> list[Transition]:
        rule = self.rules.get(c.rule)
        if rule is None:
            self.stats["unknown_rule"] += 1
            return []
        self.stats["crossings"] += 1
        ident = (c.rule, c.key)
        windows = self.windows[c.rule]
        windows.add(c.key, c.window_start_ns, c.ktime_ns, c.window_count)

        inc = self.open.get(ident)
        if inc is not None:
            if c.window_start_ns != inc.last_window_ns:
                inc.suppressed += 1  # a repeat in a later window: fold it
                self.stats["folded"] += 1
            inc.crossings += 1
            inc.last_window_ns = max(inc.last_window_ns, c.window_start_ns)
            inc.latest_total = max(inc.latest_total, c.total)
            inc.peak_window_count = max(inc.peak_window_count, c.window_count)
            inc.details.update(c.details)
            if inc.stack is None:
                inc.stack = c.stack
            if c.severity is not None and severity_rank(c.severity) > severity_rank(inc.severity or rule.severity):
                inc.severity = c.severity  # escalated: its resolution says how loud it got
            return []

        until = self._cooldown_until.get(ident)
        if until is not None:
            if c.ktime_ns < until:
                self._cooldown_folded[ident] = self._cooldown_folded.get(ident, 0) + 1
                self.stats["cooldown_suppressed"] += 1
                return []
            del self._cooldown_until[ident]

        run_start = windows.run_start_ns(c.key)
        if run_start is None:
            run_start = c.window_start_ns
        if run_start == c.window_start_ns:
            # A new run of hot windows: its count starts from this window's first event.
            self._run_base[ident] = c.total - c.window_count
        context = self._first_context(ident, run_start, c.task)
        if windows.sustained_ns(c.key) < int(rule.sustain_s * NS):
            self.stats["pending"] += 1
            return []
        if len(self.open) >= self.max_open:
            self.stats["refused_full"] += 1
            return []

        last = windows.last(c.key)
        inc = Incident(
            id=self.new_id(), rule=rule, key=c.key, task=c.task, opened_ns=c.ktime_ns,
            first_window_ns=run_start, base_total=self._run_base.pop(ident, c.total - c.window_count),
            latest_total=c.total, peak_window_count=max(c.window_count, last.count if last else 0),
            last_window_ns=c.window_start_ns,
            suppressed=self._cooldown_folded.pop(ident, 0),
            records_lost=self.losses_between(c.window_start_ns - int(rule.window_s * NS), c.ktime_ns),
            details=dict(c.details), stack=c.stack, context=context,
            severity=c.severity if c.severity is not None and
            severity_rank(c.severity) > severity_rank(rule.severity) else None,
        )
        self._run_context.pop(ident, None)
        self.open[ident] = inc
        self.stats["opened"] += 1
        return [Transition("open", inc)]

    def _first_context(self, ident: tuple[str, Hashable], run_start: int, task: TaskContext) -> dict:
        """The context of the run's first crossing: captured now if this crossing is it."""
        if self._capture is None:
            return {}
        kept = self._run_context.get(ident)
        if kept is None or kept[0] != run_start:
            kept = (run_start, self._capture(task))
            self._run_context[ident] = kept
        return kept[1]

    def refresh(self, rule: str, key: Hashable, total: int, window_start_ns: int, window_count: int) -> None:
        """Fresh totals of an open incident's key, read from the kernel's map."""
        inc = self.open.get((rule, key))
        if inc is None:
            return
        inc.latest_total = max(inc.latest_total, total)
        if window_start_ns == inc.last_window_ns:
            inc.peak_window_count = max(inc.peak_window_count, window_count)

    def key_exited(self, rule: str, key: Hashable, total: int, exit_code: int | None = None,
                   window_start_ns: int = 0, window_count: int = 0) -> None:
        """The key's process is gone; its last totals came with the exit record."""
        inc = self.open.get((rule, key))
        if inc is None:
            return
        inc.latest_total = max(inc.latest_total, total)
        if window_start_ns == inc.last_window_ns:  # its hot window went on after the last crossing
            inc.peak_window_count = max(inc.peak_window_count, window_count)
        inc.key_exited = True
        inc.exit_code = exit_code

    def note_loss(self, ktime_ns: int, lost: int) -> None:
        """Records lost (ring buffer full, malformed) at about ktime_ns."""
        if lost <= 0:
            return
        self._losses.append((ktime_ns, lost))
        for inc in self.open.values():
            inc.records_lost += lost

    def losses_between(self, start_ns: int, end_ns: int) -> int:
        return sum(n for t, n in self._losses if start_ns <= t <= end_ns)

    # -- time ----------------------------------------------------------------

    def tick(self, now_ns: int, holds: Callable[[str, Hashable], bool] | None = None) -> list[Transition]:
        """Resolve incidents whose key stayed under the threshold for a whole window.

        holds(rule, key), when given, may keep a quiet incident open: its cause is
        still there though its events stopped (a fork bomb pinned at its pids
        limit forks little, but all its members live). It is asked again one window later.
        """
        out = []
        for ident, inc in list(self.open.items()):
            if now_ns < inc.held_until_ns:
                continue
            if not self.windows[inc.rule.name].quiet_since(inc.key, now_ns - self.grace_ns):
                continue
            if holds is not None and holds(inc.rule.name, inc.key):
                inc.held_until_ns = now_ns + self.windows[inc.rule.name].window_ns
                continue
            inc.status = "resolved"
            inc.resolved_ns = now_ns
            del self.open[ident]
            self.windows[inc.rule.name].forget(inc.key)
            if inc.rule.cooldown_s > 0:
                self._cooldown_until[ident] = now_ns + int(inc.rule.cooldown_s * NS)
            self.stats["resolved"] += 1
            out.append(Transition("resolved", inc))
        self._cooldown_until = {k: t for k, t in self._cooldown_until.items() if t > now_ns}
        # Cooldown crossings wait for the key's next incident; bound how many keys we remember.
        while len(self._cooldown_folded) > self.max_open:
            self._cooldown_folded.pop(next(iter(self._cooldown_folded)))
        while len(self._run_base) > self.max_open:
            self._run_base.pop(next(iter(self._run_base)))
        for windows in self.windows.values():
            windows.evict_idle(now_ns)
        # A pending run's context lives as long as its run: gone once its key went idle or ran anew.
        self._run_context = {ident: kept for ident, kept in self._run_context.items()
                             if self.windows[ident[0]].run_start_ns(ident[1]) == kept[0]}
        return out

    def next_deadline_ns(self) -> int | None:
        """Kernel time at which the earliest open incident may resolve (its key quiet for a
        whole window after its last hot one, plus the grace), or None when none is open:
        the agent sleeps until then instead of checking on a fixed tick."""
        due = None
        for inc in self.open.values():
            window_ns = self.windows[inc.rule.name].window_ns
            last = self.windows[inc.rule.name].last(inc.key)
            start = last.start_ns if last is not None else inc.last_window_ns
            when = max(start + 2 * window_ns + self.grace_ns, inc.held_until_ns)
            due = when if due is None else min(due, when)
        return due

    def open_keys(self) -> list[tuple[str, Hashable]]:
        return list(self.open)
