"""Planning and performing remediation actions on one judged subject.

`Actuator.plan()` runs every guard and says exactly what would be done (the
dry-run record and the preview an approver sees). `Actuator.perform()` runs
the guards again at the moment of acting, then acts: signals go through a
pidfd of a process whose start time was checked after the pidfd was opened,
cgroup files are written only for the cgroup the process is in now and was
judged in. Everything here blocks (it reads /proc), so the engine calls it
from a worker thread, never from the agent's loop.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ksift.enrich.procfs import ProcStat
from ksift.errors import AccessDenied, ProcessGone
from ksift.remediation.guards import Handle, Protection, Refusal, check_blast_radius, open_judged
from ksift.remediation.host import Host, ProcInfo
from ksift.remediation.policy import Policy
from ksift.remediation.settings import RemediationSettings
from ksift.timeparse import parse_timestamp

# A kill_tree sweep stops new members round after round; a tree still growing
# after this many rounds is out of hand for user space (the fast path is not).
MAX_SWEEP_ROUNDS = 64
# A fork bomb is stopped, killed, and looked at again until no member is left:
# at most this many times (each pass stops every member it finds, then kills them).
MAX_KILL_PASSES = 8
GONE_TIMEOUT_S = 5.0  # how long killed members (or a killed cgroup) may take to be gone
GONE_POLL_S = 0.005
CPU_PERIOD_US = 100_000
SHOWN_TARGETS = 20  # processes named in a step's text; the plan lists them all
SAMPLE_PIDS = 20  # pids of killed processes a decision records (it counts them all)
BOMB_SIGNAL = "process.bomb"  # fork_bomb's signal: its alerts judge a tree by session and cgroup
# The session's leader (a login shell, the shell a bomb was typed into) is not a member of a bomb
# that began after it: it started more than this many windows before the bomb's first hot window.
LEADER_MARGIN_WINDOWS = 2


class TreeFlagger(Protocol):
    """The in-kernel fast path (remediation's fork-bomb guard, remediation/guard.py)."""

    kills_children: bool  # the kernel kills the new child itself (else it kills the forking parent)

    def flag(self, root: int, members: list[tuple[int, int]], whole_tree: bool, budget: int) -> int:
        """Flag (pid, start ticks) pairs; the kernel kills new children of them (whole_tree: and
        of their descendants), at most `budget` in all. Returns how many were flagged."""
        ...

    def flag_bomb(self, cgroup_id: int, session: int, budget: int, spare_tgid: int) -> bool:
        """Flag a judged fork bomb (the processes of `session` in the cgroup; session 0: the whole
        cgroup); the kernel kills its new processes at fork, at most `budget`, never those forked
        by `spare_tgid`. Returns whether it is flagged."""
        ...

    def unflag_bomb(self, cgroup_id: int, session: int) -> None:
        """Forget a flagged bomb: it is stopped, or the action ended without stopping it."""
        ...


class ActionFailed(Exception):
    """The guards passed but the action could not be carried out (the reason says why)."""


@dataclass(frozen=True)
class Subject:
    """The process an alert is about, as the kernel captured it."""

    pid: int
    start_boottime_ns: int
    comm: str = ""
    exe: str | None = None
    uid: int | None = None
    cgroup: str | None = None
    cgroup_id: int | None = None
    # A fork bomb's alert judges a tree, not the process that forked at the crossing (one member
    # of hundreds, likely gone): its session (the alert's key), and when the incident began.
    tree: int | None = None
    started_unix: float | None = None
    window_s: float = 1.0

    @classmethod
    def from_alert(cls, alert: dict[str, Any], bomb: bool = False) -> Subject:
        """The subject of an alert; bomb: of a fork bomb's alert (process.bomb), whose tree is its
        session (details.tree) inside the subject's cgroup."""
        subject = alert.get("subject") or {}
        pid, start = subject.get("pid"), subject.get("start_boottime_ns")
        if not isinstance(pid, int) or not isinstance(start, int) or pid <= 0:
            raise ValueError("the alert's subject has no pid and start time: nothing to act on")
        tree = started = None
        if bomb:
            tree = (alert.get("details") or {}).get("tree")
            if not isinstance(tree, int) or isinstance(tree, bool) or tree <= 0:
                raise ValueError("the fork bomb's alert names no tree (details.tree): nothing to act on")
            if not subject.get("cgroup"):
                raise ValueError("the fork bomb's alert names no cgroup: its members cannot be told apart from "
                                 "the rest of the session")
            started = _unix_of(alert.get("started_at"))
        return cls(pid=pid, start_boottime_ns=start, comm=str(subject.get("comm") or ""), exe=subject.get("exe"),
                   uid=subject.get("uid"), cgroup=subject.get("cgroup"), cgroup_id=subject.get("cgroup_id"),
                   tree=tree, started_unix=started, window_s=float(alert.get("window_s") or 1.0))

    @property
    def label(self) -> str:
        if self.tree is not None:
            return f"the fork bomb of session {self.tree} in {self.cgroup}"
        return f"pid {self.pid} ({self.comm})" if self.comm else f"pid {self.pid}"

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_boottime_ns": self.start_boottime_ns, "comm": self.comm, "exe": self.exe,
                "uid": self.uid, "cgroup": self.cgroup}


def _unix_of(ts: object) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return parse_timestamp(ts).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Whole:
    """What a fork bomb's kill_tree (or a cgroup-scoped one) judges and stops: the processes of one
    session inside one cgroup and below it (session 0: every process of the cgroup)."""

    cgroup: str          # cgroup v2 path
    directory: str       # its directory
    cgroup_id: int       # the directory's inode (the kernel's cgroup id)
    session: int = 0     # 0: the whole cgroup
    spare: int = 0       # the session's leader when it predates the bomb: not a member (0: none)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cgroup": self.cgroup, "cgroup_id": self.cgroup_id}
        if self.session:
            out["session"] = self.session
        if self.spare:
            out["spared_leader"] = self.spare
        return out


@dataclass(frozen=True)
class Target:
    """One process an action touches, with the start time that identifies it."""

    pid: int
    start_ticks: int
    comm: str
    exe: str | None


@dataclass(frozen=True)
class CgroupTarget:
    path: str               # as the hierarchy names it ("/x/y")
    hierarchy: str          # "v2" or the v1 controller ("freezer", "cpu", "pids")
    directory: str          # where its files are
    file: str               # the interface file the action writes
    value: str              # what it writes
    previous: str | None = None  # what the file held (to undo by hand)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "hierarchy": self.hierarchy, "file": f"{self.directory.rstrip('/')}/{self.file}",
                "value": self.value, "previous": self.previous}


@dataclass
class Plan:
    """Exactly what an action would do, after every guard passed."""

    action: str
    scope: str
    targets: list[Target]
    cgroup: CgroupTarget | None = None
    steps: list[str] = field(default_factory=list)
    whole: Whole | None = None  # a fork bomb's tree, or a cgroup-scoped kill_tree's cgroup

    def as_dict(self) -> dict[str, Any]:
        out = {"action": self.action, "scope": self.scope, "processes": len(self.targets),
               "targets": [{"pid": t.pid, "comm": t.comm, "exe": t.exe} for t in self.targets],
               "cgroup": self.cgroup.as_dict() if self.cgroup else None, "steps": list(self.steps)}
        if self.whole is not None and self.whole.session:
            out["tree"] = self.whole.as_dict()
        return out


@dataclass
class Outcome:
    """What perform() did. For terminate, `pending_kill` holds the pidfd until the grace ends."""

    detail: dict[str, Any]
    pending_kill: Handle | None = None


def processes(n: int) -> str:
    """"1 process", "2 processes"."""
    return f"{n:,} process" + ("" if n == 1 else "es")


def _names(targets: list[Target]) -> str:
    shown = ", ".join(f"{t.pid} ({t.comm})" for t in targets[:SHOWN_TARGETS])
    more = len(targets) - SHOWN_TARGETS
    return shown + (f" and {more} more" if more > 0 else "")


class Actuator:
    """Plans and performs actions on a Host, behind the guards."""

    def __init__(self, host: Host, settings: RemediationSettings):
        self.host = host
        self.settings = settings
        self.protection = Protection(settings, host)

    # -- planning (every guard, no side effect) ------------------------------

    def plan(self, policy: Policy, subject: Subject) -> Plan:
        """Run every process guard and return what the action would do; Refusal if any says no."""
        if self._judges_a_whole(policy, subject):
            return self._plan_whole(policy, subject, self._whole(policy, subject), self.protection.self_ancestors())
        handle = open_judged(self.host, subject.pid, self.host.ticks(subject.start_boottime_ns))
        try:
            return self._plan(policy, subject, handle, self.protection.self_ancestors())
        finally:
            self.host.pidfds.close(handle.fd)

    def check(self, policy: Policy, info: ProcInfo, shielded: set[int]) -> None:
        """The protected set, and the policy's scope (only_cgroups), for one process."""
        self.protection.check_process(info, shielded)
        if not policy.covers(info.cgroup):
            raise Refusal("scope", f"pid {info.pid} ({info.comm}) is in cgroup {info.cgroup}, outside the "
                                   f"policy's only_cgroups ({', '.join(policy.only_cgroups)})")

    def _plan(self, policy: Policy, subject: Subject, handle: Handle, shielded: set[int]) -> Plan:
        info = handle.info
        self.check(policy, info, shielded)
        root = Target(info.pid, info.start_ticks, info.comm, info.exe)
        if policy.scope == "process":
            check_blast_radius(1, policy.max_processes, self.settings.max_processes)
            return Plan(policy.action, "process", [root], steps=[self._process_step(policy, root)])
        if policy.scope == "tree":
            members = self._judge_members(policy, self.descendants(root.pid, root.start_ticks), shielded)
            targets = [root, *members]
            check_blast_radius(len(targets), policy.max_processes, self.settings.max_processes)
            return Plan(policy.action, "tree", targets, steps=[
                f"SIGSTOP {len(targets)} process(es) of the tree of {root.pid}: {_names(targets)}, "
                "and any child they start meanwhile",
                f"SIGKILL the same {len(targets)} process(es)"])
        cgroup = self._cgroup_target(policy, subject, info)
        pids = self.host.cgroup_pids(cgroup.directory)
        check_blast_radius(len(pids), policy.max_processes, self.settings.max_processes)
        targets = self._judge_members(policy, [self._stat_or_none(pid) for pid in pids], shielded)
        return Plan(policy.action, "cgroup", targets, cgroup=cgroup, steps=[
            f"write {cgroup.value!r} to {cgroup.directory.rstrip('/')}/{cgroup.file} (was {cgroup.previous!r}); "
            f"{len(targets)} process(es) in it: {_names(targets)}"])

    def _process_step(self, policy: Policy, t: Target) -> str:
        who = f"{t.pid} ({t.comm})"
        if policy.action == "terminate":
            return f"SIGTERM {who}, then SIGKILL after {policy.grace_s:g}s if it is still running"
        if policy.action == "renice":
            return f"set the nice value of every thread of {who} to {policy.nice}"
        return f"{'SIGSTOP' if policy.action == 'stop' else 'SIGCONT'} {who}"

    def _stat_or_none(self, pid: int) -> ProcStat | None:
        try:
            return self.host.stat(pid)
        except (ProcessGone, AccessDenied):
            return None

    def _judge_members(self, policy: Policy, stats: list[ProcStat | None], shielded: set[int]) -> list[Target]:
        """Check every member against the protected set; members that vanished are skipped."""
        out = []
        for st in stats:
            if st is None or st.state in ("Z", "X"):
                continue
            try:
                info = self.host.info(st.pid)
            except ProcessGone:
                continue
            except AccessDenied as exc:
                raise Refusal("identity", f"cannot read pid {st.pid} of the target: {exc}") from None
            if info.start_ticks != st.start_ticks:
                continue  # gone and recycled between the two reads: not a member
            self.check(policy, info, shielded)
            out.append(Target(info.pid, info.start_ticks, info.comm, info.exe))
        return out

    def descendants(self, root_pid: int, root_start_ticks: int) -> list[ProcStat]:
        """Every live descendant of the root, parents before children.

        A child always starts after its parent, so a process whose ppid matches
        but started earlier is not in the tree (its parent was another process).
        """
        children: dict[int, list[ProcStat]] = {}
        for st in self.host.scan():
            children.setdefault(st.ppid, []).append(st)
        out: list[ProcStat] = []
        queue = [(root_pid, root_start_ticks)]
        seen = {root_pid}
        while queue:
            pid, start = queue.pop(0)
            for child in children.get(pid, ()):
                if child.pid in seen or child.start_ticks < start:
                    continue
                seen.add(child.pid)
                queue.append((child.pid, child.start_ticks))
                if child.state not in ("Z", "X"):
                    out.append(child)
        return out

    def _cgroup_target(self, policy: Policy, subject: Subject, info: ProcInfo) -> CgroupTarget:
        if info.cgroup is not None and subject.cgroup is not None and info.cgroup != subject.cgroup:
            raise Refusal("identity", f"pid {info.pid} moved from cgroup {subject.cgroup} to {info.cgroup} "
                                      "since it was judged")
        v2_path = info.cgroup
        v2_dir = self.host.cgroup_dir(v2_path) if v2_path is not None else None
        wanted = {"freeze": ("cgroup.freeze", "freezer", "freezer.state"),
                  "throttle": ("cpu.max", "cpu", "cpu.cfs_quota_us"),
                  "limit_pids": ("pids.max", "pids", "pids.max")}[policy.action]
        v2_file, v1_controller, v1_file = wanted
        own = self._own_cgroups()
        if v2_dir is not None and v2_path is not None and self.host.cgroup_file_exists(v2_dir, v2_file):
            self.protection.check_cgroup(v2_path, [own.get("", "")])
            if subject.cgroup_id and self.host.cgroup_inode(v2_dir) != subject.cgroup_id:
                raise Refusal("identity", f"cgroup {v2_path} is not the one judged (it was removed and created "
                                          "again)")
            previous = self.host.read_cgroup(v2_dir, v2_file)
            return CgroupTarget(v2_path, "v2", v2_dir, v2_file, self._value(policy, "v2", v2_dir), previous)
        v1_path = info.cgroups_v1.get(v1_controller)
        v1_dir = self.host.cgroup_dir(v1_path, v1_controller) if v1_path is not None else None
        if v1_dir is None or v1_path is None or not self.host.cgroup_file_exists(v1_dir, v1_file):
            raise ActionFailed(f"pid {info.pid} has no cgroup with {v2_file} (cgroup v2) or {v1_file} "
                               f"(cgroup v1 {v1_controller} controller)")
        self.protection.check_cgroup(v1_path, [own.get(v1_controller, "")])
        previous = self.host.read_cgroup(v1_dir, v1_file)
        return CgroupTarget(v1_path, v1_controller, v1_dir, v1_file, self._value(policy, v1_controller, v1_dir),
                            previous)

    def _own_cgroups(self) -> dict[str, str]:
        """ksift's own cgroup paths: "" for v2, else by v1 controller."""
        try:
            info = self.host.info(self.host.self_pid)
        except (ProcessGone, AccessDenied):
            return {}
        out = dict(info.cgroups_v1)
        if info.cgroup is not None:
            out[""] = info.cgroup
        return out

    def _value(self, policy: Policy, hierarchy: str, directory: str) -> str:
        if policy.action == "freeze":
            return "1" if hierarchy == "v2" else "FROZEN"
        if policy.action == "limit_pids":
            return str(policy.pids_max)
        if hierarchy == "v2":
            return f"{max(1000, int(CPU_PERIOD_US * policy.cpu_percent / 100))} {CPU_PERIOD_US}"
        period = int(self.host.read_cgroup(directory, "cpu.cfs_period_us"))
        return str(max(1000, int(period * policy.cpu_percent / 100)))

    # -- a fork bomb's tree, or a whole cgroup (kill_tree) --------------------

    @staticmethod
    def _judges_a_whole(policy: Policy, subject: Subject) -> bool:
        """kill_tree of a fork bomb (its session in its cgroup) or of a cgroup: no single process is
        judged (a bomb's subject is one member of hundreds, likely gone already)."""
        return policy.action == "kill_tree" and (policy.scope == "cgroup" or subject.tree is not None)

    def _whole(self, policy: Policy, subject: Subject) -> Whole:
        """The judged whole, found again now: the subject's cgroup, proved to be the one judged (its
        directory's inode is the alert's cgroup id), and for a bomb its session."""
        if not subject.cgroup:
            raise ActionFailed(f"{subject.label}: the alert names no cgroup v2 path to act on")
        path = subject.cgroup.rstrip("/") or "/"
        directory = self.host.cgroup_dir(path)
        if directory is None:
            raise ActionFailed(f"cgroup {path}: no cgroup v2 hierarchy is mounted")
        try:
            inode = self.host.cgroup_inode(directory)
        except AccessDenied:
            raise Refusal("identity", f"cgroup {path} is gone") from None
        if subject.cgroup_id and inode != subject.cgroup_id:
            raise Refusal("identity", f"cgroup {path} is not the one judged (it was removed and created again)")
        if policy.scope == "cgroup":
            # The cgroup as a whole: never the root, one that holds ksift, or one holding a protected cgroup.
            self.protection.check_cgroup(path, [self._own_cgroups().get("", "")])
            return Whole(path, directory, inode)
        assert subject.tree is not None
        return Whole(path, directory, inode, subject.tree, self._spared_leader(subject, directory))

    def _spared_leader(self, subject: Subject, directory: str) -> int:
        """The session's leader, when it is in the bomb's cgroup but started well before the bomb: the
        shell the bomb was typed into (or a login shell), not a member. A leader that started with
        the bomb (a bomb run with setsid) is a member. 0: none to spare."""
        leader = subject.tree or 0
        try:
            st = self.host.stat(leader)
        except (ProcessGone, AccessDenied):
            return 0
        if st.session != leader or leader not in self.host.cgroup_pids(directory):
            return 0
        if subject.started_unix is None:
            return leader  # when the bomb began is unknown: a leader is never taken for a member
        margin_s = LEADER_MARGIN_WINDOWS * subject.window_s
        began_ns = self.host.boottime_ns() - int((self.host.wall() - subject.started_unix + margin_s) * 1e9)
        return leader if st.start_ticks < self.host.ticks(max(began_ns, 0)) else 0

    def _members(self, whole: Whole) -> list[ProcStat]:
        """The live members now: the processes in the cgroup (and below it) of the session (any,
        for a whole cgroup), the spared leader excepted."""
        out = []
        for pid in self.host.cgroup_pids(whole.directory):
            if pid == whole.spare:
                continue
            st = self._stat_or_none(pid)
            if st is None or st.state in ("Z", "X") or (whole.session and st.session != whole.session):
                continue
            out.append(st)
        return out

    def _plan_whole(self, policy: Policy, subject: Subject, whole: Whole, shielded: set[int]) -> Plan:
        """Every member passes the guards (one protected process refuses it all), within the blast radius."""
        members = self._members(whole)
        check_blast_radius(len(members), policy.max_processes, self.settings.max_processes)
        targets = self._judge_members(policy, members, shielded)
        if not targets:
            raise Refusal("identity", f"{self._what(whole)}: no process of it is left")
        n = processes(len(targets))
        spared = f" (not its leader {whole.spare}, which predates the bomb)" if whole.spare else ""
        if whole.session:
            steps = [f"SIGSTOP the {n} of session {whole.session} in cgroup {whole.cgroup}{spared}: "
                     f"{_names(targets)}, and every member born meanwhile, round after round",
                     "SIGKILL them all, and again any member born since, until none is left"]
            return Plan(policy.action, "tree", targets, steps=steps, whole=whole)
        kill = CgroupTarget(whole.cgroup, "v2", whole.directory, "cgroup.kill", "1")
        if self.host.cgroup_file_exists(whole.directory, "cgroup.kill"):
            steps = [f"write '1' to {whole.directory.rstrip('/')}/cgroup.kill: SIGKILL the {n} in cgroup "
                     f"{whole.cgroup} and below it: {_names(targets)}, and any born meanwhile"]
        else:
            kill = CgroupTarget(whole.cgroup, "v2", whole.directory, "cgroup.procs", "SIGKILL")
            steps = [f"SIGSTOP the {n} in cgroup {whole.cgroup} and below it: {_names(targets)}, and any born "
                     "meanwhile, round after round (no cgroup.kill here)",
                     "SIGKILL them all, and again any process born since, until none is left"]
        return Plan(policy.action, "cgroup", targets, cgroup=kill, steps=steps, whole=whole)

    @staticmethod
    def _what(whole: Whole) -> str:
        return (f"the fork bomb of session {whole.session} in cgroup {whole.cgroup}" if whole.session
                else f"cgroup {whole.cgroup}")

    def _perform_whole(self, policy: Policy, subject: Subject, flagger: TreeFlagger | None,
                       started: float) -> tuple[Plan, Outcome]:
        """Judge every member now, arm the kernel (fast path), then stop and kill until none is left."""
        shielded = self.protection.self_ancestors()
        whole = self._whole(policy, subject)
        plan = self._plan_whole(policy, subject, whole, shielded)
        limit = min(policy.max_processes, self.settings.max_processes)
        detail: dict[str, Any] = {"fast_path": False, "guards_s": round(time.monotonic() - started, 4),
                                  **({"tree": whole.as_dict()} if whole.session else {"cgroup": whole.as_dict()})}
        flagged = False
        try:
            if flagger is not None:
                # Every member passed: from now on the kernel kills each new one at fork (its cgroup and
                # session say it is one), within what is left of the blast radius.
                flagged = flagger.flag_bomb(whole.cgroup_id, whole.session, limit - len(plan.targets), whole.spare)
                detail.update(fast_path=flagged, tree_armed_s=round(time.monotonic() - started, 4))
            if plan.cgroup is not None and plan.cgroup.file == "cgroup.kill":
                detail.update(self._kill_cgroup(whole, plan))
            else:
                detail.update(self._stop_and_kill(policy, whole, shielded, limit))
        finally:
            if flagged:
                flagger.unflag_bomb(whole.cgroup_id, whole.session)  # its work is done: never longer
        detail["took_s"] = round(time.monotonic() - started, 4)
        return plan, Outcome(detail)

    def _kill_cgroup(self, whole: Whole, plan: Plan) -> dict[str, Any]:
        """cgroup.kill (cgroup v2, Linux 5.14+): the kernel kills every process of the cgroup and
        below it, forks racing with it included; then wait until it is empty."""
        before = self.host.cgroup_pids(whole.directory)
        began = time.monotonic()
        try:
            self.host.write_cgroup(whole.directory, "cgroup.kill", "1")
        except AccessDenied as exc:
            raise ActionFailed(str(exc)) from None
        left = self._wait_gone(lambda: self.host.cgroup_pids(whole.directory))
        return {"method": "cgroup.kill", "signal": "SIGKILL", "killed": len(before), "killed_sample":
                before[:SAMPLE_PIDS], "rounds": 1, "sweep_s": round(time.monotonic() - began, 4), "left": len(left),
                "emptied_mono_ns": time.monotonic_ns() if not left else None}

    def _wait_gone(self, alive) -> list:
        """Poll `alive()` until it is empty or GONE_TIMEOUT_S passed; what is left then."""
        deadline = time.monotonic() + GONE_TIMEOUT_S
        left = alive()
        while left and time.monotonic() < deadline:
            self.host.sleep(GONE_POLL_S)
            left = alive()
        return left

    def _stop_and_kill(self, policy: Policy, whole: Whole, shielded: set[int], limit: int) -> dict[str, Any]:
        """Stop every member (a stopped process cannot fork), round after round until a look finds no
        new one, then kill them all (a pass); then look again until no member is left, with another
        pass for any member born meanwhile (a process stopped in the middle of fork() still brings
        its child into the world). Bounded: MAX_SWEEP_ROUNDS rounds, MAX_KILL_PASSES passes, and
        GONE_TIMEOUT_S for the killed to be gone.

        Any refusal (a protected process among the members, the blast radius) continues every process
        stopped so far and kills none of them; members already killed in an earlier pass stay dead
        (they passed every guard). Membership does not depend on parentage (session and cgroup
        survive re-parenting), so the order of stopping does not matter here.
        """
        held: dict[tuple[int, int], Handle] = {}  # (pid, start ticks): a recycled pid is another process
        killed: list[int] = []
        rounds = passes = 0
        began = time.monotonic()
        gone_by: float | None = None
        alive: list[ProcStat] = []
        try:
            while True:
                alive = self._members(whole)
                new = [st for st in alive if (st.pid, st.start_ticks) not in held]
                if new and passes < MAX_KILL_PASSES:
                    fresh: dict[tuple[int, int], Handle] = {}
                    while new:  # stop, round after round
                        rounds += 1
                        if rounds > MAX_SWEEP_ROUNDS:
                            raise ActionFailed(f"{self._what(whole)} was still growing after {MAX_SWEEP_ROUNDS} "
                                               "rounds of stopping it")
                        if len(held) + len(new) > limit:
                            raise Refusal("blast_radius", f"{self._what(whole)} grew past {limit} processes while "
                                                          f"it was being stopped ({len(held) + len(new)} seen)")
                        for st in new:
                            handle = self._stop_member(policy, st, shielded)
                            if handle is not None:
                                held[(st.pid, st.start_ticks)] = fresh[(st.pid, st.start_ticks)] = handle
                        new = [st for st in self._members(whole) if (st.pid, st.start_ticks) not in held]
                    passes += 1
                    for (pid, _), handle in fresh.items():  # then kill
                        try:
                            self.host.pidfds.send(handle.fd, signal.SIGKILL, pid)
                            killed.append(pid)
                        except (ProcessGone, AccessDenied):
                            continue
                    continue
                # Only members killed already (on their way out) are left, or none; or the passes are spent.
                if not alive:
                    break
                now = time.monotonic()
                gone_by = gone_by or now + GONE_TIMEOUT_S
                if now >= gone_by:
                    break
                self.host.sleep(GONE_POLL_S)
        except BaseException:
            # Leave nothing stopped behind a refusal or failure: what was not killed runs on.
            for (pid, _), handle in held.items():
                if pid not in killed:
                    try:
                        self.host.pidfds.send(handle.fd, signal.SIGCONT, pid)
                    except (ProcessGone, AccessDenied):
                        pass
            raise
        finally:
            for handle in held.values():
                self.host.pidfds.close(handle.fd)
        return {"method": "sweep", "signal": "SIGKILL", "killed": len(killed), "killed_sample": killed[:SAMPLE_PIDS],
                "stopped": len(held), "rounds": rounds, "passes": passes, "sweep_s": round(time.monotonic() - began, 4),
                "left": len(alive), "emptied_mono_ns": time.monotonic_ns() if not alive else None}

    def _stop_member(self, policy: Policy, st: ProcStat, shielded: set[int]) -> Handle | None:
        """Open, prove, guard and SIGSTOP one member; None if it is gone meanwhile."""
        try:
            handle = open_judged(self.host, st.pid, st.start_ticks)
        except Refusal:
            return None  # gone between the look and the pidfd: nothing to stop
        try:
            self.check(policy, handle.info, shielded)
            self._send(handle, signal.SIGSTOP)
        except ProcessGone:
            self.host.pidfds.close(handle.fd)
            return None
        except BaseException:
            self.host.pidfds.close(handle.fd)
            raise
        return handle

    # -- acting (the guards again, then the action) --------------------------

    def perform(self, policy: Policy, subject: Subject,
                flagger: TreeFlagger | None = None) -> tuple[Plan, Outcome]:
        """Check every guard again and act. Returns the plan acted on and what happened.

        flagger: the in-kernel fast path, for kill_tree. It is armed in two stages:
        once the judged process itself passed its guards, the kernel kills its new
        children (they are its clones: same executable, user and cgroup, so every
        guard that passed for it holds for them); once the whole tree passed, the
        kernel kills new children anywhere in it. Both within the blast radius.
        """
        started = time.monotonic()
        if self._judges_a_whole(policy, subject):
            return self._perform_whole(policy, subject, flagger, started)
        handle = open_judged(self.host, subject.pid, self.host.ticks(subject.start_boottime_ns))
        keep_open = False
        try:
            shielded = self.protection.self_ancestors()
            early: dict[str, Any] = {}
            if policy.scope == "tree" and flagger is not None and flagger.kills_children:
                self.check(policy, handle.info, shielded)
                limit = min(policy.max_processes, self.settings.max_processes)
                check_blast_radius(1, policy.max_processes, self.settings.max_processes)
                flagger.flag(handle.pid, [(handle.pid, handle.start_ticks)], False, limit - 1)
                early = {"subject_armed_s": round(time.monotonic() - started, 4),
                         "subject_armed_mono_ns": time.monotonic_ns()}
            plan = self._plan(policy, subject, handle, shielded)
            if policy.scope == "tree":
                outcome = self._kill_tree(policy, plan, handle, shielded, flagger, started)
                outcome.detail.update(early)
                return plan, outcome
            if policy.scope == "cgroup":
                return plan, self._write_cgroup(plan)
            outcome = self._signal_process(policy, handle)
            keep_open = outcome.pending_kill is not None
            return plan, outcome
        finally:
            if not keep_open:
                self.host.pidfds.close(handle.fd)

    def _send(self, handle: Handle, sig: int) -> None:
        try:
            self.host.pidfds.send(handle.fd, sig, handle.pid)
        except ProcessGone:
            raise
        except AccessDenied as exc:
            raise ActionFailed(str(exc)) from None

    def _signal_process(self, policy: Policy, handle: Handle) -> Outcome:
        who = f"pid {handle.pid} ({handle.info.comm})"
        try:
            if policy.action == "renice":
                tids = self.host.threads(handle.pid)
                for tid in tids:
                    self.host.setpriority(tid, policy.nice)
                if self.host.pidfds.exited(handle.fd):
                    raise ActionFailed(f"{who} exited while it was reniced")
                return Outcome({"reniced_threads": len(tids), "nice": policy.nice})
            sig = {"terminate": signal.SIGTERM, "stop": signal.SIGSTOP, "continue": signal.SIGCONT}[policy.action]
            self._send(handle, sig)
        except ProcessGone:
            raise ActionFailed(f"{who} exited before it was signalled") from None
        except AccessDenied as exc:
            raise ActionFailed(str(exc)) from None
        detail = {"signalled": [handle.pid], "signal": sig.name}
        return Outcome(detail, pending_kill=handle if policy.action == "terminate" else None)

    def finish_terminate(self, handle: Handle) -> dict[str, Any]:
        """The grace is over: SIGKILL through the same pidfd if the process still runs."""
        try:
            if self.host.pidfds.exited(handle.fd):
                return {"exited_after_sigterm": True}
            try:
                self.host.pidfds.send(handle.fd, signal.SIGKILL, handle.pid)
            except ProcessGone:
                return {"exited_after_sigterm": True}
            except AccessDenied as exc:
                raise ActionFailed(str(exc)) from None
            return {"exited_after_sigterm": False, "sigkill": True}
        finally:
            self.host.pidfds.close(handle.fd)

    def _kill_tree(self, policy: Policy, plan: Plan, root: Handle, shielded: set[int],
                   flagger: TreeFlagger | None, started: float) -> Outcome:
        """Stop the whole tree first (a stopped process cannot fork), then kill it.

        Killing from the top instead would orphan the children, which the
        kernel re-parents out of the tree, and a fork bomb would live on.
        """
        limit = min(policy.max_processes, self.settings.max_processes)
        judged = time.monotonic()
        # How long the guards took (the judged tree is what the fast path flags), then the sweep.
        detail: dict[str, Any] = {"fast_path": False, "guards_s": round(judged - started, 4)}
        if flagger is not None:
            members = [(t.pid, t.start_ticks) for t in plan.targets]
            detail["fast_path_flagged"] = flagger.flag(root.pid, members, True, limit - len(members))
            detail["fast_path"] = detail["fast_path_flagged"] > 0
            detail["tree_armed_s"] = round(time.monotonic() - started, 4)
        held: dict[int, Handle] = {}
        try:
            try:
                self._send(root, signal.SIGSTOP)
            except ProcessGone:
                raise ActionFailed(f"pid {root.pid} exited before it was stopped") from None
            held[root.pid] = root
            for rounds in range(1, MAX_SWEEP_ROUNDS + 1):
                new = [m for m in self.descendants(root.pid, root.start_ticks) if m.pid not in held]
                if not new:
                    break
                if len(held) + len(new) > limit:
                    raise Refusal("blast_radius", f"the tree grew past {limit} processes while it was being "
                                                  f"stopped ({len(held) + len(new)} seen)")
                for member in new:
                    try:
                        handle = open_judged(self.host, member.pid, member.start_ticks)
                    except Refusal:
                        continue  # gone between the scan and the pidfd: nothing to stop
                    try:
                        self.check(policy, handle.info, shielded)
                        self._send(handle, signal.SIGSTOP)
                    except ProcessGone:
                        self.host.pidfds.close(handle.fd)
                        continue
                    except BaseException:
                        self.host.pidfds.close(handle.fd)
                        raise
                    held[member.pid] = handle
            else:
                raise ActionFailed(f"the tree was still growing after {MAX_SWEEP_ROUNDS} rounds of stopping it")
            killed = []
            for pid, handle in held.items():
                try:
                    self.host.pidfds.send(handle.fd, signal.SIGKILL, pid)
                    killed.append(pid)
                except (ProcessGone, AccessDenied):
                    continue
            detail.update(signalled=killed, signal="SIGKILL", stopped=len(held), rounds=rounds,
                          sweep_s=round(time.monotonic() - judged, 4), killed=len(killed),
                          killed_sample=killed[:SAMPLE_PIDS], took_s=round(time.monotonic() - started, 4))
            return Outcome(detail)
        except BaseException:
            # Leave nothing stopped behind a refusal or failure: what was not killed runs on.
            for pid, handle in held.items():
                try:
                    self.host.pidfds.send(handle.fd, signal.SIGCONT, pid)
                except (ProcessGone, AccessDenied):
                    pass
            raise
        finally:
            for pid, handle in held.items():
                if handle is not root:
                    self.host.pidfds.close(handle.fd)

    def _write_cgroup(self, plan: Plan) -> Outcome:
        cg = plan.cgroup
        assert cg is not None
        try:
            self.host.write_cgroup(cg.directory, cg.file, cg.value)
        except AccessDenied as exc:
            raise ActionFailed(str(exc)) from None
        return Outcome({"cgroup": cg.as_dict(), "processes": len(plan.targets)})
