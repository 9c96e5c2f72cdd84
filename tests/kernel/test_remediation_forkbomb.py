"""Remediation against a real fork bomb: the real agent, the real BPF objects, real signals.

Every bomb runs inside a cgroup v1 pids cgroup made by the test (pids.max =
PIDS_MAX bounds it whatever happens) and a v2 scratch cgroup; both are emptied
and removed in a finally, even when a test fails. Every policy is confined to
the bomb's cgroup (only_cgroups): other fork storms on this shared host are
never acted on.

What the tests report (run with -s to see it): how many processes the bomb
ran before it was stopped, in enforce mode with user-space action alone and
with the in-kernel fast path.

The fast path is remediation's own BPF object (guard.bpf.o), not part of the
process sensor: its program and maps are its own, it shares the agent's one
ring buffer, it is loaded only when a policy asks for it, and nothing of it
stays in the kernel once the agent stopped.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from harness import (
    WORKLOADS,
    BombCgroups,
    assert_released,
    owned_bpf_ids,
    packaged_rule,
    remediation_agent_config,
    start_agent,
    stored_decisions,
    write_rules,
)

PIDS_MAX = 200  # the bomb's hard bound: the kernel refuses its 201st process


def compile_forkbomb(out_dir: Path) -> Path:
    binary = out_dir / "forkbomb"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(WORKLOADS / "forkbomb.c")],
                   check=True, capture_output=True, text=True)
    return binary


def fork_rules(path: Path, scope: str, mode: str = "enforce", fast_path: bool = False, **policy) -> Path:
    """The packaged fork_storm rule's defaults, with a kill_tree policy confined to one cgroup
    (other tests' fork storms on the host must never be touched), acting on the first hot window
    (sustain 0 s: this bomb's root forks fast only until the pids limit stops it)."""
    table = {"action": "kill_tree", "mode": mode, "max_processes": 500, "only_cgroups": [scope],
             **({"fast_path": True} if fast_path else {}), **policy}
    return write_rules(path, packaged_rule("fork_storm", severity="critical", sustain="0s", policy=table))




def _bpftool(kind: str, ident: int) -> dict | None:
    out = subprocess.run(["bpftool", "-j", kind, "show", "id", str(ident)], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


def bpf_layout(pid: int) -> dict:
    """What a running agent holds in the kernel: its programs by name (each with the names of
    the maps it uses) and the ring buffers among its maps (read from /proc/<pid>/fdinfo)."""
    programs: dict[str, set[str]] = {}
    map_ids: set[int] = set()
    prog_ids, _ = owned_bpf_ids(pid)
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(line.split(":", 1) for line in entry.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if "map_id" in fields and "link_id" not in fields and "prog_id" not in fields:
            map_ids.add(int(fields["map_id"]))
    names = {}
    for map_id in map_ids:
        info = _bpftool("map", map_id)
        if info is not None:
            names[map_id] = (info.get("name", ""), info.get("type", ""))
    for prog_id in prog_ids:
        info = _bpftool("prog", prog_id)
        if info is not None:
            used = set()
            for map_id in info.get("map_ids", []):
                if map_id not in names:
                    found = _bpftool("map", map_id)
                    names[map_id] = (found.get("name", ""), found.get("type", "")) if found else ("", "")
                used.add(names[map_id][0])
            programs[info.get("name", "")] = used
    ringbufs = {map_id for map_id, (_, kind) in names.items() if kind == "ringbuf" and map_id in map_ids}
    return {"programs": programs, "ringbufs": ringbufs}


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
    with BombCgroups(PIDS_MAX) as cg:
        rules = fork_rules(tmp_path / "rules.toml", cg.rel, mode=mode, fast_path=fast_path, **policy)
        config = remediation_agent_config(tmp_path / "agent.toml", config_extra)
        agent = start_agent(tmp_path / "agent", "--config", str(config), "--rules", str(rules))
        try:
            agent.wait_ready()
            # Remediation starts (and loads the guard, when a policy asks for it) in the agent's loop.
            wait_for(lambda: "remediation: fork_storm: kill_tree" in agent.stderr(), 30, "remediation to start")
            held = owned_bpf_ids(agent.proc.pid)
            layout = bpf_layout(agent.proc.pid)
            counter = tmp_path / "counter"
            done = subprocess.run([str(bomb), "--counter", str(counter), "--cgroup", str(cg.pids), "--cgroup",
                                   str(cg.v2), "--seconds", str(seconds), *BOMB_ARGS],
                                  capture_output=True, text=True, timeout=seconds + 60)
            assert done.returncode == 0, done.stderr
            work = json.loads(done.stdout.strip().splitlines()[-1])
            peak = cg.peak()

            def settled() -> list[dict]:
                mine = [d for d in stored_decisions(agent.db_path) if d["subject"].get("pid") == work["root"]]
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
        assert_released(held)  # the guard included: nothing stays attached
        stats = agent.stats()
    return {"work": work, "peak": peak, "decisions": found, "left": left, "stats": stats, "layout": layout,
            "starts": spawn_times(counter), "root_forks": root_forks(counter),
            "alerts": [a for a in agent.alerts() if a["subject"]["pid"] == work["root"]], "db": agent.db_path}


def _only(result: dict) -> dict:
    assert len(result["decisions"]) == 1, result["decisions"]
    return result["decisions"][0]


def _report(name: str, result: dict) -> None:
    work = result["work"]
    print(f"\n[{name}] the bomb ran {work['spawned']} processes (pids.peak {result['peak']}, "
          f"pids.max {PIDS_MAX}) and lived {work['elapsed_s']}s")


GUARD_PROGRAMS = {"ks_tree_guard", "ks_tree_guard_parent"}
GUARD_MAPS = {"ks_tree_flags", "ks_tree_budget", "ks_tree_armed"}


def _check_layout(result: dict, guard: bool) -> None:
    """The fork-bomb guard is remediation's own object, loaded only when a policy asks for it."""
    programs, ringbufs = result["layout"]["programs"], result["layout"]["ringbufs"]
    # One ring buffer for every object, the guard's included (it reuses the core's).
    assert len(ringbufs) == 1, result["layout"]
    # The process sensor is the process sensor only: none of the guard's maps or programs.
    assert {"ks_fork", "ks_exit"} <= set(programs), programs
    assert not (programs["ks_fork"] | programs["ks_exit"]) & GUARD_MAPS, programs
    loaded = GUARD_PROGRAMS & set(programs)
    if not guard:
        assert not loaded, programs
        return
    [name] = loaded  # one of the two forms, by what the kernel offers
    assert GUARD_MAPS <= programs[name] and "ks_fork_state" not in programs[name], programs


def _guard_counters(result: dict) -> dict:
    """The guard's kernel counters, in the funnel report with remediation's own."""
    return {k: v for k, v in result["stats"]["sinks"]["remediation"].items() if k.startswith("tree_")}


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
    _check_layout(result, guard=False)
    assert _guard_counters(result) == {}  # no policy asked for the guard: never loaded
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
    _check_layout(result, guard=False)
    assert _guard_counters(result) == {}


def test_fast_path_stops_the_bomb_with_far_fewer_processes(tmp_path, forkbomb):
    user = run_storm(tmp_path / "user", forkbomb, "enforce")
    fast = run_storm(tmp_path / "fast", forkbomb, "enforce", fast_path=True)
    _report("enforce, user space only", user)
    _report("enforce, in-kernel fast path", fast)
    _check_enforced(user)
    decision = _check_enforced(fast)
    done = decision["result"]
    assert done["fast_path"] is True and done["fast_path_flagged"] >= 1
    _check_layout(user, guard=False)
    _check_layout(fast, guard=True)
    kernel = _guard_counters(fast)
    assert "tree_fork_killed" not in fast["stats"]["kernel"]["process"]  # not the sensor's any more
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


def _map_id(fd: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                  if ":" in line)
    return int(fields["map_id"])


def test_the_guard_is_its_own_object_on_the_core_maps_and_kills_only_what_is_flagged():
    """TreeGuard alone: it loads only on the core's shared maps, kills new children of a flagged
    process at fork (never of an unflagged one), forgets on unflag, and leaves nothing behind."""
    from ksift.config import AgentConfig
    from ksift.enrich.procfs import ProcFS
    from ksift.errors import BpfError
    from ksift.loader.libbpf import Libbpf
    from ksift.remediation.guard import TreeGuard
    from ksift.sensors.base import default_objects_dir
    from ksift.transport.core import CoreObject

    lib = Libbpf()
    with pytest.raises(BpfError, match="core BPF object"):
        TreeGuard(lib, default_objects_dir()).start({})  # never with a ring buffer of its own
    before = owned_bpf_ids(os.getpid())
    core = CoreObject(lib, default_objects_dir(), AgentConfig(), os.getpid())
    core.start()
    guard = TreeGuard(lib, default_objects_dir())
    # A parent that forks a short-lived child every 20 ms and says how many ran since it last said.
    script = ("import os, sys, time\nran = 0\nend = time.monotonic() + 30\n"
              "while time.monotonic() < end:\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n        os._exit(7)\n"
              "    _, status = os.waitpid(pid, 0)\n"
              "    ran += os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7\n"
              "    if os.path.exists(sys.argv[1]):\n        os.remove(sys.argv[1])\n        print(ran, flush=True)\n"
              "        ran = 0\n"
              "    time.sleep(0.02)\n")
    flag_file = Path(f"/tmp/ksift-guard-{uuid.uuid4().hex[:8]}")
    parent = subprocess.Popen(["python3", "-c", script, str(flag_file)], stdout=subprocess.PIPE, text=True)

    def ran() -> int:
        flag_file.touch()
        return int(parent.stdout.readline())

    try:
        guard.start(core.shared_fds)
        assert guard.obj.attached == [guard.program] and guard.program in ("ks_tree_guard", "ks_tree_guard_parent")
        held = owned_bpf_ids(os.getpid())
        # Its own maps; the shared ones are the core's very maps (no second ring buffer).
        for name in ("ks_events", "ks_transport", "ks_exec_path"):
            assert _map_id(guard.obj.map(name).fd) == _map_id(core.obj.map(name).fd), name
        assert _map_id(guard.obj.map("ks_counters").fd) != _map_id(core.obj.map("ks_counters").fd)
        time.sleep(0.3)
        assert ran() > 0 and guard.counters()["tree_fork_killed"] == 0  # nothing flagged: nothing killed
        if not guard.kills_children:
            pytest.skip("this kernel has no bpf_send_signal_task: the fallback kills the forking parent")
        start_ticks = ProcFS().stat(parent.pid).start_ticks
        assert guard.flag_tree(parent.pid, [(parent.pid, start_ticks)], False, 1000) == 1
        ran()  # what ran before the flag
        time.sleep(0.5)
        assert ran() == 0, "a child of the flagged process ran"
        killed = guard.counters()["tree_fork_killed"]
        assert killed >= 5
        guard.unflag_tree([parent.pid])
        time.sleep(0.3)
        assert ran() > 0  # unflagged: its children run again
        assert guard.counters()["tree_fork_killed"] <= killed + 1
    finally:
        parent.kill()
        parent.wait(timeout=10)
        flag_file.unlink(missing_ok=True)
        guard.close()
        core.close()
    assert guard.counters()["tree_fork_killed"] >= killed  # the last values outlive the object
    assert_released((held[0] - before[0], held[1] - before[1]))
