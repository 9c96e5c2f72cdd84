"""Remediation against a real fork bomb: the real agent, the real BPF objects, real signals.

Every bomb runs inside a cgroup v1 pids cgroup made by the test (pids.max =
PIDS_MAX bounds it whatever happens) and a v2 scratch cgroup; both are emptied
and removed in a finally, even when a test fails. Every policy is confined to
the bomb's cgroup (only_cgroups): other fork storms on this shared host are
never acted on.

What the tests report (run with -s to see it): how many processes the bomb
ran before it was stopped, in enforce mode with user-space action alone and
with the in-kernel fast path.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from harness import CGROUP2_ROOT, WORKLOADS, packaged_rule, start_agent, write_rules

PIDS_V1_ROOT = Path("/sys/fs/cgroup/pids")
PIDS_MAX = 200  # the bomb's hard bound: the kernel refuses its 201st process


def compile_forkbomb(out_dir: Path) -> Path:
    binary = out_dir / "forkbomb"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(WORKLOADS / "forkbomb.c")],
                   check=True, capture_output=True, text=True)
    return binary


class BombCgroups:
    """A v1 pids cgroup (pids.max = PIDS_MAX) and a v2 scratch cgroup for one bomb.

    On exit everything in them is killed and both are removed, even when the
    test failed half-way: a bomb must never outlive its test.
    """

    def __init__(self, pids_max: int = PIDS_MAX):
        name = f"ksift-bomb-{uuid.uuid4().hex[:8]}"
        self.pids = PIDS_V1_ROOT / name
        self.v2 = CGROUP2_ROOT / name
        self.pids_max = pids_max

    def __enter__(self) -> "BombCgroups":
        if not (PIDS_V1_ROOT / "cgroup.procs").exists():
            raise RuntimeError(f"no cgroup v1 pids controller at {PIDS_V1_ROOT}: the bomb cannot be bounded")
        self.pids.mkdir()
        try:
            (self.pids / "pids.max").write_text(str(self.pids_max))
            self.v2.mkdir()
        except BaseException:
            self.pids.rmdir()
            raise
        return self

    @property
    def rel(self) -> str:
        return "/" + self.v2.name

    def peak(self) -> int:
        return int((self.pids / "pids.peak").read_text())

    def current(self) -> int:
        return int((self.pids / "pids.current").read_text())

    def procs(self) -> set[int]:
        out: set[int] = set()
        for d in (self.pids, self.v2):
            try:
                out |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return out

    def __exit__(self, *exc) -> None:
        # cgroup.kill (v2) kills the whole cgroup at once, bombs included; then sweep what is left.
        try:
            (self.v2 / "cgroup.kill").write_text("1")
        except OSError:
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = self.procs()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        for d in (self.v2, self.pids):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def fork_rules(path: Path, scope: str, mode: str = "enforce", fast_path: bool = False, **policy) -> Path:
    """The packaged fork_storm rule's defaults, with a kill_tree policy confined to one cgroup
    (other tests' fork storms on the host must never be touched)."""
    table = {"action": "kill_tree", "mode": mode, "max_processes": 500, "only_cgroups": [scope],
             **({"fast_path": True} if fast_path else {}), **policy}
    return write_rules(path, packaged_rule("fork_storm", severity="critical", policy=table))


def agent_config(path: Path, extra: str = "") -> Path:
    # No HTTP API: several agents run on this host at once and would fight over its port.
    path.write_text(f"[api]\nenabled = false\n\n[remediation]\npoll_interval = \"200ms\"\n{extra}")
    return path


def decisions(db: Path) -> list[dict]:
    from ksift.remediation.decisions import DecisionStore

    if not db.exists():
        return []
    store = DecisionStore(db)
    try:
        return [d.as_dict() for d in store.list(limit=1000)]
    finally:
        store.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


HEADER_SLOTS, MAX_TRACKED = 8, 1 << 15  # the layout of forkbomb.c's counter file


def spawn_times(counter: Path) -> list[int]:
    """CLOCK_MONOTONIC start time of every bomb process that ran (see forkbomb.c)."""
    raw = counter.read_bytes()
    n = min(struct.unpack_from("<Q", raw, 0)[0], MAX_TRACKED)
    return list(struct.unpack_from(f"<{n}Q", raw, 8 * HEADER_SLOTS))


def root_forks(counter: Path) -> list[tuple[int, int]]:
    """(when the root called fork(), when that child first ran or 0 if it never did), per call."""
    raw = counter.read_bytes()
    n = min(struct.unpack_from("<Q", raw, 16)[0], MAX_TRACKED)
    called = struct.unpack_from(f"<{n}Q", raw, 8 * (HEADER_SLOTS + MAX_TRACKED))
    ran = struct.unpack_from(f"<{n}Q", raw, 8 * (HEADER_SLOTS + 2 * MAX_TRACKED))
    return list(zip(called, ran))


# The bomb: its root forks a new member every 250 us (4000 a second, a storm the packaged
# fork_storm rule sees within ~13 ms); members hold their pid until the bomb's deadline.
BOMB_ARGS = ["--root-interval-us", "250"]
BOMB_SECONDS = 6


@pytest.fixture(scope="module")
def forkbomb(tmp_path_factory) -> Path:
    return compile_forkbomb(tmp_path_factory.mktemp("forkbomb"))


def run_storm(tmp_path: Path, bomb: Path, mode: str, fast_path: bool = False, config_extra: str = "",
              seconds: float = BOMB_SECONDS, **policy) -> dict:
    """One bomb under one agent; returns what happened, for the assertions."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with BombCgroups() as cg:
        rules = fork_rules(tmp_path / "rules.toml", cg.rel, mode=mode, fast_path=fast_path, **policy)
        config = agent_config(tmp_path / "agent.toml", config_extra)
        agent = start_agent(tmp_path / "agent", "--config", str(config), "--rules", str(rules))
        try:
            agent.wait_ready()
            counter = tmp_path / "counter"
            done = subprocess.run([str(bomb), "--counter", str(counter), "--cgroup", str(cg.pids), "--cgroup",
                                   str(cg.v2), "--seconds", str(seconds), *BOMB_ARGS],
                                  capture_output=True, text=True, timeout=seconds + 60)
            assert done.returncode == 0, done.stderr
            work = json.loads(done.stdout.strip().splitlines()[-1])
            peak = cg.peak()

            def settled() -> list[dict]:
                mine = [d for d in decisions(agent.db_path) if d["subject"].get("pid") == work["root"]]
                final = [d for d in mine if d["status"] != "done" or d.get("outcome")]
                return final if final and len(final) == len(mine) else []

            found = wait_for(settled, 30, "the decision on the bomb to be recorded")
            # The host keeps working: a new process starts and ends, and the agent is alive.
            assert subprocess.run(["true"], timeout=10).returncode == 0
            assert agent.proc.poll() is None, agent.stderr()
            left = cg.procs()
        finally:
            rc = agent.terminate()
        assert rc == 0, agent.stderr()
        stats = agent.stats()
    return {"work": work, "peak": peak, "decisions": found, "left": left, "stats": stats,
            "starts": spawn_times(counter), "root_forks": root_forks(counter),
            "alerts": [a for a in agent.alerts() if a["subject"]["pid"] == work["root"]], "db": agent.db_path}


def _only(result: dict) -> dict:
    assert len(result["decisions"]) == 1, result["decisions"]
    return result["decisions"][0]


def _report(name: str, result: dict) -> None:
    work = result["work"]
    print(f"\n[{name}] the bomb ran {work['spawned']} processes (pids.peak {result['peak']}, "
          f"pids.max {PIDS_MAX}) and lived {work['elapsed_s']}s")


def _check_enforced(result: dict) -> dict:
    decision = _only(result)
    work = result["work"]
    assert decision["status"] == "done", decision
    assert decision["action"] == "kill_tree" and decision["mode"] == "enforce"
    done = decision["result"]
    assert done["signal"] == "SIGKILL" and work["root"] in done["signalled"]
    assert done["stopped"] >= decision["plan"]["processes"] >= 1
    # Stopped long before its own deadline, and nothing of it is left.
    assert work["elapsed_s"] < BOMB_SECONDS - 1, work
    assert result["left"] == set(), result["left"]
    # The outcome: the fork storm stopped, and how soon after the action.
    outcome = decision["outcome"]
    assert outcome["resolved"] is True and outcome["text"].startswith("resolved "), outcome
    # Recorded on the alert too (the stored one carries the decision).
    from ksift.store.sqlite import AlertStore

    with AlertStore.open_readonly(result["db"]) as store:
        stored = [a for a in store.list(rule="fork_storm") if a["subject"]["pid"] == work["root"]]
    assert stored and all(a.get("remediation", {}).get("decision_id") == decision["id"] for a in stored), stored
    return decision


def test_enforce_stops_a_fork_bomb_and_records_the_outcome(tmp_path, forkbomb):
    result = run_storm(tmp_path, forkbomb, "enforce")
    _report("enforce, user space", result)
    decision = _check_enforced(result)
    assert decision["result"]["fast_path"] is False
    assert result["stats"]["kernel"]["process"]["tree_fork_killed"] == 0
    assert [a["status"] for a in result["alerts"]][:1] == ["open"]


def test_dry_run_only_records_what_it_would_have_done(tmp_path, forkbomb):
    seconds = 3.0
    result = run_storm(tmp_path, forkbomb, "dry-run", seconds=seconds)
    _report("dry-run", result)
    decision = _only(result)
    work = result["work"]
    assert decision["status"] == "dry-run" and decision["mode"] == "dry-run", decision
    assert decision["result"] is None and decision["outcome"] is None
    plan = decision["plan"]
    # Exactly what would have been done: which processes, which signals.
    assert plan["action"] == "kill_tree" and plan["targets"][0]["pid"] == work["root"]
    assert plan["processes"] == len(plan["targets"]) >= 2
    assert plan["steps"][0].startswith(f"SIGSTOP {plan['processes']} process(es) of the tree of {work['root']}")
    assert plan["steps"][1] == f"SIGKILL the same {plan['processes']} process(es)"
    # Nothing was done: the bomb lived until its own deadline and filled its pids cgroup.
    assert work["elapsed_s"] >= seconds - 0.1, work
    assert result["peak"] == PIDS_MAX
    assert result["stats"]["kernel"]["process"]["tree_fork_killed"] == 0


def test_fast_path_stops_the_bomb_with_far_fewer_processes(tmp_path, forkbomb):
    user = run_storm(tmp_path / "user", forkbomb, "enforce")
    fast = run_storm(tmp_path / "fast", forkbomb, "enforce", fast_path=True)
    _report("enforce, user space only", user)
    _report("enforce, in-kernel fast path", fast)
    _check_enforced(user)
    decision = _check_enforced(fast)
    done = decision["result"]
    assert done["fast_path"] is True and done["fast_path_flagged"] >= 1
    kernel = fast["stats"]["kernel"]["process"]
    print(f"[fast path] the kernel killed {kernel['tree_fork_killed']} newborn(s) at fork "
          f"({kernel['tree_kill_failed']} refused by the kernel, {kernel['tree_budget_spent']} over budget)")
    assert kernel["tree_fork_killed"] >= 1
    # Once the kernel was armed on the judged process, no child the root forked from then on ever ran.
    armed = done["subject_armed_mono_ns"]
    after = [(called, ran) for called, ran in fast["root_forks"] if called > armed]
    assert after, "the root made no fork after the kernel was armed: nothing was tested"
    assert [ran for _, ran in after if ran] == [], "children forked after the kernel was armed ran"
    # User space alone stops the root only once the whole tree is judged; the bomb keeps growing meanwhile.
    assert fast["work"]["spawned"] < user["work"]["spawned"], (fast["work"], user["work"])
    assert fast["work"]["spawned"] < PIDS_MAX
