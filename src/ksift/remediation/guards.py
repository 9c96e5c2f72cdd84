"""The guards: what remediation refuses to do, checked when an action is proposed
and again at the moment of acting.

Each guard raises Refusal(guard, reason); the name says which guard refused and
ends up in the decision record. Guards:

    identity          the pid no longer belongs to the process that was judged (start time differs) or it is gone
    pid1              pid 1
    kernel_thread     a kernel thread
    self              ksift itself, one of its ancestors, or a cgroup holding ksift
    protected_exe     an executable on the protected list (exact path)
    protected_cgroup  a process in a protected cgroup, the root cgroup, or a cgroup containing a protected one
    other_user        a process of another user, unless allow_other_users
    blast_radius      more processes than the policy's max_processes (and the global ceiling)
    rate_limit        the per-rule or overall actions-per-minute budget is spent
    cooldown          the same subject was acted on (or has an action under way) too recently
    scope             a process outside the policy's only_cgroups
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ksift.enrich.procfs import PF_KTHREAD
from ksift.errors import AccessDenied, ProcessGone
from ksift.remediation.host import Host, ProcInfo
from ksift.remediation.settings import RemediationSettings

GUARDS = ("identity", "pid1", "kernel_thread", "self", "protected_exe", "protected_cgroup", "other_user",
          "blast_radius", "rate_limit", "cooldown", "scope")
KTHREADD_PID = 2


class Refusal(Exception):
    """A guard said no. `guard` is one of GUARDS; `reason` says why, with the numbers."""

    def __init__(self, guard: str, reason: str):
        self.guard = guard
        self.reason = reason
        super().__init__(f"{guard}: {reason}")


@dataclass
class Handle:
    """A judged process held through a pidfd: signals reach it or nobody."""

    pid: int
    start_ticks: int
    fd: int
    info: ProcInfo


def open_judged(host: Host, pid: int, want: int) -> Handle:
    """Open a pidfd for the process judged as (pid, start time in clock ticks) and prove
    it is that process.

    The start time is compared AFTER the pidfd is open: from then on the pidfd
    refers to one process, and if the pid had already been recycled the start
    time tells. A process that exits after the check makes later signals fail
    with ESRCH instead of reaching a stranger.
    """
    try:
        fd = host.pidfds.open(pid)
    except ProcessGone:
        raise Refusal("identity", f"pid {pid} is gone") from None
    except AccessDenied as exc:
        raise Refusal("identity", f"cannot open pid {pid}: {exc}") from None
    try:
        try:
            info = host.info(pid)
        except ProcessGone:
            raise Refusal("identity", f"pid {pid} is gone") from None
        except AccessDenied as exc:
            raise Refusal("identity", f"cannot read pid {pid}: {exc}") from None
        if info.start_ticks != want:
            raise Refusal("identity", f"pid {pid} now belongs to another process (started at tick "
                                      f"{info.start_ticks}, the judged one at tick {want})")
        if host.pidfds.exited(fd) or info.state in ("Z", "X"):
            raise Refusal("identity", f"pid {pid} has exited")
    except BaseException:
        host.pidfds.close(fd)
        raise
    return Handle(pid, want, fd, info)


class Protection:
    """The protected set: pid 1, kernel threads, ksift and its ancestors, protected
    executables and cgroups, other users' processes."""

    def __init__(self, settings: RemediationSettings, host: Host):
        self.settings = settings
        self.host = host

    def self_ancestors(self) -> set[int]:
        """ksift's own pid and every ancestor, read now (a re-parented ksift has new ones)."""
        return {self.host.self_pid, *self.host.ancestors(self.host.self_pid)}

    def check_process(self, info: ProcInfo, shielded: set[int] | None = None) -> None:
        """Refuse if the process must never be touched. `shielded` = self_ancestors(), passed in
        when checking many processes at once."""
        if shielded is None:
            shielded = self.self_ancestors()
        who = f"pid {info.pid} ({info.comm})"
        if info.pid == 1:
            raise Refusal("pid1", f"{who} is init")
        if info.flags & PF_KTHREAD or info.pid == KTHREADD_PID or info.ppid == KTHREADD_PID:
            raise Refusal("kernel_thread", f"{who} is a kernel thread")
        if info.pid == self.host.self_pid:
            raise Refusal("self", f"{who} is ksift itself")
        if info.pid in shielded:
            raise Refusal("self", f"{who} is an ancestor of ksift (pid {self.host.self_pid})")
        if "exe" in info.unreadable:
            raise Refusal("protected_exe", f"{who}: its executable cannot be read, so it cannot be shown "
                                           "to be unprotected")
        if info.exe is not None and info.exe in self.settings.protected_exe:
            raise Refusal("protected_exe", f"{who} runs {info.exe}, which is protected")
        if "cgroup" in info.unreadable:
            raise Refusal("protected_cgroup", f"{who}: its cgroups cannot be read, so it cannot be shown "
                                              "to be unprotected")
        for path in (info.cgroup, *info.cgroups_v1.values()):
            if path is not None and path in self.settings.protected_cgroups:
                raise Refusal("protected_cgroup", f"{who} is in cgroup {path}, which is protected")
        if not self.settings.allow_other_users:
            if "status" in info.unreadable:
                raise Refusal("other_user", f"{who}: its owner cannot be read")
            others = sorted({uid for uid in info.uids[:2] if uid != self.host.self_uid})
            if others:
                raise Refusal("other_user", f"{who} belongs to uid {others[0]}, not ksift's uid "
                                            f"{self.host.self_uid} (set allow_other_users to allow it)")

    def check_cgroup(self, path: str, self_paths: list[str]) -> None:
        """Refuse to act on a cgroup that holds the host, ksift, or a protected cgroup.

        self_paths: ksift's own cgroup paths (v2 and the controller's v1 path).
        """
        clean = path.rstrip("/") or "/"
        if clean == "/":
            raise Refusal("protected_cgroup", "the root cgroup holds the whole host")
        if clean in self.settings.protected_cgroups:
            raise Refusal("protected_cgroup", f"cgroup {clean} is protected")
        for own in self_paths:
            if own == clean or own.startswith(clean + "/"):
                raise Refusal("self", f"cgroup {clean} holds ksift itself ({own})")
        for protected in self.settings.protected_cgroups:
            if protected.startswith(clean + "/"):
                raise Refusal("protected_cgroup", f"cgroup {clean} contains protected cgroup {protected}")


def check_blast_radius(count: int, policy_limit: int, ceiling: int) -> None:
    limit = min(policy_limit, ceiling)
    if count > limit:
        raise Refusal("blast_radius", f"the action would touch {count} processes, more than the limit of {limit}")


class RateLimiter:
    """Actions per minute, overall and per rule (a sliding 60 s window)."""

    WINDOW_S = 60.0

    def __init__(self, overall_per_minute: int, clock: Callable[[], float]):
        self.overall = overall_per_minute
        self.clock = clock
        self._all: deque[float] = deque()
        self._by_rule: dict[str, deque[float]] = {}

    def _trim(self, stamps: deque[float], now: float) -> deque[float]:
        while stamps and now - stamps[0] >= self.WINDOW_S:
            stamps.popleft()
        return stamps

    def check(self, rule: str, rule_per_minute: int) -> None:
        now = self.clock()
        if len(self._trim(self._all, now)) >= self.overall:
            raise Refusal("rate_limit", f"{len(self._all)} actions in the last minute, the overall limit is "
                                        f"{self.overall}")
        mine = self._trim(self._by_rule.setdefault(rule, deque()), now)
        if len(mine) >= rule_per_minute:
            raise Refusal("rate_limit", f"rule {rule} acted {len(mine)} times in the last minute, its limit is "
                                        f"{rule_per_minute}")

    def record(self, rule: str) -> None:
        now = self.clock()
        self._all.append(now)
        self._by_rule.setdefault(rule, deque()).append(now)


class Cooldowns:
    """One subject (a process identity or a cgroup) is acted on at most once per cooldown,
    and never twice at the same time."""

    def __init__(self, clock: Callable[[], float], max_entries: int = 10_000):
        self.clock = clock
        self.max_entries = max_entries
        self._until: dict[Hashable, float] = {}
        self._busy: dict[Hashable, str] = {}  # subject -> decision id under way (pending or acting)

    def check(self, subject: Hashable, label: str, decision_id: str | None = None) -> None:
        owner = self._busy.get(subject)
        if owner is not None and owner != decision_id:
            raise Refusal("cooldown", f"{label} already has decision {owner} under way")
        until = self._until.get(subject)
        now = self.clock()
        if until is not None and now < until:
            raise Refusal("cooldown", f"{label} was acted on recently; its cooldown ends in {until - now:.1f}s")

    def hold(self, subject: Hashable, decision_id: str) -> None:
        self._busy[subject] = decision_id

    def release(self, subject: Hashable, decision_id: str) -> None:
        if self._busy.get(subject) == decision_id:
            del self._busy[subject]

    def start(self, subject: Hashable, seconds: float) -> None:
        now = self.clock()
        if len(self._until) >= self.max_entries:
            # Forget what has cooled down already; the map stays bounded on a busy host.
            self._until = {k: v for k, v in self._until.items() if v > now}
        self._until[subject] = now + seconds
