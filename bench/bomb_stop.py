#!/usr/bin/env python3
"""How fast remediation stops a fork bomb, and what a process outside the bomb sees meanwhile (issue 15).

A benchmark, not a test: it prints a table and one JSON object, and asserts
nothing. Run it as root from the repository (`make build` first):

    .venv/bin/python bench/bomb_stop.py                     # every shape, 3 runs of each arm
    .venv/bin/python bench/bomb_stop.py --shapes shell binary --runs 5 --out /tmp/bombs.json

Each run starts one bomb of tests/workloads/bombs.py (shell, binary =
tests/workloads/treebomb.c compiled with gcc, python, linear) in a session of
its own, inside a v1 pids cgroup with pids.max = --pids-max (300: the bound of
the issue) and a v2 cgroup of its own below this run's parent cgroup, under
one running agent (`ksift run`) holding the packaged fork_bomb rule and, by
arm:

    none   no policy: detection only; the bench kills the bomb after --bomb-seconds
    user   kill_tree in enforce mode, confined to the parent cgroup (only_cgroups)
    fast   the same with fast_path = true (the in-kernel guard)

Measured per run, all on CLOCK_MONOTONIC from the bomb's start (bombs.py
prints its clock just before it becomes the bomb):
- alert_s: the open fork_bomb alert's kernel timestamp (when the tree crossed);
- acted_s: when remediation began to act (the decision's acted_mono_ns);
- gone_s: when no member was left: the decision's emptied_mono_ns (the action's own look) and, independently,
  the first 0 of the pids cgroup's pids.current seen by a 1 ms poll in this process (`pids_zero_s`);
- the decision's killed, rounds, took_s;
- spawn latency of `true` (posix_spawn + waitpid) run back to back, every 2 ms, by a process outside the
  bomb (its own session and cgroup, default priority): median and max of the spawns that began while the
  bomb lived (from its start to pids.current 0, or to the kill for arm none), and of those in the second
  before the bomb (the baseline).
The in-kernel guard's counters (new members killed at fork, over budget, refused) come from the agent's
final report, per arm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ksift.remediation.decisions import DecisionStore  # noqa: E402
from ksift.rules.parse import default_rules_text  # noqa: E402
from ksift.timeparse import parse_timestamp  # noqa: E402

SHAPES = ("shell", "binary", "python", "linear")
ARMS = ("none", "user", "fast")
CGROUP2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")
PIDS_V1 = Path("/sys/fs/cgroup/pids")
BOMBS = REPO / "tests" / "workloads" / "bombs.py"
TREEBOMB = REPO / "tests" / "workloads" / "treebomb.c"
RUN_DEADLINE_S = 60.0  # a watchdog kills every bomb this long after its start, whatever happens

# The process outside the bomb: `true`, back to back every 2 ms, each spawn's start and duration.
SPAWNER = """
import json, os, sys, time
end = time.monotonic() + float(sys.argv[1])
out = []
while time.monotonic() < end:
    t0 = time.monotonic_ns()
    pid = os.posix_spawn("/bin/true", ["true"], os.environ)
    os.waitpid(pid, 0)
    out.append((t0, time.monotonic_ns() - t0))
    time.sleep(0.002)
print(json.dumps(out))
"""


# The bomb's launcher: a child subreaper (as systemd is for a session's orphans) that starts the bomb in a
# session of its own and reaps every orphan of it at once. This host's pid 1 reaps orphans late (seconds),
# and a zombie still holds its pid in pids.current: without this, "pids.current 0" would measure pid 1.
# The reaper is outside the bomb: another session, and this process's cgroup.
REAPER = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_rules(path: Path, arm: str, parent: str) -> None:
    rule = next(r for r in tomllib.loads(default_rules_text())["rule"] if r["name"] == "fork_bomb")
    if arm != "none":
        rule["policy"] = {"action": "kill_tree", "mode": "enforce", "max_processes": 1000, "rate_per_minute": 120,
                          "cooldown": "1s", "verify_for": "2s", "only_cgroups": [parent],
                          **({"fast_path": True} if arm == "fast" else {})}
    path.write_text("[[rule]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in rule.items()))


class Agent:
    def __init__(self, workdir: Path, arm: str, parent: str):
        workdir.mkdir(parents=True)
        self.workdir = workdir
        rules, config = workdir / "rules.toml", workdir / "agent.toml"
        write_rules(rules, arm, parent)
        config.write_text('[api]\nenabled = false\n\n[remediation]\nmax_actions_per_minute = 1000\n')
        self.db = workdir / "alerts.db"
        self.stdout = workdir / "stdout.jsonl"
        self.stderr = workdir / "stderr.log"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ksift", "run", "--json", "--db", str(self.db),
                                          "--stats", str(workdir / "stats.json"), "--api", "off", "--rules",
                                          str(rules), "--config", str(config)], stdout=out, stderr=err, cwd=REPO)
        deadline = time.monotonic() + 60
        while "watching the host" not in self.stderr.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the agent did not start:\n{self.stderr.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def alerts(self, cgroup: str) -> list[dict]:
        out = []
        for line in self.stdout.read_text().splitlines():
            if line.strip():
                alert = json.loads(line)
                if alert["rule"] == "fork_bomb" and alert["subject"].get("cgroup") == cgroup:
                    out.append(alert)
        return out

    def decisions(self, cgroup: str) -> list[dict]:
        if not self.db.exists():
            return []
        store = DecisionStore(self.db)
        try:
            return [d.as_dict() for d in store.list(limit=1000) if d.subject.get("cgroup") == cgroup]
        finally:
            store.close()

    def stop(self) -> dict:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        try:
            return json.loads((self.workdir / "stats.json").read_text())
        except (OSError, ValueError):
            return {}


class Cgroups:
    """The run's v1 pids cgroup (pids.max) and v2 cgroup (below the parent); emptied and removed at the end."""

    def __init__(self, parent: Path, name: str, pids_max: int):
        self.v2 = parent / name
        self.pids = PIDS_V1 / f"{parent.name}-{name}"
        self.pids.mkdir()
        (self.pids / "pids.max").write_text(str(pids_max))
        self.v2.mkdir()
        self.watchdog = threading.Timer(RUN_DEADLINE_S, self.kill)
        self.watchdog.daemon = True
        self.watchdog.start()

    @property
    def rel(self) -> str:
        return "/" + str(self.v2.relative_to(CGROUP2))

    def current(self) -> int:
        return int((self.pids / "pids.current").read_text())

    def procs(self) -> list[int]:
        out: list[int] = []
        for d in (self.pids, self.v2):
            try:
                out += [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except OSError:
                pass
        return out

    def kill(self) -> None:
        try:
            (self.v2 / "cgroup.kill").write_text("1")
        except OSError:
            pass
        deadline = time.monotonic() + 30
        while (left := self.procs()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            time.sleep(0.05)

    def remove(self) -> None:
        self.watchdog.cancel()
        self.kill()
        for d in (self.v2, self.pids):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def watch_zero(cg: Cgroups, out: dict, stop: threading.Event) -> None:
    """The first moment pids.current is 0 after it was not: no member of the bomb is left."""
    seen = False
    while not stop.is_set():
        n = cg.current()
        if n > 0:
            seen = True
        elif seen:
            out["zero_ns"] = time.monotonic_ns()
            return
        time.sleep(0.001)


def stats_of(samples: list[tuple[int, int]]) -> dict:
    durations = sorted(d / 1e6 for _, d in samples)
    if not durations:
        return {"n": 0}
    return {"n": len(durations), "median_ms": round(statistics.median(durations), 2), "max_ms": round(durations[-1], 2)}


def one_run(agent: Agent, arm: str, shape: str, parent: Path, pids_max: int, bomb_seconds: float,
            treebomb: Path) -> dict:
    cg = Cgroups(parent, f"run-{uuid.uuid4().hex[:6]}", pids_max)
    zero: dict = {}
    stop = threading.Event()
    spawner = None
    try:
        spawner = subprocess.Popen([sys.executable, "-c", SPAWNER, str(bomb_seconds + 6)], stdout=subprocess.PIPE,
                                   text=True, start_new_session=True)
        time.sleep(1.0)  # the baseline: a second of spawns before the bomb
        bomb = subprocess.Popen([sys.executable, "-c", REAPER, str(BOMBS), shape, "--cgroup", str(cg.pids),
                                 "--cgroup", str(cg.v2), "--treebomb", str(treebomb)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        started_ns = json.loads(bomb.stdout.readline())["started_ns"]
        wall_started = time.time() - (time.monotonic_ns() - started_ns) / 1e9
        watcher = threading.Thread(target=watch_zero, args=(cg, zero, stop), daemon=True)
        watcher.start()
        decision = None
        if arm == "none":
            time.sleep(bomb_seconds)
            killed_ns = time.monotonic_ns()
            cg.kill()
        else:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = [d for d in agent.decisions(cg.rel) if d["status"] not in ("pending", "approved")]
                if found:
                    decision = found[0]
                    break
                time.sleep(0.02)
            watcher.join(timeout=10)
            killed_ns = None
        stop.set()
        spawns = json.loads(spawner.communicate(timeout=bomb_seconds + 30)[0])
        bomb.stdout.close()
        bomb.wait(timeout=30)
        time.sleep(0.3)
        alerts = agent.alerts(cg.rel)
    finally:
        stop.set()
        if spawner is not None and spawner.poll() is None:
            spawner.kill()
        cg.remove()
    end_ns = killed_ns if arm == "none" else zero.get("zero_ns")
    opened = [a for a in alerts if a["status"] == "open"]
    row: dict = {"arm": arm, "shape": shape,
                 "alert_s": round(parse_timestamp(opened[0]["ts"]).timestamp() - wall_started, 3) if opened else None,
                 "pids_zero_s": round((zero["zero_ns"] - started_ns) / 1e9, 3) if "zero_ns" in zero else None,
                 "baseline": stats_of([s for s in spawns if started_ns - 1_000_000_000 <= s[0] < started_ns]),
                 "during": stats_of([s for s in spawns if end_ns and started_ns <= s[0] < end_ns])}
    if decision is not None:
        result = decision.get("result") or {}
        row.update(status=decision["status"], reason=decision.get("reason"), killed=result.get("killed"),
                   rounds=result.get("rounds"), passes=result.get("passes"), guards_s=result.get("guards_s"),
                   sweep_s=result.get("sweep_s"), took_s=result.get("took_s"), left=result.get("left"),
                   acted_s=round((result["acted_mono_ns"] - started_ns) / 1e9, 3) if "acted_mono_ns" in result
                   else None,
                   gone_s=round((result["emptied_mono_ns"] - started_ns) / 1e9, 3) if result.get("emptied_mono_ns")
                   else None)
    return row


def summary(rows: list[dict], key: str) -> str:
    values = sorted(r[key] for r in rows if isinstance(r.get(key), (int, float)))
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} ({values[0]:.3f}-{values[-1]:.3f})"


def spawn_summary(rows: list[dict], phase: str) -> str:
    medians = [r[phase]["median_ms"] for r in rows if r[phase].get("n")]
    maxima = [r[phase]["max_ms"] for r in rows if r[phase].get("n")]
    if not medians:
        return "-"
    return f"{statistics.median(medians):.1f} / {max(maxima):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--runs", type=int, default=3, help="runs of each shape in each arm")
    ap.add_argument("--pids-max", type=int, default=300)
    ap.add_argument("--bomb-seconds", type=float, default=2.0, help="how long a bomb lives in arm none")
    ap.add_argument("--out", type=Path, help="write the JSON result here too")
    ap.add_argument("--keep", action="store_true", help="keep the agents' output (the directory is printed)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the agent loads BPF and the bench makes cgroups")
    if not (PIDS_V1 / "cgroup.procs").exists():
        sys.exit(f"no cgroup v1 pids controller at {PIDS_V1}: a bomb could not be bounded")
    work = Path(tempfile.mkdtemp(prefix="ksift-bomb-bench-"))
    treebomb = work / "treebomb"
    subprocess.run([shutil.which("gcc") or "cc", "-O2", "-o", str(treebomb), str(TREEBOMB)], check=True)
    parent = CGROUP2 / f"ksift-bench-bombs-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    rows: list[dict] = []
    kernel: dict = {}
    try:
        for arm in args.arms:
            agent = Agent(work / arm, arm, "/" + str(parent.relative_to(CGROUP2)))
            try:
                for run in range(args.runs):
                    for shape in args.shapes:
                        row = one_run(agent, arm, shape, parent, args.pids_max, args.bomb_seconds, treebomb)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                        time.sleep(1.0)  # let the incident resolve before the next bomb
            finally:
                stats = agent.stop()
            kernel[arm] = {k: v for k, v in (stats.get("sinks", {}).get("remediation") or {}).items()
                           if k.startswith("tree_") or k.startswith("decisions_")}
    finally:
        for _ in range(50):
            try:
                parent.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        if args.keep:
            print(f"agents' output kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\npids.max {args.pids_max}, {args.runs} run(s) each; seconds from the bomb's start: median (min-max); "
          "spawn of `true` from outside: median of the runs' medians / max of their maxima, in ms")
    print(f"{'shape':8} {'arm':5} {'alert':22} {'acted':22} {'no member left':22} {'pids.current 0':22} "
          f"{'spawn before':14} {'spawn during':14}")
    for shape in args.shapes:
        for arm in args.arms:
            mine = [r for r in rows if r["shape"] == shape and r["arm"] == arm]
            print(f"{shape:8} {arm:5} {summary(mine, 'alert_s'):22} {summary(mine, 'acted_s'):22} "
                  f"{summary(mine, 'gone_s'):22} {summary(mine, 'pids_zero_s'):22} "
                  f"{spawn_summary(mine, 'baseline'):14} {spawn_summary(mine, 'during'):14}")
    result = {"pids_max": args.pids_max, "runs": rows, "remediation_counters": kernel}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
