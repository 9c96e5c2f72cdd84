"""Stopping fork bombs as a whole (issue 15): the real agent, the packaged fork_bomb rule, real bombs.

Every bomb runs in cgroups made by the test (harness.BombCgroups): a v1 pids
cgroup with pids.max = PIDS_MAX that bounds it whatever happens, and a v2
cgroup of the same name that the alert names (subject.cgroup) and that every
policy here is confined to (only_cgroups): other work on this shared host is
never acted on. A watchdog kills both cgroups DEADLINE_S after entry whatever
the test is doing, and they are emptied and removed on the way out.

Each bomb starts in a session of its own whose leader first starts a sleeper
in a sibling v2 cgroup, then becomes the bomb (tests/workloads/bombs.py): the
sleeper shares the bomb's session but not its cgroup, so it is outside the
bomb and must be left untouched. The session's orphans are reaped at once by
a subreaper outside the bomb (REAPER), as systemd would: the bomb keeps
renewing its members at its pids limit instead of freezing on zombies.

What the tests report (run with -s to see it): per run, the time from the
bomb's start (the launcher's CLOCK_MONOTONIC) to the moment the action saw no
member left, the decision's figures (killed, rounds, how long), and the
in-kernel guard's counters with the fast path. The measurement of every shape
with and without the fast path, and what a process outside the bomb saw
meanwhile, is bench/bomb_stop.py (docs/safety.md), not a timed assertion here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    WORKLOADS,
    BombCgroups,
    ScratchCgroup,
    packaged_rule,
    remediation_agent_config,
    start_agent,
    stored_decisions,
    wait_for,
    workload_command,
    write_rules,
)

from ksift.enrich.procfs import ProcFS

PIDS_MAX = 300
DEADLINE_S = 90.0  # the cgroups' watchdog: no bomb outlives this, whatever the test does
EMPTY_WITHIN_S = 5.0  # the bound on bomb start -> no member left that the tests assert (and report)
MAX_PROCESSES = 1000  # the policy's blast radius: more than pids.max, so a whole bomb fits


@pytest.fixture(scope="module")
def treebomb(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("treebomb") / "treebomb"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(WORKLOADS / "treebomb.c")],
                   check=True, capture_output=True, text=True)
    return binary


def bomb_rules(path: Path, cgroup: str, mode: str, **policy) -> Path:
    """The packaged fork_bomb rule with a kill_tree policy confined to the bomb's own cgroup."""
    table = {"action": "kill_tree", "mode": mode, "max_processes": MAX_PROCESSES, "only_cgroups": [cgroup],
             "verify_for": "5s", **policy}
    return write_rules(path, packaged_rule("fork_bomb", policy=table))




# The bomb's launcher: a child subreaper (as systemd is for a session's orphans) that starts the
# bomb's session and reaps every orphan of it at once. This host's pid 1 reaps orphans late, and a
# zombie holds its pid: without a prompt reaper a bomb freezes at its pids limit, which a host with
# systemd never sees. The reaper is not part of the bomb (another session, the test's cgroup).
REAPER = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if os.fork() == 0:
    os.setsid()
    os.execvp(sys.argv[1], sys.argv[1:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


class Launched:
    """A bomb in a session of its own, with a sleeper of that session in a sibling cgroup."""

    def __init__(self, shape: str, cg: BombCgroups, sibling: ScratchCgroup, treebomb: Path):
        bomb = workload_command("bombs.py", shape, *cg.join_args, "--treebomb", treebomb)
        script = (f"(echo $BASHPID > {shlex.quote(str(sibling.path / 'cgroup.procs'))} && exec sleep 600) & "
                  f"echo $!; exec {shlex.join(bomb)}")
        self.proc = subprocess.Popen(["python3", "-c", REAPER, "bash", "-c", script], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.sleeper = int(self.proc.stdout.readline())
        self.session = ProcFS().stat(self.sleeper).session  # the leader's, which becomes the bomb
        report = json.loads(self.proc.stdout.readline())  # bombs.py: {"launcher", "started_ns"}
        self.started_ns = report["started_ns"]
        self.sleeper_start = wait_for("the sleeper in its sibling cgroup", lambda: self._sleeper_joined(sibling),
                                      timeout=10, interval=0.01)

    def _sleeper_joined(self, sibling: ScratchCgroup) -> int | None:
        if str(self.sleeper) not in (sibling.path / "cgroup.procs").read_text().split():
            return None
        return ProcFS().stat(self.sleeper).start_ticks

    def sleeper_untouched(self) -> bool:
        """The sleeper is the process it was, alive and not stopped."""
        st = ProcFS().stat(self.sleeper)
        return st.start_ticks == self.sleeper_start and st.state in ("S", "R") and st.session == self.session

    def close(self) -> None:
        try:
            os.kill(self.sleeper, 9)
        except OSError:
            pass
        self.proc.stdout.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_bomb(tmp_path: Path, shape: str, treebomb: Path, mode: str = "enforce", **policy) -> dict:
    """One bomb under one agent whose policy stops it; what happened, for the assertions."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with BombCgroups(PIDS_MAX, deadline_s=DEADLINE_S) as cg, ScratchCgroup() as sibling:
        rules = bomb_rules(tmp_path / "rules.toml", cg.rel, mode, **policy)
        agent = start_agent(tmp_path / "agent", "--config", str(remediation_agent_config(tmp_path / "agent.toml")),
                            "--rules", str(rules))
        launched = None
        try:
            agent.wait_ready()
            wait_for("remediation to start", lambda: "remediation: fork_bomb: kill_tree" in agent.stderr(), 30)
            launched = Launched(shape, cg, sibling, treebomb)

            def decided() -> list[dict]:
                mine = [d for d in stored_decisions(agent.db_path) if d["subject"].get("cgroup") == cg.rel]
                final = [d for d in mine if d["status"] not in ("pending", "approved")
                         and (d["status"] != "done" or d.get("outcome"))]
                return final if final and len(final) == len(mine) else []

            found = wait_for(f"the decision on the {shape} bomb", decided, timeout=40, interval=0.05)
            left_after = cg.procs()
            peak = cg.peak()
            current = cg.current()
            sleeper_ok = launched.sleeper_untouched()
            # The host keeps working: a new process starts and ends, and the agent is alive.
            assert subprocess.run(["true"], timeout=10).returncode == 0
            assert agent.proc.poll() is None, agent.stderr()
            if mode != "enforce":
                time.sleep(1.0)
                current = cg.current()
            else:  # its incident resolves once the bomb is gone (the resolved alert carries the decision)
                wait_for("the resolved fork_bomb alert", lambda: [
                    a for a in agent.alerts() if a["rule"] == "fork_bomb" and a["status"] == "resolved"
                    and a["subject"]["cgroup"] == cg.rel], timeout=20, interval=0.1)
            refused = cg.refused()
        finally:
            if launched is not None:
                cg.kill()
                launched.close()
            rc = agent.terminate()
        assert rc == 0, agent.stderr()
        stats = agent.stats()
        alerts = [a for a in agent.alerts() if a["rule"] == "fork_bomb" and a["subject"]["cgroup"] == cg.rel]
    return {"decisions": found, "left": left_after, "peak": peak, "current": current, "refused": refused,
            "sleeper_ok": sleeper_ok, "launched": launched, "stats": stats, "alerts": alerts, "db": agent.db_path}


def _guard_counters(result: dict) -> dict:
    return {k: v for k, v in result["stats"]["sinks"]["remediation"].items() if k.startswith("tree_")}


def _check_stopped(name: str, result: dict, scope: str = "tree") -> dict:
    """Exactly one decision, done; every member killed, nothing outside the bomb touched; reported."""
    assert len(result["decisions"]) == 1, [(d["status"], d.get("reason")) for d in result["decisions"]]
    [decision] = result["decisions"]
    launched = result["launched"]
    assert decision["status"] == "done", (decision["status"], decision.get("reason"), decision["history"])
    assert decision["action"] == "kill_tree" and decision["mode"] == "enforce"
    done, plan = decision["result"], decision["plan"]
    assert plan["scope"] == scope and plan["processes"] >= 1
    if scope == "tree":
        assert plan["tree"]["session"] == launched.session and plan["tree"]["cgroup"] == result["alerts"][0][
            "subject"]["cgroup"]
    # Nothing of the bomb is left: the action saw none, and neither does the cgroup.
    assert done["left"] == 0 and done["killed"] >= 1 and done["emptied_mono_ns"], done
    assert result["left"] == set(), sorted(result["left"])[:20]
    assert launched.sleeper not in done["killed_sample"]
    assert result["sleeper_ok"], "the sleeper of the bomb's session, outside its cgroup, was touched"
    # Bomb start (the launcher's CLOCK_MONOTONIC) -> no member left, as the action saw it.
    gone_s = (done["emptied_mono_ns"] - launched.started_ns) / 1e9
    detected_s = (done["acted_mono_ns"] - launched.started_ns) / 1e9
    how = "by cgroup.kill" if done["method"] == "cgroup.kill" else f"in {done['rounds']} rounds"
    print(f"\n[{name}] bomb start -> no member left: {gone_s:.3f} s (acted at {detected_s:.3f} s, "
          f"took {done['took_s']:.3f} s: guards {done['guards_s']:.3f} s, {done['killed']} killed {how}), "
          f"pids.peak {result['peak']}/{PIDS_MAX}, {result['refused']:,} forks refused by pids.max")
    if done.get("fast_path"):
        print(f"[{name}] in-kernel guard: {_guard_counters(result)}")
    assert gone_s < EMPTY_WITHIN_S, f"the bomb lived {gone_s:.3f} s"
    # The outcome: the bomb's incident resolved once it was stopped.
    assert decision["outcome"]["resolved"] is True, decision["outcome"]
    # Alerts carry the decision: the alert sent again when it was made, and the resolved alert.
    carried = [a for a in result["alerts"] if (a.get("remediation") or {}).get("decision_id") == decision["id"]]
    assert carried, [a["status"] for a in result["alerts"]]
    resolved = [a for a in result["alerts"] if a["status"] == "resolved"]
    assert resolved and resolved[-1]["remediation"]["decision_id"] == decision["id"], resolved
    assert resolved[-1]["remediation"]["outcome"] is not None or any(
        a["remediation"].get("outcome") for a in carried)
    return decision


SHAPES = ["shell", "binary", "python", "linear"]  # tests/workloads/bombs.py


@pytest.mark.parametrize("shape", SHAPES)
def test_kill_tree_stops_the_whole_bomb_and_nothing_else(shape, tmp_path, treebomb):
    result = run_bomb(tmp_path, shape, treebomb)
    decision = _check_stopped(f"{shape}, user space", result)
    assert decision["result"]["fast_path"] is False and _guard_counters(result) == {}


@pytest.mark.parametrize("shape", ["shell", "binary"])
def test_kill_tree_with_the_fast_path(shape, tmp_path, treebomb):
    result = run_bomb(tmp_path, shape, treebomb, fast_path=True)
    decision = _check_stopped(f"{shape}, fast path", result)
    assert decision["result"]["fast_path"] is True, decision["result"]
    kernel = _guard_counters(result)
    assert set(kernel) == {"tree_fork_killed", "tree_kill_failed", "tree_budget_spent"}, kernel


def test_a_cgroup_scoped_policy_kills_the_bomb_s_whole_cgroup(tmp_path, treebomb):
    result = run_bomb(tmp_path, "binary", treebomb, scope="cgroup", fast_path=True)
    decision = _check_stopped("binary, scope = cgroup", result, scope="cgroup")
    assert decision["result"]["method"] == "cgroup.kill" and decision["plan"]["cgroup"]["path"].endswith(
        decision["subject"]["cgroup"])


@pytest.mark.parametrize("shape", SHAPES)
def test_dry_run_kills_nothing_and_records_the_plan(shape, tmp_path, treebomb):
    result = run_bomb(tmp_path, shape, treebomb, mode="dry-run")
    [decision] = result["decisions"]
    launched = result["launched"]
    assert decision["status"] == "dry-run" and decision["result"] is None, decision
    plan = decision["plan"]
    assert plan["scope"] == "tree" and plan["tree"]["session"] == launched.session
    # The members alive when the plan was made: the bomb crossed with 100 alive, and a shell bomb's
    # members come and go (they wait on zombies), so at least half of that.
    assert plan["processes"] == len(plan["targets"]) >= 50
    assert launched.sleeper not in [t["pid"] for t in plan["targets"]]
    assert plan["steps"][0].startswith(f"SIGSTOP the {plan['processes']:,} processes of session {launched.session} "
                                       f"in cgroup {decision['subject']['cgroup']}")
    # Nothing was done: a second after the decision the bomb still lives (the binary, python and
    # linear shapes fill their pids cgroup; the shell's members wait on zombies and hold fewer).
    assert result["current"] >= 50, result["current"]
    assert result["sleeper_ok"]
    print(f"\n[dry-run, {shape}] plan: {plan['processes']} processes; pids.current "
          f"{result['current']}/{PIDS_MAX} a second after the decision")
    assert [a for a in result["alerts"] if (a.get("remediation") or {}).get("status") == "dry-run"]


# A parent that forks a short-lived child every 20 ms and, each time it is asked (a file appears),
# says how many of its children ran since it last said.
FORKER = ("import os, sys, time\nran = 0\nend = time.monotonic() + 60\n"
          "while time.monotonic() < end:\n"
          "    pid = os.fork()\n"
          "    if pid == 0:\n        os._exit(7)\n"
          "    _, status = os.waitpid(pid, 0)\n"
          "    ran += os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7\n"
          "    if os.path.exists(sys.argv[1]):\n        os.remove(sys.argv[1])\n        print(ran, flush=True)\n"
          "        ran = 0\n"
          "    time.sleep(0.02)\n")


def test_the_guard_kills_new_members_of_a_flagged_bomb_only(tmp_path):
    """TreeGuard's bomb flags on a real kernel: the new children of a process are killed at fork
    exactly while its (cgroup, session) is flagged, or its whole cgroup (session 0), and never when
    the flag names another session, another cgroup, or spares the forking process."""
    from ksift.config import AgentConfig
    from ksift.loader.libbpf import Libbpf
    from ksift.remediation.guard import TreeGuard
    from ksift.sensors.base import default_objects_dir
    from ksift.transport.core import CoreObject

    lib = Libbpf()
    core = CoreObject(lib, default_objects_dir(), AgentConfig(), os.getpid())
    core.start()
    guard = TreeGuard(lib, default_objects_dir())
    ask = tmp_path / "ask"
    with ScratchCgroup() as here, ScratchCgroup() as elsewhere:
        # In a session of its own (its pid), in `here`.
        parent = subprocess.Popen(["python3", "-c", f"import os\nopen({str(here.path / 'cgroup.procs')!r}, 'w')"
                                   f".write(str(os.getpid()))\nexec(compile({FORKER!r}, 'forker', 'exec'))",
                                   str(ask)], stdout=subprocess.PIPE, text=True, start_new_session=True)

        def ran() -> int:
            ask.touch()
            return int(parent.stdout.readline())

        def ran_while(flag: tuple[int, int, int]) -> int:
            """Children that ran over 0.5 s while (cgroup id, session, spared tgid) was flagged."""
            cgroup_id, session, spare = flag
            assert guard.flag_bomb(cgroup_id, session, 1000, spare)
            ran()  # what ran before the flag
            time.sleep(0.5)
            count = ran()
            guard.unflag_bomb(cgroup_id, session)
            return count

        try:
            guard.start(core.shared_fds)
            if not guard.kills_children:
                pytest.skip("this kernel has no bpf_send_signal_task: the fallback kills the forking parent")
            time.sleep(0.3)
            assert ran() > 0
            session = parent.pid
            assert ProcFS().stat(parent.pid).session == session
            assert ran_while((elsewhere.id, session, 0)) > 0  # its session, another cgroup
            assert ran_while((here.id, session + 100_000, 0)) > 0  # its cgroup, another session
            assert ran_while((here.id, session, parent.pid)) > 0  # the flag spares it (a session's leader)
            killed = guard.counters()["tree_fork_killed"]
            assert killed == 0
            assert ran_while((here.id, session, 0)) == 0  # the bomb: its session in its cgroup
            assert ran_while((here.id, 0, 0)) == 0  # a whole cgroup
            assert guard.counters()["tree_fork_killed"] >= 10
            time.sleep(0.2)
            assert ran() > 0  # unflagged: its children run again
            # The budget is the fast path's blast radius: spent, forks go through (and are counted).
            assert guard.flag_bomb(here.id, session, 2, 0)
            ran()
            time.sleep(0.5)
            assert ran() > 0 and guard.counters()["tree_budget_spent"] >= 1
            guard.unflag_bomb(here.id, session)
        finally:
            parent.kill()
            parent.wait(timeout=10)
            guard.close()
            core.close()
