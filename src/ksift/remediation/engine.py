"""The remediation sink: turns alerts that a policy covers into decisions, and acts.

For each `open` alert of a rule whose policy is active, one decision:

    1. cooldown and rate limit (in the loop), then every process guard and the
       plan (in a worker thread: it reads /proc);
    2. by mode: dry-run records the plan; ask records it as pending and waits
       for `ksift actions approve|reject` (read from the store every
       poll_interval) or the API; enforce acts at once;
    3. acting runs every guard again, then acts (worker thread). terminate's
       grace is waited for on the loop, never in a thread or by blocking it;
    4. once done, an outcome watch reads the rule's own signal every
       WATCH_PERIOD_S until it falls under the threshold ("resolved 0.8s after
       the action") or the watch ends ("did not help").

It reads the agent only through its AgentView (bound by the agent): the open
incident of an alert, the rule's live state in the kernel, the shared maps.
With a policy that asks for the fork-bomb fast path, it owns the in-kernel
guard (remediation/guard.py): loaded in start(), closed in stop() and close().
Its housekeeping sleeps while nothing is watched or pending: configured
remediation adds no wake-up to an idle agent.

Every change of a decision is saved (SQLite, through one I/O thread so writes
stay in order), put on the incident's stored alerts, and handed to listeners
(the API streams them as "action" events). emit() only schedules work: the
agent's loop is never blocked by remediation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ksift.errors import BpfError, KsiftError, StoreError
from ksift.remediation.actions import BOMB_SIGNAL, ActionFailed, Actuator, Subject
from ksift.remediation.decisions import Decision, DecisionError, DecisionStore, new_id
from ksift.remediation.guards import Cooldowns, RateLimiter, Refusal
from ksift.remediation.host import Host
from ksift.remediation.policy import Policy, effective_mode, fast_path_enabled
from ksift.remediation.settings import RemediationSettings
from ksift.rules.model import Rule, RuleSet

if TYPE_CHECKING:
    from ksift.agent import AgentView
    from ksift.remediation.guard import TreeGuard

log = logging.getLogger("ksift.remediation")

NS = 1_000_000_000
WATCH_PERIOD_S = 0.1  # how often a done action's outcome is read, only while one is watched
GRACE_POLL_S = 0.05
STOP_TIMEOUT_S = 10.0

Listener = Callable[[str, dict], None]


@dataclass
class Case:
    """One decision in flight, with what the engine needs to carry it through."""

    decision: Decision
    rule: Rule
    policy: Policy
    subject: Subject
    key: Hashable | None       # the incident's key (for reading the live signal)
    subject_key: Hashable       # what cooldown is keyed by
    real: bool                  # ask/enforce (real budget) or dry-run (a simulated one)
    flagged: list[int] = field(default_factory=list)  # fast-path flags to remove afterwards
    flagged_bombs: list[tuple[int, int]] = field(default_factory=list)  # (cgroup id, session) flagged
    acted_ns: int | None = None
    watch_until_ns: int | None = None


class RemediationEngine:
    """A sink (see the module docstring)."""

    name = "remediation"

    def __init__(self, settings: RemediationSettings, rules: RuleSet, db_path: str, *,
                 host: Host | None = None, actuator: Actuator | None = None,
                 wall: Callable[[], float] = time.time, mono_ns: Callable[[], int] = time.monotonic_ns,
                 store_factory: Callable[[str], DecisionStore] | None = None,
                 guard_factory: Callable[[AgentView | None], TreeGuard] | None = None,
                 alerts_written: Callable[[float], bool] = lambda timeout: True):
        # Policies come checked from the rules parser (ksift.rules.parse), fast_path's signal included.
        self.settings = settings
        self.db_path = db_path
        # The alert store writes in its own thread: wait for it before annotating the alert rows.
        self.alerts_written = alerts_written
        self.rules = {r.name: r for r in rules.enabled()
                      if r.policy is not None and effective_mode(r.policy, settings) != "off"}
        self.host = host
        self.actuator = actuator
        self.wall = wall
        self.mono_ns = mono_ns
        self._store_factory = store_factory or (lambda path: DecisionStore(path, clock=wall))
        self._guard_factory = guard_factory or _default_guard
        self.store: DecisionStore | None = None
        self.listeners: list[Listener] = []
        self.delivered = 0
        self.failed = 0
        self.stats: Counter[str] = Counter()  # decisions by status, as they are recorded
        mono_s = lambda: self.mono_ns() / NS  # noqa: E731 - the guards count in seconds
        self.limiter = RateLimiter(settings.max_actions_per_minute, mono_s)
        self.dry_limiter = RateLimiter(settings.max_actions_per_minute, mono_s)
        self.cooldowns = Cooldowns(mono_s)
        self.dry_cooldowns = Cooldowns(mono_s)
        self.view: AgentView | None = None
        self.guard: TreeGuard | None = None  # the in-kernel fork-bomb guard, while a policy wants it
        self._guard_counters: dict[str, int] = {}  # its last counters, kept once it is closed
        self.cases: dict[str, Case] = {}  # decisions not final yet, or done and still watched
        self._counted: dict[str, str] = {}  # decision id -> the status last counted in stats
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._io: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task] = set()
        self._housekeeper: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None  # something to watch or pick up answers for
        self._next_poll = 0.0

    # -- sink interface ----------------------------------------------------

    def bind(self, view: AgentView) -> None:
        """The agent's narrow interface: the only way remediation reads the agent."""
        self.view = view

    def fast_path_wanted(self) -> bool:
        """A policy may act and asks for the in-kernel fast path: the guard must be loaded."""
        return any(fast_path_enabled(r.policy, self.settings) for r in self.rules.values())

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # The agent does not stop a sink whose start failed: release what was made here.
            self._close_guard()
            for pool in (self._workers, self._io):
                if pool is not None:
                    pool.shutdown(wait=False)
            self._workers = self._io = None
            raise

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self.fast_path_wanted() and self.guard is None:
            # Loaded before the agent is ready, so the first alert finds it armed-able.
            guard = self._guard_factory(self.view)
            guard.start(self.view.shared_map_fds() if self.view is not None else {})
            self.guard = guard
        # The storms remediation fights load the CPU; the threads that judge and act (and the
        # loop, which hands them the alert) must not starve behind them.
        _raise_priority(self.settings.nice)
        initializer = functools.partial(_raise_priority, self.settings.nice)
        self._workers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ksift-remediate",
                                                              initializer=initializer)
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ksift-decisions")
        if self.host is None:
            self.host = Host()
        if self.actuator is None:
            self.actuator = Actuator(self.host, self.settings)
        self.store = await self._in_io(self._store_factory, self.db_path)
        expired = await self._in_io(self.store.expire_all_pending, "the agent that proposed it stopped")
        if expired:
            log.info("remediation: %d decision(s) left pending by an earlier agent expired", expired)
        self._housekeeper = asyncio.create_task(self._housekeeping())
        modes = ", ".join(f"{name}: {r.policy.action} ({effective_mode(r.policy, self.settings)})"
                          for name, r in self.rules.items())
        log.info("remediation: %s", modes or "no active policy")

    async def stop(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            await asyncio.gather(self._housekeeper, return_exceptions=True)
            self._housekeeper = None
        if self._tasks:
            # Let actions under way finish (they are bounded); never abandon a half-stopped tree.
            await asyncio.wait(set(self._tasks), timeout=STOP_TIMEOUT_S)
        for case in list(self.cases.values()):
            if case.decision.status == "pending" and self.store is not None:
                if await self._in_io(self.store.expire, case.decision, "the agent stopped"):
                    self._record(case.decision, case, stored=True)
            self._unflag(case)
        self.cases.clear()
        if self._tasks:  # the records just made still have to reach the store
            await asyncio.wait(set(self._tasks), timeout=STOP_TIMEOUT_S)
        for pool in (self._workers, self._io):
            if pool is not None:
                pool.shutdown(wait=True)
        self._workers = self._io = None
        self._close_guard()

    def close(self) -> None:
        self._close_guard()  # also here: every way out detaches the guard
        if self.store is not None:
            self.store.close()
            self.store = None

    def _close_guard(self) -> None:
        guard = self.guard
        if guard is None:
            return
        try:
            self._guard_counters = guard.counters()
        except Exception:
            log.exception("remediation: could not read the fork-bomb guard's counters")
        try:
            guard.close()
        except Exception:
            log.exception("remediation: closing the fork-bomb guard failed")
        self.guard = None

    def emit(self, alert: dict[str, Any]) -> None:
        try:
            rule = self.rules.get(alert.get("rule")) if alert.get("status") == "open" else None
            if rule is not None and not rule.policy.covers((alert.get("subject") or {}).get("cgroup")):
                self.stats["out_of_scope"] += 1  # the policy's only_cgroups leaves this subject alone
            elif rule is not None:
                if self._loop is None:
                    raise RuntimeError("remediation got an alert before its start()")
                key = self._incident_key(alert)
                self._spawn(self._propose(alert, key))
        except Exception:
            self.failed += 1
            log.exception("remediation: cannot handle alert %s", alert.get("id"))
        else:
            self.delivered += 1

    # -- the decision --------------------------------------------------------

    def _incident_key(self, alert: dict[str, Any]) -> Hashable | None:
        if self.view is None or alert.get("incident_id") is None:
            return None
        return self.view.incident_key(str(alert.get("rule")), str(alert.get("incident_id")))

    async def _propose(self, alert: dict[str, Any], key: Hashable | None) -> None:
        rule = self.rules[alert["rule"]]
        policy: Policy = rule.policy
        mode = effective_mode(policy, self.settings)
        now = self.wall()
        decision = Decision(id=new_id(), rule=rule.name, incident_id=str(alert.get("incident_id")),
                            alert_id=str(alert.get("id")), action=policy.action, mode=mode, status="pending",
                            created_unix=now, updated_unix=now, subject=dict(alert.get("subject") or {}),
                            policy=policy.as_dict())
        try:
            subject = Subject.from_alert(alert, bomb=rule.signal == BOMB_SIGNAL)
        except ValueError as exc:
            decision.reason = str(exc)
            decision.set("failed", now, note=str(exc))
            self._record(decision)
            return
        real = mode in ("ask", "enforce")
        subject_key: Hashable = ("process", subject.pid, subject.start_boottime_ns)
        if policy.scope == "cgroup":
            subject_key = ("cgroup", subject.cgroup)
        elif subject.tree is not None:
            subject_key = ("tree", subject.tree, subject.cgroup_id or subject.cgroup)
        case = Case(decision, rule, policy, subject, key, subject_key, real)
        if mode == "enforce":
            # Acting runs every guard itself, at once: judging twice would only give the storm time.
            self.cases[decision.id] = case
            await self._act(case)
            return
        cooldowns, limiter = self._budget(case)
        try:
            cooldowns.check(subject_key, subject.label, decision.id)
            limiter.check(rule.name, policy.rate_per_minute)
            if real:
                cooldowns.hold(subject_key, decision.id)  # one decision per subject at a time
            plan = await self._in_workers(self.actuator.plan, policy, subject)
        except Refusal as refusal:
            self._refuse(case, refusal)
            return
        except (ActionFailed, KsiftError) as exc:
            self._fail(case, str(exc))
            return
        except Exception as exc:  # a bug must still end the decision (and free its subject)
            log.exception("remediation: judging decision %s failed", decision.id)
            self._fail(case, f"internal error: {exc!r}")
            return
        decision.plan = plan.as_dict()
        if mode == "dry-run":
            # Spend the simulated budget, so a dry run shows the refusals enforce would meet.
            limiter.record(rule.name)
            cooldowns.start(subject_key, policy.cooldown_s)
            decision.set("dry-run", self.wall(), note="nothing was done; would have: " + "; ".join(plan.steps))
            self._record(decision, case)
            return
        # ask: a person sees the plan and answers within the timeout.
        self.cases[decision.id] = case
        timeout = policy.ask_timeout_s or self.settings.ask_timeout_s
        decision.expires_unix = self.wall() + timeout
        decision.set("pending", self.wall(), note=f"waiting for approval (expires in {timeout:g}s)")
        self._record(decision, case)

    def _budget(self, case: Case) -> tuple[Cooldowns, RateLimiter]:
        return (self.cooldowns, self.limiter) if case.real else (self.dry_cooldowns, self.dry_limiter)

    async def _act(self, case: Case) -> None:
        """The guards again, then the action; the decision ends done, refused or failed."""
        decision, policy = case.decision, case.policy
        try:
            self.cooldowns.check(case.subject_key, case.subject.label, decision.id)
            self.limiter.check(case.rule.name, policy.rate_per_minute)
        except Refusal as refusal:
            self._refuse(case, refusal)
            return
        self.cooldowns.hold(case.subject_key, decision.id)  # no second action on it while this one runs
        self.limiter.record(case.rule.name)  # an attempt spends the budget, whatever comes of it
        flag = self._fast_path(case)
        case.acted_ns = self.mono_ns()
        try:
            plan, outcome = await self._in_workers(self.actuator.perform, policy, case.subject, flag)
        except Refusal as refusal:
            if case.flagged:
                case.decision.result = {"fast_path": "the kernel killed new children of the judged process "
                                                      "until this refusal"}
            self._unflag(case)
            self._refuse(case, refusal)
            return
        except (ActionFailed, KsiftError, OSError) as exc:
            self._unflag(case)
            self._fail(case, str(exc))
            return
        except Exception as exc:  # a bug must still end the decision (and free its subject)
            log.exception("remediation: acting on decision %s failed", decision.id)
            self._unflag(case)
            self._fail(case, f"internal error: {exc!r}")
            return
        decision.plan = plan.as_dict()
        # CLOCK_MONOTONIC of the moment of acting: tests line it up with a workload's own clock.
        decision.result = dict(outcome.detail, acted_mono_ns=case.acted_ns)
        self.cooldowns.start(case.subject_key, policy.cooldown_s)
        self.cooldowns.release(case.subject_key, decision.id)
        decision.set("done", self.wall(), note="; ".join(plan.steps))
        window = case.rule.window_s
        verify = policy.verify_for_s if policy.verify_for_s is not None else max(3 * window, 5.0)
        case.watch_until_ns = case.acted_ns + int(verify * NS)
        self._record(decision, case)
        if outcome.pending_kill is not None:
            await self._finish_terminate(case, outcome.pending_kill, policy.grace_s)

    async def _finish_terminate(self, case: Case, handle, grace_s: float) -> None:
        """Wait out the grace on the loop (polling the pidfd), then SIGKILL if still running."""
        deadline = self.mono_ns() + int(grace_s * NS)
        while self.mono_ns() < deadline and not self.host.pidfds.exited(handle.fd):
            await asyncio.sleep(GRACE_POLL_S)
        try:
            extra = await self._in_workers(self.actuator.finish_terminate, handle)
        except (ActionFailed, KsiftError) as exc:
            extra = {"sigkill_failed": str(exc)}
        case.decision.result = {**(case.decision.result or {}), **extra}
        note = "exited after SIGTERM" if extra.get("exited_after_sigterm") else "SIGKILL after the grace"
        case.decision.set(case.decision.status, self.wall(), note=note)
        self._record(case.decision, case)

    def _fast_path(self, case: Case) -> _Flagger | None:
        if not (case.policy.fast_path and case.policy.action == "kill_tree"):
            return None
        guard = self.guard
        if guard is None or not guard.ready:
            return None
        return _Flagger(guard, case)

    def _unflag(self, case: Case) -> None:
        if (case.flagged or case.flagged_bombs) and self.guard is not None:
            try:
                if case.flagged:
                    self.guard.unflag_tree(case.flagged)
                for cgroup_id, session in case.flagged_bombs:
                    self.guard.unflag_bomb(cgroup_id, session)
            except Exception:
                log.exception("remediation: could not clear the fast-path flags of %s", case.decision.id)
        case.flagged = []
        case.flagged_bombs = []

    def _refuse(self, case: Case, refusal: Refusal) -> None:
        case.decision.guard = refusal.guard
        case.decision.reason = refusal.reason
        case.decision.set("refused", self.wall(), note=f"{refusal.guard}: {refusal.reason}")
        self._budget(case)[0].release(case.subject_key, case.decision.id)
        self._record(case.decision, case)

    def _fail(self, case: Case, reason: str) -> None:
        case.decision.reason = reason
        case.decision.set("failed", self.wall(), note=reason)
        self._budget(case)[0].release(case.subject_key, case.decision.id)
        self._record(case.decision, case)

    # -- recording -------------------------------------------------------

    def _record(self, decision: Decision, case: Case | None = None, stored: bool = False) -> None:
        """Count, log, publish and save a decision that changed. stored: the store already
        has this state (someone answered through `ksift actions`): only annotate the alert."""
        if self._counted.get(decision.id) != decision.status:
            self.stats[decision.status] += 1
            self._counted[decision.id] = decision.status
        if decision.final and (case is None or case.watch_until_ns is None):
            self.cases.pop(decision.id, None)
            self._counted.pop(decision.id, None)
        log.info("remediation %s [%s] %s: %s", decision.id, decision.rule, decision.mode, decision.summary())
        if self._wake is not None:
            self._wake.set()  # a decision changed: housekeeping sees whether it has something to watch
        snapshot = Decision.from_dict(decision.as_dict())  # the I/O thread gets its own copy
        self._publish(snapshot)
        self._to_alerts(snapshot)
        self._spawn(self._in_io(self._annotate if stored else self._persist, snapshot))

    def _to_alerts(self, decision: Decision) -> None:
        """The incident's alerts carry the decision: the agent puts it on every alert it builds from
        now on and sends the incident's last alert again to the other sinks (stdout, the store,
        webhooks...), as the API streams it as an "action" event."""
        changed = getattr(self.view, "remediation_changed", None)
        if changed is None or not decision.incident_id:
            return
        try:
            changed(decision.incident_id, decision.brief(), self)
        except Exception:
            log.exception("remediation: could not put decision %s on its alerts", decision.id)

    def _persist(self, decision: Decision) -> None:
        if self.store is None:
            return
        self.store.save(decision)
        self._annotate(decision)

    def _annotate(self, decision: Decision) -> None:
        if self.store is not None:
            self.alerts_written(2.0)  # on remediation's I/O thread, never the loop
            self.store.annotate_alerts(decision)

    def _publish(self, decision: Decision) -> None:
        event = decision.as_dict()
        event["summary"] = decision.summary()
        for listener in list(self.listeners):
            try:
                listener("action", event)
            except Exception:
                log.exception("remediation: a listener failed on decision %s", decision.id)

    # -- approvals (ask mode) ----------------------------------------------

    async def answer(self, decision_id: str, approve: bool, by: str) -> Decision:
        """Approve or reject from within the agent (the API). DecisionError as for the CLI."""
        if self.store is None:
            raise DecisionError("remediation is not running")
        stored = await self._in_io(self.store.answer, decision_id, approve, by)
        await self._pick_up_answers()
        return stored

    async def _pick_up_answers(self) -> None:
        pending = [c for c in self.cases.values() if c.decision.status == "pending"]
        if not pending or self.store is None:
            return
        stored = await self._in_io(self.store.statuses, [c.decision.id for c in pending])
        now = self.wall()
        for case in pending:
            if case.decision.status != "pending":
                continue  # answered meanwhile through another path
            row = stored.get(case.decision.id)
            if row is not None and row.status in ("approved", "rejected", "expired"):
                case.decision.status = row.status
                case.decision.decided_by = row.decided_by
                case.decision.reason = row.reason or case.decision.reason
                case.decision.history = row.history
                case.decision.updated_unix = row.updated_unix
                if row.status != "approved":
                    self.cooldowns.release(case.subject_key, case.decision.id)
                self._record(case.decision, case, stored=True)
                if row.status == "approved":
                    self._spawn(self._act(case))
            elif case.decision.expires_unix is not None and now >= case.decision.expires_unix:
                if await self._in_io(self.store.expire, case.decision, "nobody answered before it expired"):
                    self.cooldowns.release(case.subject_key, case.decision.id)
                    self._record(case.decision, case, stored=True)

    # -- outcome -------------------------------------------------------------

    def _measure(self, case: Case, now_ns: int) -> str | None:
        """Why the alert's own signal is under its threshold now, or None if it is not (yet)."""
        rule = case.rule
        view = self.view
        if view is None or case.key is None or case.acted_ns is None:
            return None
        incident = view.incident(rule.name, case.key)
        if incident is None:
            return "the incident resolved"
        if view.has_live_state(rule.name):
            state = view.live_state(rule.name, case.key)
            if state is None:
                return "the process is gone"
            if state.window_start_ns >= case.acted_ns and state.window_count > rule.threshold:
                return None  # over again in a window that began after the action
        window_ns = int(rule.window_s * NS)
        grace_ns = view.grace_ns  # a record of that window may still be on its way
        crossed_after = incident.last_window_ns >= case.acted_ns
        if not crossed_after and now_ns >= case.acted_ns + window_ns + grace_ns:
            return f"a whole {rule.window_s:g}s window passed under the threshold of {rule.threshold}"
        return None

    def _check_outcomes(self) -> None:
        now_ns = self.mono_ns()
        for case in list(self.cases.values()):
            if case.decision.status != "done" or case.watch_until_ns is None or case.decision.outcome is not None:
                continue
            try:
                why = self._measure(case, now_ns)
            except Exception:
                log.exception("remediation: cannot measure the outcome of %s", case.decision.id)
                why = None
            after_s = round((now_ns - (case.acted_ns or now_ns)) / NS, 1)
            if why is not None:
                case.decision.outcome = {"resolved": True, "after_s": after_s, "how": why,
                                         "text": f"resolved {after_s:g}s after the action ({why})"}
            elif now_ns >= case.watch_until_ns:
                case.decision.outcome = {"resolved": False, "after_s": after_s,
                                         "text": f"did not help: {case.rule.name} still over its threshold "
                                                 f"{after_s:g}s after the action"}
            else:
                continue
            case.watch_until_ns = None
            self.stats["resolved" if case.decision.outcome["resolved"] else "did_not_help"] += 1
            self._unflag(case)
            self._record(case.decision, case)

    # -- plumbing ------------------------------------------------------------

    def _watching(self) -> bool:
        return any(c.decision.status == "done" and c.watch_until_ns is not None and c.decision.outcome is None
                   for c in self.cases.values())

    def _pending(self) -> bool:
        return any(c.decision.status == "pending" for c in self.cases.values())

    def _next_wakeup_s(self) -> float | None:
        """Seconds until housekeeping has work: an outcome to read (every WATCH_PERIOD_S while an
        action is watched), answers to pick up (every poll_interval while a decision is pending);
        None when there is nothing of either, and it sleeps until a decision changes."""
        delays = []
        if self._watching():
            delays.append(WATCH_PERIOD_S)
        if self._pending():
            delays.append(max(self._next_poll - time.monotonic(), 0.0))
        return min(delays) if delays else None

    async def _housekeeping(self) -> None:
        assert self._wake is not None
        while True:
            try:
                if self._watching():
                    self._check_outcomes()
                if self._pending():
                    now = time.monotonic()
                    if now >= self._next_poll:
                        self._next_poll = now + self.settings.poll_interval_s
                        await self._pick_up_answers()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("remediation: housekeeping failed (will retry)")
            delay = self._next_wakeup_s()
            if delay is None:
                # Nothing to watch: sleep until a decision changes (_record wakes us).
                self._wake.clear()
                if self._next_wakeup_s() is None:  # nothing changed since the check
                    await self._wake.wait()
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failed += 1
            log.error("remediation: a task failed: %r", task.exception(), exc_info=task.exception())

    async def _in_workers(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._workers, functools.partial(fn, *args))

    async def _in_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, functools.partial(fn, *args))

    # -- reading (the API) ---------------------------------------------------

    async def read(self, query: Callable[[DecisionStore], Any]) -> Any:
        """Run a read on the decision store in the I/O thread (never in the loop)."""
        if self.store is None:
            raise StoreError("remediation is not running")
        store = self.store
        return await self._in_io(query, store)

    def counters(self) -> dict[str, int]:
        """Flat counts for the funnel report and /metrics: alerts handled, decisions by status,
        and the in-kernel guard's (tree_fork_killed, tree_kill_failed, tree_budget_spent: read
        now while it is loaded, its last values once it is closed) when a policy loaded it."""
        out = {"delivered": self.delivered, "failed": self.failed, "in_flight": len(self.cases)}
        out.update({f"decisions_{status}": n for status, n in sorted(self.stats.items())})
        guard = self.guard
        if guard is not None:
            try:
                self._guard_counters = guard.counters()
            except Exception:
                log.exception("remediation: could not read the fork-bomb guard's counters")
        out.update(self._guard_counters)
        return out

    def report(self) -> dict[str, Any]:
        return {"policies": {name: dict(r.policy.as_dict(), mode=effective_mode(r.policy, self.settings))
                             for name, r in self.rules.items()},
                "decisions": dict(self.stats), "in_flight": len(self.cases)}


class _Flagger:
    """The fast path of one case: flags through the in-kernel guard, remembers what to unflag."""

    def __init__(self, guard: TreeGuard, case: Case):
        self.guard = guard
        self.case = case
        self.kills_children = bool(guard.kills_children)

    def flag(self, root: int, members: list[tuple[int, int]], whole_tree: bool, budget: int) -> int:
        count = self.guard.flag_tree(root, members, whole_tree, budget)
        self.case.flagged.extend(pid for pid, _ in members)
        return count

    def flag_bomb(self, cgroup_id: int, session: int, budget: int, spare_tgid: int) -> bool:
        self.case.flagged_bombs.append((cgroup_id, session))  # before: a failure half-way is still cleared
        return self.guard.flag_bomb(cgroup_id, session, budget, spare_tgid)

    def unflag_bomb(self, cgroup_id: int, session: int) -> None:
        self.guard.unflag_bomb(cgroup_id, session)
        if (cgroup_id, session) in self.case.flagged_bombs:
            self.case.flagged_bombs.remove((cgroup_id, session))


def _default_guard(view: AgentView | None) -> TreeGuard:
    """The in-kernel guard, loaded with the same libbpf and objects directory as the agent's core."""
    from ksift.remediation.guard import TreeGuard  # only hosts with a fast-path policy import it

    loader = view.bpf_loader() if view is not None else None
    if loader is None:
        raise BpfError("the in-kernel fork-bomb guard needs the agent's core BPF object, and there is none")
    lib, objects_dir = loader
    return TreeGuard(lib, objects_dir)


def _raise_priority(nice: int | None) -> None:
    """Give the calling thread (Linux: setpriority on a tid is per thread) this nice value."""
    if nice is None:
        return
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.warning("remediation: cannot set nice %d on its threads (%s); a CPU storm may slow it down",
                    nice, exc.strerror)


def build_remediation(config, rules: RuleSet, store) -> RemediationEngine | None:
    """The remediation sink, or None when no rule has an active policy (or [remediation] enabled = false)."""
    settings = config.section("remediation")
    if not settings.enabled:
        return None
    if not any(r.policy is not None and effective_mode(r.policy, settings) != "off" for r in rules.enabled()):
        return None
    return RemediationEngine(settings, rules, str(store.path), alerts_written=store.wait_for_writes)
