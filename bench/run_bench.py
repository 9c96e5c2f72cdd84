#!/usr/bin/env python3
"""ksift benchmark: what the agent costs the host, every figure of issue 9 in one run.

A benchmark, not a test: it prints a table and writes a JSON result file; it
asserts nothing. Run it as root from the repository (`make bench`, or
`.venv/bin/python bench/run_bench.py [options]` after `make bench` built
build/bench/flood.bpf.o). Standard library, plus the repo's own ctypes loader
(ksift.loader) for the flood object. Every agent runs the packaged config and
rules as shipped (the API on, on a free port so that other agents on the host
do not collide with it).

What it measures (docs/benchmarks.md explains the method and the numbers):

1. Overhead on the workload, side by side with bpftrace. A tiny C program
   (bench/forkloop.c) does N fork + _exit + waitpid as fast as it can, in rounds
   WITHOUT anything, WITH a fresh `ksift run`, and WITH bpftrace counting forks
   per pid; the order of the three sides changes every round (all six orders in
   turn), so slow drift of a shared machine hits every side alike. Reported: the
   per-round (paired) ratios ksift/without and bpftrace/without, their median and
   range, and whether ksift is at or below bpftrace.

2. Footprint of one agent process through start-up, an idle phase, a storm
   paced to --storm-rate forks/s and a long idle (--idle-seconds, 60 s): its CPU
   share of one core (process CPU clock) per phase, VmHWM after each, and the
   in-kernel run time of EVERY program the agent holds (its program ids from
   /proc/<pid>/fdinfo; BPF_ENABLE_STATS on during the first idle phase and the
   storm), per fork and per program.

   A new CPU hog (the "hog" part, a fresh agent of its own, ~10 s): `python3
   -c 'while 1: pass'` runs until its cpu_hog alert, its stacks symbolized for
   the first time (kallsyms, the interpreter's ELF symbols); VmHWM before and
   after is the peak RSS with a hog symbolized. cpu_hog is eased to 50% for 2 s
   there, so a hog on a shared machine surely alerts; the rest are the packaged.

3. Detection latency: fork storm start to the fork_storm alert's arrival on
   the agent's --json stdout, a few tries on a fresh agent.

4. A flood of the same agent: bench/flood.bpf.c loaded with the agent's own
   ks_events and ks_transport maps, run with BPF_PROG_TEST_RUN at --flood-rate
   records/s for --flood-seconds; records offered, read by the agent, lost and
   counted, the agent's CPU and memory, and whether the alert of a small fork
   storm during the flood comes out marked degraded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bpfsys  # noqa: E402  (bench/: found next to this script)

REPO = Path(__file__).resolve().parent.parent
FORKLOOP_SRC = Path(__file__).resolve().parent / "forkloop.c"
DEFAULT_KSIFT = REPO / ".venv" / "bin" / "ksift"
FLOOD_OBJ = REPO / "build" / "bench" / "flood.bpf.o"  # built by `make bench` (Makefile: BPF_CFLAGS)
READY_MARK = "watching the host"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AGENT_CAP_S = 900  # --for given to every agent: it stops itself if this script dies
SETTLE_S = 0.5  # pause after an agent/bpftrace is ready (and before "without" rounds, for symmetry)
FOOTPRINT_SETTLE_S = 1.0
STORM_TAIL_S = 0.25  # let the agent hand the end of the storm over
POST_STORM_S = 2.0  # the storm's incident resolves (window + grace) before the long idle starts
HOG_TIMEOUT_S = 30.0  # the hog part waits this long for the hog's cpu_hog alert
HOG_TAIL_S = 2.0  # then this long: the alert waits for its stacks, and the RSS settles
HOG_CMD = ("/usr/bin/python3", "-c", "while 1: pass")
HOG_RULE = {"threshold": 50, "sustain": "2s"}  # cpu_hog as packaged wants 90% for 5 s: not sure on a shared VM
LATENCY_STORM_S = 1.5  # each latency try: a paced storm this long
LATENCY_TIMEOUT_S = 5.0
FLOOD_SIDE_AT_S = 3.0  # the small fork storm during the flood starts this far in...
FLOOD_SIDE_FORKS, FLOOD_SIDE_RATE = 900, 300  # ...and lasts 3 s: one fork_storm incident
FLOOD_TAIL_S = 2.0
BPFTRACE_PROG = "tracepoint:sched:sched_process_fork { @[pid] = count(); }"
BPFTRACE_READY = "Attaching"
TRACEFS = Path("/sys/kernel/tracing")
# Every program ksift loads is named ks_*: another process holding one is another agent or a test.
KSIFT_PROG_PREFIX = "ks_"
SIDES = ("off", "ksift", "bpftrace")
ORDERS = (("off", "ksift", "bpftrace"), ("bpftrace", "ksift", "off"), ("ksift", "off", "bpftrace"),
          ("bpftrace", "off", "ksift"), ("off", "bpftrace", "ksift"), ("ksift", "bpftrace", "off"))

# Issue 9's targets, and the "before" figures it quotes (docs/benchmarks.md, 2026-11-25).
TARGETS = {
    "idle_cpu_pct": (0.3, 0.94),
    "storm_cpu_pct": (0.5, 0.97),
    "vm_hwm_mib": (45.0, 77.0),
    "bpf_ns_per_fork": (2500.0, 6108.0),
    "latency_s": (1.5, None),
    "flood_rate": (1_000_000, None),
}


class BenchError(Exception):
    pass


# -- small helpers -------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, spec=".1f", none="-"):
    return none if value is None else format(value, spec)


def read_text(path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def host_cpu_times() -> dict[str, int]:
    """Aggregate jiffies from /proc/stat's first line (steal shows a noisy VM host), and
    `processes`: forks (and clones) on the host since boot."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    lines = read_text("/proc/stat").splitlines()
    out = dict(zip(names, map(int, lines[0].split()[1:1 + len(names)])))
    out["forks"] = next((int(line.split()[1]) for line in lines if line.startswith("processes ")), 0)
    return out


def host_cpu_share(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    delta = {k: after[k] - before[k] for k in before}
    forks = delta.pop("forks", 0)
    total = sum(delta.values()) or 1
    busy = total - delta["idle"] - delta["iowait"]
    return {"busy_pct": round(100 * busy / total, 2), "steal_pct": round(100 * delta["steal"] / total, 2),
            "forks": forks}


def machine_info() -> dict:
    cpuinfo = read_text("/proc/cpuinfo") or ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), None)
    mem_kb = next((int(line.split()[1]) for line in (read_text("/proc/meminfo") or "").splitlines()
                   if line.startswith("MemTotal:")), None)

    def detect(flag):
        try:
            found = subprocess.run(["systemd-detect-virt", flag], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return None if found in ("", "none") else found

    vm = detect("--vm")
    if vm and "firecracker" in (read_text("/proc/cmdline") or ""):
        vm += " (firecracker)"
    return {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_total_mib": mem_kb // 1024 if mem_kb else None,
        "vm": vm,
        "container": detect("--container"),
        "python": platform.python_version(),
        "loadavg_at_start": (read_text("/proc/loadavg") or "").split()[:3],
    }


def git_info() -> dict:
    """The commit measured, and which agent sources differ from it (others may be editing the tree)."""
    def git(*argv):
        try:
            return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True,
                                  timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "src", "bpf").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "subject": git("log", "-1", "--format=%s")[:100],
            "uncommitted_agent_files": dirty}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the workload ----------------------------------------------------------------

def build_forkloop(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (cc or gcc) on PATH; install gcc")
    exe = workdir / "forkloop"
    result = subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(FORKLOOP_SRC)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"compiling {FORKLOOP_SRC} failed:\n{result.stderr}")
    return exe


def run_forkloop(exe: Path, n: int, rate: int = 0) -> dict:
    result = subprocess.run([str(exe), str(n), str(rate)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"forkloop {n} {rate} failed (exit {result.returncode}): {result.stderr.strip()}")
    return json.loads(result.stdout)


def start_forkloop(exe: Path, n: int, rate: int = 0) -> subprocess.Popen:
    return subprocess.Popen([str(exe), str(n), str(rate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish_forkloop(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"forkloop failed (exit {proc.returncode}): {err.strip()}")
    return json.loads(out)


# -- the agent under test ----------------------------------------------------------

class ProcSample:
    """One look at a process: CPU (ticks and ns), memory, context switches."""

    def __init__(self, pid: int):
        self.wall = time.monotonic()
        stat = read_text(f"/proc/{pid}/stat")
        if stat is None:
            raise BenchError(f"agent process {pid} is gone")
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
        self.minflt, self.majflt = int(fields[7]), int(fields[9])
        self.utime_s, self.stime_s = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
        try:  # the process CPU clock: sum_exec_runtime of the whole thread group, in ns
            self.cpu_ns = time.clock_gettime_ns(((~pid) << 3) | 2)
        except OSError:
            self.cpu_ns = None
        status = {}
        for line in (read_text(f"/proc/{pid}/status") or "").splitlines():
            key, _, value = line.partition(":")
            status[key] = value.split()[0] if value.split() else ""
        self.vm_hwm_kib = int(status.get("VmHWM", 0))
        self.vm_rss_kib = int(status.get("VmRSS", 0))
        self.rss_anon_kib = int(status.get("RssAnon", 0))
        self.rss_file_kib = int(status.get("RssFile", 0))
        self.threads = int(status.get("Threads", 0))
        self.vol_cs = int(status.get("voluntary_ctxt_switches", 0))
        self.nonvol_cs = int(status.get("nonvoluntary_ctxt_switches", 0))

    def memory(self) -> dict:
        return {"vm_rss_kib": self.vm_rss_kib, "vm_hwm_kib": self.vm_hwm_kib, "rss_anon_kib": self.rss_anon_kib,
                "rss_file_kib": self.rss_file_kib, "threads": self.threads}


def core_pct(delta: dict) -> float:
    """Share of one core: from the ns-precise process CPU clock when readable, else from the ticks."""
    clock = delta.get("cpu_clock_pct_of_core")
    return clock if clock is not None else delta["cpu_pct_of_core"]


def cpu_delta(a: ProcSample, b: ProcSample) -> dict:
    wall = b.wall - a.wall
    utime, stime = b.utime_s - a.utime_s, b.stime_s - a.stime_s
    clock_s = (b.cpu_ns - a.cpu_ns) / 1e9 if a.cpu_ns is not None and b.cpu_ns is not None else None
    wakeups = b.vol_cs - a.vol_cs
    return {
        "wall_s": round(wall, 3),
        "utime_s": round(utime, 3),
        "stime_s": round(stime, 3),
        "cpu_s": round(utime + stime, 3),
        "cpu_pct_of_core": round(100 * (utime + stime) / wall, 3),
        "cpu_clock_s": None if clock_s is None else round(clock_s, 4),
        "cpu_clock_pct_of_core": None if clock_s is None else round(100 * clock_s / wall, 3),
        "voluntary_switches": wakeups,
        "involuntary_switches": b.nonvol_cs - a.nonvol_cs,
        "wakeups_per_s": round(wakeups / wall, 1),
        "cpu_us_per_wakeup": (round(1e6 * clock_s / wakeups, 1) if clock_s is not None and wakeups else None),
        "minor_faults": b.minflt - a.minflt,
        "vm_rss_kib_start": a.vm_rss_kib,
        "vm_rss_kib_end": b.vm_rss_kib,
        "vm_hwm_kib": b.vm_hwm_kib,
        "threads": b.threads,
    }


class Agent:
    """`ksift run --json` as a subprocess: started, waited for, sampled, stopped with SIGTERM.

    Its stdout (one alert per line) is read by a thread that stamps each line with
    the monotonic time it arrived, for the detection latency."""

    def __init__(self, ksift: Path, workdir: Path, tag: str, extra_args: tuple[str, ...] = ()):
        self.ksift = ksift
        self.tag = tag
        self.extra_args = tuple(extra_args)
        if "--api" not in self.extra_args:  # the API stays on, as shipped, on a port nobody else holds
            self.extra_args += ("--api", f"127.0.0.1:{free_port()}")
        self.api = self.extra_args[self.extra_args.index("--api") + 1]
        if self.api == "off":
            self.api = None  # --agent-api off: no funnel reads between phases
        self.db = workdir / f"{tag}.db"
        self.stats_path = workdir / f"{tag}.stats.json"
        self.out_path = workdir / f"{tag}.stdout"
        self.err_path = workdir / f"{tag}.stderr"
        self.proc: subprocess.Popen | None = None
        self.startup: dict = {}
        self.exit_code: int | None = None
        self.lines: list[tuple[float, str]] = []
        self._arrived = threading.Condition()
        self._pump: threading.Thread | None = None

    def start(self, timeout_s: float = 60.0) -> "Agent":
        cmd = [str(self.ksift), "run", "--json", "--for", str(AGENT_CAP_S),
               "--db", str(self.db), "--stats", str(self.stats_path), *self.extra_args]
        t0 = time.monotonic()
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                         cwd=self.db.parent, text=True, bufsize=1)
        self._pump = threading.Thread(target=self._read_stdout, name=f"stdout-{self.tag}", daemon=True)
        self._pump.start()
        deadline = t0 + timeout_s
        while READY_MARK not in (read_text(self.err_path) or ""):
            if self.proc.poll() is not None:
                raise BenchError(f"ksift exited with {self.proc.returncode} before it was ready:\n"
                                 f"{self.stderr_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"ksift not ready after {timeout_s:.0f}s:\n{self.stderr_tail()}")
            time.sleep(0.01)
        ready = ProcSample(self.proc.pid)
        self.startup = {"ready_after_s": round(ready.wall - t0, 3),
                        "cpu_s_to_ready": round(ready.utime_s + ready.stime_s, 3),
                        "vm_hwm_kib_at_ready": ready.vm_hwm_kib, "vm_rss_kib_at_ready": ready.vm_rss_kib}
        return self

    def _read_stdout(self) -> None:
        with open(self.out_path, "w", encoding="utf-8") as copy:
            for line in self.proc.stdout:
                now = time.monotonic()
                with self._arrived:
                    self.lines.append((now, line))
                    self._arrived.notify_all()
                copy.write(line)

    def wait_alert(self, match, timeout_s: float) -> tuple[float, dict] | None:
        """The first alert line for which match(alert) is true, with its arrival time; None on timeout."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._arrived:
            while True:
                for t, alert in self._parsed(self.lines[seen:]):
                    if match(alert):
                        return t, alert
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    return None
                self._arrived.wait(left)

    @staticmethod
    def _parsed(lines):
        for t, line in lines:
            try:
                alert = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(alert, dict):
                yield t, alert

    def sample(self) -> ProcSample:
        assert self.proc is not None
        return ProcSample(self.proc.pid)

    def funnel(self) -> dict | None:
        """The funnel report from the agent's API (GET /api/v1/funnel; counters read at that moment).
        It costs the agent CPU: ask between measured phases, never inside one."""
        if self.api is None:
            return None
        try:
            # The token the agent made next to its store at start (root only, docs/api.md).
            token = (self.db.parent / "api.token").read_text().strip()
            request = urllib.request.Request(f"http://{self.api}/api/v1/funnel",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                return json.load(reply)
        except (OSError, ValueError):
            return None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.exit_code is not None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
            log(f"ksift ({self.tag}) ignored SIGTERM for {timeout_s:.0f}s and was killed")
        if self._pump is not None:
            self._pump.join(5)
        if self.exit_code != 0:
            log(f"ksift ({self.tag}) exited with {self.exit_code}:\n{self.stderr_tail()}")

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stderr_tail(self, lines: int = 15) -> str:
        return "\n".join((read_text(self.err_path) or "").splitlines()[-lines:])

    def stats(self) -> dict:
        text = read_text(self.stats_path)
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {}

    def alert_list(self) -> list[tuple[float, dict]]:
        with self._arrived:
            return list(self._parsed(list(self.lines)))

    def alerts(self) -> dict:
        """Alerts printed on stdout (one JSON object per line), counted by rule and status."""
        counts: dict[str, int] = {"total": 0}
        for _, alert in self.alert_list():
            counts["total"] += 1
            key = f"{alert.get('rule')}/{alert.get('status')}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def warnings(self) -> list[str]:
        return [line for line in (read_text(self.err_path) or "").splitlines()
                if " WARNING " in line or " ERROR " in line]


def fork_storm_of(pid: int, status: str = "open"):
    """Matches the fork_storm alert of one storming parent."""
    def match(alert: dict) -> bool:
        return (alert.get("rule") == "fork_storm" and alert.get("status") == status
                and (alert.get("subject") or {}).get("pid") == pid)
    return match


def funnel_of(stats: dict) -> dict:
    """The funnel counters that tell the story: seen in the kernel -> emitted -> read -> alerts."""
    process = stats.get("kernel", {}).get("process", {})
    transport = stats.get("transport", {})
    rules = stats.get("rules", {})
    out = {
        "fork_seen": process.get("fork_seen"),
        "fork_aggregated": process.get("fork_aggregated"),
        "exit_seen": process.get("exit_seen"),
        "kernel_emitted": transport.get("kernel_emitted"),
        "kernel_dropped": transport.get("kernel_dropped"),
        "kernel_wakeups": transport.get("kernel_wakeups"),
        "records_read": transport.get("records_read"),
        "synthetic": transport.get("synthetic"),
        "drains": transport.get("drains"),
        "crossings": rules.get("crossings"),
        "folded": rules.get("folded"),
        "incidents_opened": rules.get("opened"),
        "alerts_open": stats.get("alerts", {}).get("open"),
        "alerts_resolved": stats.get("alerts", {}).get("resolved"),
        "dropped_total": stats.get("dropped_total"),
        "ticks": stats.get("ticks"),
    }
    seen, emitted = out["fork_seen"], out["kernel_emitted"]
    alerts = (out["alerts_open"] or 0) + (out["alerts_resolved"] or 0)
    out["forks_per_record"] = round(seen / emitted, 1) if seen and emitted else None
    out["forks_per_alert"] = round(seen / alerts, 1) if seen and alerts else None
    return out


# -- BPF programs: ids, names, run-time statistics -------------------------------------

class BpfRunStats:
    """Holds BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) open; reads per-program counters by id."""

    def __init__(self):
        self._stats = bpfsys.RunTimeStats()
        self.error: str | None = None

    def __enter__(self) -> "BpfRunStats":
        self._stats.__enter__()
        self.error = self._stats.error
        return self

    def __exit__(self, *exc) -> None:
        self._stats.__exit__()

    def snapshot(self, prog_ids: set[int]) -> dict[int, dict]:
        """name / run_cnt / run_time_ns of the given programs, by id (gone ones left out)."""
        out = {}
        for prog_id in prog_ids:
            info = bpfsys.prog_info(prog_id)
            if info is not None:
                out[prog_id] = info
        return out


def agent_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds, from /proc/<pid>/fdinfo."""
    return bpfsys.held_ids(pid, "prog")


def foreign_ksift_programs(own: set[int] = frozenset()) -> list[dict]:
    """ksift programs loaded by someone else (another agent, a test): they tax every side."""
    out = []
    for prog_id in bpfsys.all_prog_ids():
        if prog_id in own:
            continue
        info = bpfsys.prog_info(prog_id)
        if info is not None and info["name"].startswith(KSIFT_PROG_PREFIX):
            out.append({"id": prog_id, "name": info["name"]})
    return out


def program_deltas(before: dict[int, dict], after: dict[int, dict]) -> dict[str, dict]:
    """run_cnt / run_time_ns per program between two snapshots, keyed "name#id"."""
    out = {}
    for prog_id, b in after.items():
        a = before.get(prog_id)
        if a is None:
            continue
        cnt, ns = b["run_cnt"] - a["run_cnt"], b["run_time_ns"] - a["run_time_ns"]
        out[f"{b['name']}#{prog_id}"] = {"name": b["name"], "id": prog_id, "run_cnt": cnt, "run_time_ns": ns}
    return out


# -- bpftrace, the reference -------------------------------------------------------------

def ensure_tracefs() -> bool:
    """bpftrace's tracepoint: probes read tracefs; mount it if this host has not. True if we did."""
    if (TRACEFS / "events").is_dir():
        return False
    result = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"tracefs is not mounted and mounting it failed: {result.stderr.strip()}")
    log(f"mounted tracefs on {TRACEFS} for bpftrace (unmounted at the end)")
    return True


class Bpftrace:
    """`bpftrace -e PROG` as a subprocess: started, waited for until attached, stopped with SIGINT."""

    def __init__(self, exe: str, workdir: Path, tag: str):
        self.exe, self.tag = exe, tag
        self.out_path, self.err_path = workdir / f"{tag}.stdout", workdir / f"{tag}.stderr"
        self.proc: subprocess.Popen | None = None
        self.startup_s = None

    def start(self, timeout_s: float = 60.0) -> "Bpftrace":
        t0 = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([self.exe, "-e", BPFTRACE_PROG], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err)
        while BPFTRACE_READY not in (read_text(self.out_path) or ""):
            if self.proc.poll() is not None:
                raise BenchError(f"bpftrace exited with {self.proc.returncode}:\n{read_text(self.err_path)}")
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise BenchError(f"bpftrace did not attach within {timeout_s:.0f}s")
            time.sleep(0.01)
        self.startup_s = round(time.monotonic() - t0, 3)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # bpftrace prints its map and detaches
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Bpftrace":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- 1. overhead: without / ksift / bpftrace, interleaved --------------------------------

def paired(rounds: list[dict], num: str, den: str, key: str = "ns_per_fork") -> dict | None:
    by_round: dict[int, dict] = {}
    for e in rounds:
        by_round.setdefault(e["round"], {})[e["side"]] = e[key]
    values = [r[num] / r[den] for r in by_round.values() if num in r and den in r]
    if not values:
        return None
    return {"median": round(median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "n": len(values), "values": [round(v, 4) for v in values]}


def bench_overhead(args, forkloop: Path, workdir: Path) -> dict:
    bpftrace = shutil.which("bpftrace")
    sides = [s for s in SIDES if s != "bpftrace" or bpftrace]
    if not bpftrace:
        log("WARNING: bpftrace not found (`make bench` installs it): the bpftrace side is skipped")
    log(f"overhead: warm-up, {min(args.forks, 2000)} forks without anything")
    run_forkloop(forkloop, min(args.forks, 2000))
    rounds = []
    for r in range(args.rounds):
        order = [s for s in ORDERS[r % len(ORDERS)] if s in sides]
        for side in order:
            entry = {"round": r + 1, "side": side}
            if side == "off":
                foreign = foreign_ksift_programs()
                time.sleep(SETTLE_S)
                host0 = host_cpu_times()
                loop = run_forkloop(forkloop, args.forks)
            elif side == "ksift":
                with Agent(args.ksift, workdir, f"overhead-{r + 1}").start() as agent:
                    foreign = foreign_ksift_programs(agent_prog_ids(agent.proc.pid))
                    time.sleep(SETTLE_S)
                    host0 = host_cpu_times()
                    a = agent.sample()
                    loop = run_forkloop(forkloop, args.forks)
                    b = agent.sample()
                    agent.stop()
                    entry.update(agent_during_loop=cpu_delta(a, b), agent_startup=agent.startup,
                                 alerts=agent.alerts(), agent_exit=agent.exit_code)
            else:
                with Bpftrace(bpftrace, workdir, f"bpftrace-{r + 1}").start() as bt:
                    foreign = foreign_ksift_programs()
                    time.sleep(SETTLE_S)
                    host0 = host_cpu_times()
                    loop = run_forkloop(forkloop, args.forks)
                    bt.stop()
                    entry.update(bpftrace_startup_s=bt.startup_s, bpftrace_exit=bt.proc.returncode)
            entry.update(loop)
            entry["cpu_ns_per_fork"] = round(1e9 * (loop["cpu_self_s"] + loop["cpu_children_s"]) / loop["n"], 1)
            entry["host"] = host_cpu_share(host0, host_cpu_times())
            entry["foreign_ksift_programs"] = len(foreign)
            rounds.append(entry)
            log(f"round {r + 1}/{args.rounds} {side:>8}: {loop['ns_per_fork']:,.0f} ns/fork "
                f"(host busy {entry['host']['busy_pct']:.0f}%, steal {entry['host']['steal_pct']:.1f}%)"
                + (f" [{len(foreign)} foreign ksift programs loaded]" if foreign else ""))

    def side(name, key="ns_per_fork"):
        return [e[key] for e in rounds if e["side"] == name]

    summary = {"forks_per_round": args.forks, "rounds": args.rounds, "sides": sides}
    for s in sides:
        summary[f"median_ns_per_fork_{s}"] = median(side(s))
        summary[f"median_cpu_ns_per_fork_{s}"] = median(side(s, "cpu_ns_per_fork"))
        summary[f"host_busy_pct_median_{s}"] = median([e["host"]["busy_pct"] for e in rounds if e["side"] == s])
        summary[f"spread_{s}_pct"] = round(100 * (max(side(s)) - min(side(s))) / median(side(s)), 1)
    summary["paired_ksift_off"] = paired(rounds, "ksift", "off")
    summary["paired_bpftrace_off"] = paired(rounds, "bpftrace", "off")
    summary["paired_ksift_bpftrace"] = paired(rounds, "ksift", "bpftrace")
    summary["paired_cpu_ksift_off"] = paired(rounds, "ksift", "off", "cpu_ns_per_fork")
    summary["paired_cpu_bpftrace_off"] = paired(rounds, "bpftrace", "off", "cpu_ns_per_fork")
    ks, bt = summary["paired_ksift_off"], summary["paired_bpftrace_off"]
    summary["ksift_at_or_below_bpftrace"] = (ks["median"] <= bt["median"]) if ks and bt else None
    summary["steal_pct_median"] = median([e["host"]["steal_pct"] for e in rounds])
    summary["rounds_with_foreign_ksift"] = sorted({e["round"] for e in rounds if e["foreign_ksift_programs"]})
    summary["alerts_per_ksift_round"] = median([e["alerts"]["total"] for e in rounds if e["side"] == "ksift"])
    summary["bpftrace_startup_s"] = median(side("bpftrace", "bpftrace_startup_s")) if bpftrace else None
    result = {"summary": summary, "rounds": rounds}
    if bpftrace:
        result["bpftrace_in_kernel"] = bpftrace_in_kernel(bpftrace, forkloop, workdir, args.forks)
    return result


def bpftrace_in_kernel(exe: str, forkloop: Path, workdir: Path, forks: int) -> dict:
    """bpftrace's own program run time per fork (BPF_ENABLE_STATS), on one extra loop."""
    n = min(forks, 10_000)
    with Bpftrace(exe, workdir, "bpftrace-stats").start() as bt:
        time.sleep(SETTLE_S)  # first: bpftrace prints "Attaching" before its program is loaded
        ids = agent_prog_ids(bt.proc.pid)
        if not ids:
            return {"error": "bpftrace holds no BPF program (not attached?)"}
        with BpfRunStats() as stats:
            if stats.error:
                return {"error": stats.error}
            p0 = stats.snapshot(ids)
            loop = run_forkloop(forkloop, n)
            p1 = stats.snapshot(ids)
    progs = program_deltas(p0, p1)
    total = sum(p["run_time_ns"] for p in progs.values())
    return {"forks": n, "programs": progs, "ns_per_fork": round(total / n, 1),
            "ns_per_fork_loop": loop["ns_per_fork"]}


# -- 2. footprint of one agent: start-up, idle, storm, long idle ---------------------------

def counter_delta(a: dict | None, b: dict | None, prefix: str = "") -> dict[str, int]:
    """The numeric leaves of two funnel reports that changed, as "path.to.counter": b - a."""
    out: dict[str, int] = {}
    for key, value in (b or {}).items():
        before = (a or {}).get(key)
        if isinstance(value, dict):
            out.update(counter_delta(before if isinstance(before, dict) else {}, value, f"{prefix}{key}."))
        elif isinstance(value, int) and not isinstance(value, bool):
            d = value - (before if isinstance(before, int) else 0)
            if d:
                out[f"{prefix}{key}"] = d
    return out


def what_happened(agent: Agent, a: ProcSample, b: ProcSample, f0: dict | None, f1: dict | None) -> dict:
    """What the agent handled in a phase: alerts that arrived, counters that moved (crossings, drains...)."""
    arrived = [f"{x.get('rule')}/{x.get('status')} {(x.get('subject') or {}).get('comm')}"
               for t, x in agent.alert_list() if a.wall <= t <= b.wall]
    moved = counter_delta(f0, f1)
    return {"alerts": arrived, "counters": moved,
            "crossings": {k: v for k, v in moved.items() if k.endswith("crossings") and k.startswith("kernel.")}}


def sleep_sampled(agent: Agent, seconds: float) -> list[float]:
    """Sleep `seconds`, sampling the agent's CPU clock every second: its share of a core per 1-s slice.

    The median slice is the agent's steady cost, which a one-off burst (an alert about
    other work on the host, a symbolization) does not move; the phase's mean includes it."""
    shares, end = [], time.monotonic() + seconds
    prev = agent.sample()
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        cur = agent.sample()
        if cur.cpu_ns is not None and prev.cpu_ns is not None and cur.wall > prev.wall:
            shares.append(round(100 * (cur.cpu_ns - prev.cpu_ns) / 1e9 / (cur.wall - prev.wall), 3))
        prev = cur
    return shares


class Phase:
    """One measured phase of an agent: host and agent samples around it, the funnel read just outside it."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def __enter__(self) -> "Phase":
        self.f0 = self.agent.funnel()
        self.host0, self.a = host_cpu_times(), self.agent.sample()
        return self

    def __exit__(self, *exc) -> None:
        self.b, self.host = self.agent.sample(), host_cpu_share(self.host0, host_cpu_times())
        self.f1 = self.agent.funnel()

    def result(self, slices: list[float] | None = None, **extra) -> dict:
        out = {"agent": cpu_delta(self.a, self.b), "host": self.host,
               "happened": what_happened(self.agent, self.a, self.b, self.f0, self.f1), **extra}
        if slices:
            out["slices_pct"] = slices
            out["slice_median_pct"] = round(median(slices), 3)
        return out


def bench_footprint(args, forkloop: Path, workdir: Path) -> dict:
    out: dict = {"phases": {}, "memory": {}}
    log("footprint: one agent through start-up, idle, storm and a long idle")
    with Agent(args.ksift, workdir, "footprint", ("--api", "off") if args.agent_api == "off" else ()).start() as agent:
        pid = agent.proc.pid
        out["startup"] = agent.startup
        out["memory"]["after_startup"] = agent.sample().memory()
        time.sleep(FOOTPRINT_SETTLE_S)
        own = agent_prog_ids(pid)
        out["agent_programs"] = len(own)
        out["foreign_ksift_programs"] = foreign_ksift_programs(own)
        with BpfRunStats() as bpf:
            out["bpf_stats_error"] = bpf.error
            # idle, before the storm: also the background rate of every program (sampler, other work)
            log(f"  idle {args.phase_seconds:g}s (BPF run-time statistics on)")
            p0 = bpf.snapshot(own)
            with Phase(agent) as idle:
                slices = sleep_sampled(agent, args.phase_seconds)
            p1 = bpf.snapshot(own)
            out["phases"]["idle"] = idle.result(slices)
            # storm
            n = max(1, int(args.storm_rate * args.phase_seconds))
            log(f"  storm: {n:,} forks at {args.storm_rate:,}/s")
            with Phase(agent) as storm:
                t0 = time.monotonic()
                proc = start_forkloop(forkloop, n, args.storm_rate)
                loop = finish_forkloop(proc)
                time.sleep(STORM_TAIL_S)
            p2 = bpf.snapshot(own)
        hit = agent.wait_alert(fork_storm_of(proc.pid), 0)
        out["phases"]["storm"] = storm.result(forkloop=loop,
                                              alert_latency_s=round(hit[0] - t0, 3) if hit else None)
        out["memory"]["after_storm"] = storm.b.memory()
        out["bpf"] = bpf_per_fork(program_deltas(p0, p1), program_deltas(p1, p2),
                                  out["phases"]["idle"]["agent"]["wall_s"], out["phases"]["storm"]["agent"]["wall_s"],
                                  loop["n"], storm.host["forks"])
        # the long idle (the storm's incident resolves first)
        time.sleep(POST_STORM_S)
        log(f"  long idle {args.idle_seconds:g}s")
        with Phase(agent) as long_idle:
            slices = sleep_sampled(agent, args.idle_seconds)
        out["phases"]["long_idle"] = long_idle.result(slices)
        out["memory"]["after_long_idle"] = long_idle.b.memory()
        agent.stop()
        out["funnel"] = funnel_of(agent.stats())
        out["alerts"] = agent.alerts()
        out["agent_exit"] = agent.exit_code
        out["agent_warnings"] = agent.warnings()[-20:]
    out["vm_hwm_kib_max"] = max(m["vm_hwm_kib"] for m in out["memory"].values())
    for name, ph in out["phases"].items():
        log(f"  {name}: {core_pct(ph['agent']):.3f}% of a core, host busy {ph['host']['busy_pct']:.0f}%, "
            f"crossings {ph['happened']['crossings'] or 'none'}")
    log(f"  VmHWM {out['vm_hwm_kib_max'] / 1024:.1f} MiB; BPF {fmt(out['bpf'].get('ns_per_fork'), ',.0f')} ns/fork")
    return out


def hog_rules(path: Path) -> Path:
    """The packaged rules, cpu_hog eased to HOG_RULE: what the hog part's agent runs."""
    import tomllib

    from ksift.rules.parse import default_rules_text

    with open(path, "w", encoding="utf-8") as fh:
        for rule in tomllib.loads(default_rules_text())["rule"]:
            if rule["name"] == "cpu_hog":
                rule.update(HOG_RULE)
            fh.write("[[rule]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in rule.items()) + "\n")
    return path


def bench_hog(args, workdir: Path) -> dict:
    """Peak RSS with a new CPU hog symbolized: a fresh agent, VmHWM once it settled, then a new hog until
    its cpu_hog alert (its stacks symbolized: the first time for this binary) and HOG_TAIL_S more."""
    log(f"hog: {' '.join(HOG_CMD)} until its cpu_hog alert (up to {HOG_TIMEOUT_S:g}s) on a fresh agent")
    with Agent(args.ksift, workdir, "hog", ("--rules", str(hog_rules(workdir / "hog.rules.toml")))).start() as agent:
        time.sleep(FOOTPRINT_SETTLE_S)
        before = agent.sample().memory()
        with Phase(agent) as phase:
            t0 = time.monotonic()
            # nice -10: on a shared machine the hog must really get a core for the rule's sustain.
            hog = subprocess.Popen(HOG_CMD, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.nice(-10))
            try:
                hit = agent.wait_alert(lambda a: a.get("rule") == "cpu_hog" and a.get("status") == "open"
                                       and a.get("subject", {}).get("pid") == hog.pid, HOG_TIMEOUT_S)
                hog_cpu = ProcSample(hog.pid)  # how much of a core it got
                time.sleep(HOG_TAIL_S if hit else 0)
            finally:
                hog.kill()
                hog.wait()
        agent.stop()
    stack = (hit[1].get("stack") or []) if hit else []
    top = stack[0] if stack else {}
    out = {**phase.result(alert_latency_s=round(hit[0] - t0, 3) if hit else None),
           "alerted": hit is not None, "stacks": len(stack),
           "top_frame": ((top.get("user") or top.get("kernel") or [None])[0]) if top else None,
           "hog_cpu_pct_of_core": round(100 * (hog_cpu.utime_s + hog_cpu.stime_s) / (hog_cpu.wall - t0), 1),
           "memory_before": before, "memory_after": phase.b.memory()}
    log(f"  alert {'after ' + fmt(out['alert_latency_s'], '.1f') + ' s' if hit else 'none'}, top frame "
        f"{out['top_frame']}; VmHWM {before['vm_hwm_kib'] / 1024:.1f} -> "
        f"{out['memory_after']['vm_hwm_kib'] / 1024:.1f} MiB")
    return out


def bpf_per_fork(idle: dict, storm: dict, idle_s: float, storm_s: float, forks: int, host_forks: int) -> dict:
    """In-kernel time per fork over the storm: every program of the agent, and its idle background."""
    programs = {}
    for key, s in storm.items():
        i = idle.get(key, {"run_cnt": 0, "run_time_ns": 0})
        programs[key] = {
            "name": s["name"], "id": s["id"], "run_cnt": s["run_cnt"], "run_time_ns": s["run_time_ns"],
            "runs_per_fork": round(s["run_cnt"] / forks, 3),
            "ns_per_run": round(s["run_time_ns"] / s["run_cnt"], 1) if s["run_cnt"] else None,
            "ns_per_fork": round(s["run_time_ns"] / forks, 1),
            "idle_runs_per_s": round(i["run_cnt"] / idle_s, 1) if idle_s else None,
            "idle_ns_per_s": round(i["run_time_ns"] / idle_s, 1) if idle_s else None,
        }
    total = sum(p["run_time_ns"] for p in programs.values())
    background = sum((p["idle_ns_per_s"] or 0) * storm_s for p in programs.values())
    return {"forks": forks, "host_forks": host_forks, "programs": programs, "total_ns": total,
            "ns_per_fork": round(total / forks, 1) if forks else None,
            "ns_per_fork_net_of_idle": round((total - background) / forks, 1) if forks else None,
            "ns_per_host_fork": round(total / host_forks, 1) if host_forks else None}


# -- 3 and 4. detection latency, then the flood, on one fresh agent ---------------------------

def ensure_flood_obj(path: Path) -> Path:
    """The flood object, built by the Makefile (same clang flags as every ksift object)."""
    if path == FLOOD_OBJ:
        rel = path.relative_to(REPO)
        result = subprocess.run(["make", "-s", "-C", str(REPO), str(rel)], capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"building {rel} failed:\n{result.stdout}{result.stderr}")
    if not path.is_file():
        raise BenchError(f"flood object {path} not found (`make bench` builds it)")
    return path


def bench_latency(args, agent: Agent, forkloop: Path) -> dict:
    tries = []
    n = max(100, int(args.storm_rate * LATENCY_STORM_S))
    log(f"latency: {args.latency_tries} storms of {n:,} forks at {args.storm_rate:,}/s")
    for i in range(args.latency_tries):
        t0 = time.monotonic()
        proc = start_forkloop(forkloop, n, args.storm_rate)
        hit = agent.wait_alert(fork_storm_of(proc.pid), LATENCY_TIMEOUT_S)
        finish_forkloop(proc)
        latency = round(hit[0] - t0, 3) if hit else None
        tries.append({"try": i + 1, "pid": proc.pid, "latency_s": latency,
                      "alert_count": hit[1].get("count") if hit else None})
        log(f"  try {i + 1}: {fmt(latency, '.3f')} s")
        time.sleep(0.5)
    values = [t["latency_s"] for t in tries if t["latency_s"] is not None]
    return {"tries": tries, "median_s": median(values), "min_s": min(values) if values else None,
            "max_s": max(values) if values else None, "missed": len(tries) - len(values)}


def bench_flood(args, agent: Agent, forkloop: Path, flood_obj: Path) -> dict:
    from flood import Flood  # imports the ksift loader: only needed here

    side_cmd = [str(forkloop), str(FLOOD_SIDE_FORKS), str(FLOOD_SIDE_RATE)]
    log(f"flood: {args.flood_rate:,} records/s for {args.flood_seconds:g}s, {args.flood_batch} per run; "
        f"a fork storm ({FLOOD_SIDE_FORKS} forks at {FLOOD_SIDE_RATE}/s) from {FLOOD_SIDE_AT_S:g}s")
    with Flood(flood_obj, agent.proc.pid, args.flood_agent_wakeup) as flood:
        tr0, own0 = flood.transport(), flood.own()
        host0, a = host_cpu_times(), agent.sample()
        run = flood.run(args.flood_rate, args.flood_seconds, args.flood_batch, (FLOOD_SIDE_AT_S, side_cmd))
        b, host_flood = agent.sample(), host_cpu_share(host0, host_cpu_times())
        side_proc = run.pop("side_proc")
        side = finish_forkloop(side_proc) if side_proc is not None else None
        time.sleep(FLOOD_TAIL_S)
        c = agent.sample()
        tr1, own1 = flood.transport(), flood.own()
        map_ids = flood.map_ids
        ringbuf_bytes = flood.ringbuf_bytes
    alive = agent.alive
    side_alerts = {}
    if side_proc is not None:
        for status in ("open", "resolved"):
            hit = agent.wait_alert(fork_storm_of(side_proc.pid, status), 0 if status == "open" else 3.0)
            side_alerts[status] = None if hit is None else {"degraded": hit[1].get("degraded"),
                                                            "count": hit[1].get("count")}
    flood_own = {k: own1[k] - own0[k] for k in own1}
    transport = {k: tr1[k] - tr0[k] for k in tr1}
    return {"run": run, "ringbuf_bytes": ringbuf_bytes, "map_ids": map_ids,
            "submit": "sensors' submit_record (watermark wake-ups)" if args.flood_agent_wakeup else "flags 0",
            "flood_counters": flood_own, "transport_delta": transport,
            "agent_during_flood": cpu_delta(a, b), "agent_after_tail": cpu_delta(b, c),
            "memory_before": a.memory(), "memory_after_flood": b.memory(), "memory_after_tail": c.memory(),
            "host": host_flood, "agent_alive_after": alive, "side_storm": side, "side_pid": side_proc.pid
            if side_proc is not None else None, "side_alerts": side_alerts}


def bench_latency_and_flood(args, forkloop: Path, workdir: Path, flood_obj: Path | None) -> dict:
    out: dict = {}
    with Agent(args.ksift, workdir, "latency-flood").start() as agent:
        time.sleep(FOOTPRINT_SETTLE_S)
        out["foreign_ksift_programs"] = foreign_ksift_programs(agent_prog_ids(agent.proc.pid))
        if args.latency_tries > 0:
            out["latency"] = bench_latency(args, agent, forkloop)
        if flood_obj is not None:
            out["flood"] = bench_flood(args, agent, forkloop, flood_obj)
        agent.stop()
        stats = agent.stats()
        out["funnel"] = funnel_of(stats)
        out["agent_exit"] = agent.exit_code
        lost_logged = [line for line in agent.warnings() if "lost between the kernel and ksift" in line]
        out["loss_warnings"] = len(lost_logged)
        out["loss_logged"] = sum(int(line.split(" WARNING ")[1].split()[1]) for line in lost_logged
                                 if line.split(" WARNING ")[1].split()[1].isdigit())
    if "flood" in out:
        f = out["flood"]
        t = stats.get("transport", {})
        offered = f["run"]["offered"]
        emitted, dropped = f["flood_counters"]["emitted"], f["flood_counters"]["dropped"]
        f["accounting"] = {
            "offered": offered,
            "flood_emitted": emitted,
            "flood_dropped": dropped,
            "agent_read_synthetic": t.get("synthetic"),
            "agent_records_read": t.get("records_read"),
            "agent_kernel_dropped": t.get("kernel_dropped"),
            "transport_dropped_delta": f["transport_delta"]["dropped"],
            # every record either reached the agent or was counted as lost, and the agent read all it got
            "offered_eq_emitted_plus_dropped": offered == emitted + dropped,
            "read_eq_emitted": t.get("synthetic") == emitted,
            "loss_in_agent_counter": (t.get("kernel_dropped") or 0) >= dropped,
            "lost_pct": round(100 * dropped / offered, 2) if offered else None,
            "agent_exit": out["agent_exit"],
        }
    return out


# -- report --------------------------------------------------------------------------------

def verdict(ok) -> str:
    return "-" if ok is None else ("ok" if ok else "MISSED")


def figures(result: dict) -> list[dict]:
    """The summary table: each figure next to its target and the issue's "before"."""
    rows = []
    fp, ov, lf = result.get("footprint"), result.get("overhead"), result.get("latency_flood") or {}

    def row(name, value, shown, target, before, ok, note=""):
        rows.append({"figure": name, "value": value, "shown": shown, "target": target, "before": before,
                     "verdict": verdict(ok), "note": note})

    if fp:
        def others(ph, storm=False):
            """What other work on the host made the agent do in a phase (the storm's own left out)."""
            h = ph["happened"]
            n = sum(1 for a in h["alerts"] if not (storm and a.endswith(" forkloop")))
            crossings = sum(v for k, v in h["crossings"].items() if not (storm and k.startswith("kernel.process.")))
            return f"other work: {crossings} crossings, {n} alerts" if crossings or n else "no other work seen"

        li, si, st = fp["phases"]["long_idle"], fp["phases"]["idle"], fp["phases"]["storm"]
        idle = core_pct(li["agent"])
        row("agent CPU idle, % of one core", idle, f"{idle:.3f} %", "<= 0.3 %", "0.94 %", idle <= 0.3,
            f"{li['agent']['wall_s']:.0f} s, median 1-s slice {fmt(li.get('slice_median_pct'), '.3f')} %, "
            f"{others(li)}; {core_pct(si['agent']):.3f} % in the {si['agent']['wall_s']:.0f} s before the storm "
            f"({others(si)}); host busy {li['host']['busy_pct']:.0f} %")
        storm = core_pct(st["agent"])
        loop = st["forkloop"]
        row("agent CPU, paced fork storm", storm, f"{storm:.3f} %", "<= 0.5 %", "0.97 %", storm <= 0.5,
            f"{loop['achieved_rate']:,.0f} forks/s achieved; {others(st, True)}; "
            f"host busy {st['host']['busy_pct']:.0f} %")
        m = fp["memory"]
        hwm = fp["vm_hwm_kib_max"] / 1024
        row("agent peak RSS (VmHWM)", hwm, f"{hwm:.1f} MiB", "<= 45 MiB", "77 MiB", hwm <= 45,
            "after start-up / storm / 60 s idle: " + " / ".join(
                f"{m[k]['vm_hwm_kib'] / 1024:.1f}" for k in ("after_startup", "after_storm", "after_long_idle")))
        bpf = fp["bpf"]
        if bpf.get("ns_per_fork") is not None and not fp.get("bpf_stats_error"):
            us = bpf["ns_per_fork"] / 1000
            row("BPF time per fork (all agent programs)", us, f"{us:.2f} us", "<= 2.5 us", "6.1 us", us <= 2.5,
                f"net of idle background {bpf['ns_per_fork_net_of_idle'] / 1000:.2f} us; "
                f"{len(bpf['programs'])} programs")
    if ov:
        s = ov["summary"]
        ks, bt = s.get("paired_ksift_off"), s.get("paired_bpftrace_off")
        if ks:
            row("fork loop ksift / without (paired)", ks["median"],
                f"{ks['median']:.3f} ({ks['min']:.3f}-{ks['max']:.3f})", "-", "-", None, f"{ks['n']} rounds")
        if bt:
            row("fork loop bpftrace / without (paired)", bt["median"],
                f"{bt['median']:.3f} ({bt['min']:.3f}-{bt['max']:.3f})", "-", "-", None, f"{bt['n']} rounds")
        kb = s.get("paired_ksift_bpftrace")
        if kb:
            note = ("ranges overlap: within this machine's noise"
                    if ks and bt and ks["min"] <= bt["max"] and bt["min"] <= ks["max"] else "")
            row("fork loop ksift / bpftrace (paired)", kb["median"],
                f"{kb['median']:.3f} ({kb['min']:.3f}-{kb['max']:.3f})", "ksift <= bpftrace", "-",
                s["ksift_at_or_below_bpftrace"], note)
        bik = ov.get("bpftrace_in_kernel")
        if bik and bik.get("ns_per_fork") is not None and fp:
            row("in-kernel ns per fork: ksift / bpftrace", None,
                f"{fp['bpf']['ns_per_fork']:,.0f} / {bik['ns_per_fork']:,.0f}", "-", "-", None,
                "BPF_ENABLE_STATS; bpftrace's one program on fork only")
    lat = lf.get("latency")
    if lat:
        v = lat["median_s"]
        row("detection latency (storm start -> alert)", v,
            f"{fmt(v, '.3f')} s ({fmt(lat['min_s'], '.3f')}-{fmt(lat['max_s'], '.3f')})", "< 1.5 s", "-",
            None if v is None else (v < 1.5 and lat["missed"] == 0),
            f"{len(lat['tries'])} tries, {lat['missed']} missed")
    fl = lf.get("flood")
    if fl:
        run, acc = fl["run"], fl["accounting"]
        row("flood: records offered", run["offered_per_s"],
            f"{run['offered']:,} in {run['elapsed_s']:.1f} s = {run['offered_per_s'] / 1e6:.2f} M/s",
            ">= 1 M/s for 10 s", "-", run["offered_per_s"] >= 0.99e6 and run["elapsed_s"] >= 9.9)
        row("flood: read by the agent / lost", acc["lost_pct"],
            f"{fmt(acc['agent_read_synthetic'], ',')} read, {acc['flood_dropped']:,} lost ({acc['lost_pct']} %)",
            "every loss counted", "-",
            acc["offered_eq_emitted_plus_dropped"] and acc["read_eq_emitted"] and acc["loss_in_agent_counter"],
            f"agent logged {lf.get('loss_logged', 0):,} lost in {lf.get('loss_warnings', 0)} warnings")
        d = fl["agent_during_flood"]
        row("flood: agent CPU", core_pct(d), f"{core_pct(d):.1f} %", "-", "-", None,
            f"flood driver {run['driver_cpu_ns_per_record']} ns/record in the kernel+Python")
        mb, ma = fl["memory_before"], fl["memory_after_tail"]
        row("flood: agent alive, memory bounded", None,
            f"{'alive' if fl['agent_alive_after'] else 'DEAD'}, RSS {mb['vm_rss_kib'] / 1024:.1f} -> "
            f"{ma['vm_rss_kib'] / 1024:.1f} MiB", "alive, bounded", "-",
            fl["agent_alive_after"] and lf.get("agent_exit") == 0,
            f"VmHWM {mb['vm_hwm_kib'] / 1024:.1f} -> {ma['vm_hwm_kib'] / 1024:.1f} MiB; exit {lf.get('agent_exit')}")
        sa = {k: v for k, v in fl["side_alerts"].items() if v is not None}
        marked = [k for k, v in sa.items() if v["degraded"]]
        shown = ("no alert" if not sa else
                 f"{len(marked)} of {len(sa)} ({', '.join(sa)})" + (" degraded" if marked else " NOT degraded"))
        ok = (bool(sa) and len(marked) == len(sa)) if acc["flood_dropped"] else None
        row("flood: alerts of that period degraded", None, shown, "degraded if lost", "-", ok,
            "; ".join(f"{k}: records_lost {v['degraded']['records_lost']:,}" for k, v in sa.items() if v["degraded"]))
    return rows


def print_report(result: dict, out=sys.stdout) -> None:
    m, g = result["machine"], result["git"]
    w = out.write
    w(f"\nksift benchmark  {result['started_at']}  checkout at commit {g['commit']}"
      + (f" + uncommitted {', '.join(g['uncommitted_agent_files'])}" if g["uncommitted_agent_files"] else "")
      + ("" if result["params"]["ksift"] == str(DEFAULT_KSIFT.resolve()) else
         f"\n  agent under test: {result['params']['ksift']} (not this checkout's)")
      + f"\n  {m['kernel']}, {m['cpus']} CPU ({m['cpu_model']}), VM {m['vm'] or '?'}, "
      f"wall {result['duration_s']:.0f}s, host busy over the run {result['host_over_run']['busy_pct']:.0f} %\n")

    ov = result.get("overhead")
    if ov:
        s = ov["summary"]
        w(f"\n1. Fork+exit+wait loop: {s['rounds']} rounds x {s['forks_per_round']:,} forks, the order of the "
          f"sides changing every round\n")
        w(f"  {'side':10}{'ns/fork':>10}{'CPU ns/fork':>13}{'spread':>9}{'host busy':>11}   paired ratio to without: "
          f"median (min-max)\n")
        for side in s["sides"]:
            p = s.get(f"paired_{side}_off")
            w(f"  {side:10}{s[f'median_ns_per_fork_{side}']:>10,.0f}{s[f'median_cpu_ns_per_fork_{side}']:>13,.0f}"
              f"{s[f'spread_{side}_pct']:>8.1f}%{s[f'host_busy_pct_median_{side}']:>10.0f}%"
              + (f"   {p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f})" if p else "") + "\n")
        kb = s.get("paired_ksift_bpftrace")
        if kb:
            w(f"  ksift / bpftrace per round: {kb['median']:.3f} ({kb['min']:.3f}-{kb['max']:.3f}); ksift at or below "
              f"bpftrace: {'yes' if s['ksift_at_or_below_bpftrace'] else 'no'} (medians of the paired ratios)\n")
        bik = ov.get("bpftrace_in_kernel")
        if bik and "ns_per_fork" in bik:
            w(f"  bpftrace in the kernel: {bik['ns_per_fork']:,.0f} ns per fork ({bik['forks']:,} forks, "
              f"BPF_ENABLE_STATS); started in {fmt(s['bpftrace_startup_s'], '.2f')} s\n")
        if s["rounds_with_foreign_ksift"]:
            w(f"  WARNING: another ksift had programs loaded in rounds {s['rounds_with_foreign_ksift']}\n")

    fp = result.get("footprint")
    if fp:
        w("\n2. One agent: start-up, idle, storm, long idle\n")
        w(f"  {'phase':10}{'wall s':>8}{'CPU %core':>11}{'(ticks)':>9}{'wakeups/s':>11}{'us/wakeup':>11}"
          f"{'RSS MiB':>9}{'HWM MiB':>9}{'host busy':>11}\n")
        for name, ph in fp["phases"].items():
            a = ph["agent"]
            w(f"  {name:10}{a['wall_s']:>8.1f}{core_pct(a):>11.3f}{a['cpu_pct_of_core']:>9.2f}"
              f"{a['wakeups_per_s']:>11.1f}{fmt(a['cpu_us_per_wakeup'], '.0f'):>11}"
              f"{a['vm_rss_kib_end'] / 1024:>9.1f}{a['vm_hwm_kib'] / 1024:>9.1f}{ph['host']['busy_pct']:>10.0f}%\n")
        st = fp["startup"]
        loop = fp["phases"]["storm"]["forkloop"]
        w(f"  start-up: ready after {st['ready_after_s']:.2f} s, {st['cpu_s_to_ready']:.2f} CPU s, "
          f"VmHWM {st['vm_hwm_kib_at_ready'] / 1024:.1f} MiB; storm {loop['n']:,} forks at "
          f"{loop['achieved_rate']:,.0f}/s ({loop['late']} late); its alert after "
          f"{fmt(fp['phases']['storm']['alert_latency_s'], '.3f')} s\n")
        for name, ph in fp["phases"].items():
            h = ph["happened"]
            crossings = ", ".join(f"{k.split('.')[1]} {v}" for k, v in h["crossings"].items()) or "none"
            w(f"  {name}: crossings in the kernel: {crossings}; alerts: {', '.join(h['alerts']) or 'none'}\n")
        mem = fp["memory"]
        for k, v in mem.items():
            w(f"  memory {k.replace('_', ' ')}: RSS {v['vm_rss_kib'] / 1024:.1f} MiB "
              f"(anon {v['rss_anon_kib'] / 1024:.1f}, file {v['rss_file_kib'] / 1024:.1f}), "
              f"VmHWM {v['vm_hwm_kib'] / 1024:.1f} MiB\n")
        bpf = fp["bpf"]
        if fp.get("bpf_stats_error"):
            w(f"  in-kernel cost not measured: {fp['bpf_stats_error']}\n")
        else:
            w(f"\n  In the kernel during the storm (BPF_ENABLE_STATS; all {len(bpf['programs'])} programs the agent "
              f"holds; {bpf['forks']:,} forks by the benchmark, {bpf['host_forks']:,} on the host)\n")
            w(f"  {'program':18}{'id':>6}{'runs':>10}{'runs/fork':>11}{'ns/run':>9}{'ns/fork':>9}{'idle runs/s':>13}\n")
            for p in sorted(bpf["programs"].values(), key=lambda p: -p["run_time_ns"]):
                w(f"  {p['name']:18}{p['id']:>6}{p['run_cnt']:>10,}{p['runs_per_fork']:>11.2f}"
                  f"{fmt(p['ns_per_run'], ',.0f'):>9}{p['ns_per_fork']:>9,.0f}"
                  f"{fmt(p['idle_runs_per_s'], ',.1f'):>13}\n")
            w(f"  {'total':18}{'':>6}{'':>10}{'':>11}{'':>9}{bpf['ns_per_fork']:>9,.0f}   "
              f"(net of the idle background {bpf['ns_per_fork_net_of_idle']:,.0f}; per host fork "
              f"{fmt(bpf['ns_per_host_fork'], ',.0f')})\n")
        f = fp["funnel"]
        w(f"  funnel: {fmt(f['fork_seen'], ',')} forks seen -> {fmt(f['kernel_emitted'], ',')} records "
          f"({fmt(f['kernel_dropped'], ',')} dropped) -> {fmt(f['records_read'], ',')} read in {fmt(f['drains'], ',')} "
          f"drains -> {fmt(f['crossings'], ',')} crossings -> {(f['alerts_open'] or 0) + (f['alerts_resolved'] or 0)} "
          f"alerts; {fmt(f['ticks'], ',')} housekeeping ticks\n")
        if fp["foreign_ksift_programs"]:
            w(f"  WARNING: {len(fp['foreign_ksift_programs'])} programs of another ksift were loaded\n")

    lf = result.get("latency_flood") or {}
    lat = lf.get("latency")
    if lat:
        w(f"\n3. Detection latency (storm at {result['params']['storm_rate']:,} forks/s -> fork_storm alert on "
          f"stdout): " + ", ".join(fmt(t["latency_s"], ".3f") for t in lat["tries"]) + " s\n")
    fl = lf.get("flood")
    if fl:
        run, acc, d = fl["run"], fl["accounting"], fl["agent_during_flood"]
        from ksift.transport.records import RECORD_SIZE, RINGBUF_HDR_SIZE  # the record's size, as the agent reads it

        w(f"\n4. Flood of the running agent (ring buffer {fl['ringbuf_bytes'] // 1024} KiB, "
          f"{RECORD_SIZE + RINGBUF_HDR_SIZE} bytes a record, "
          f"submitted with {fl['submit']})\n")
        w(f"  offered {run['offered']:,} in {run['elapsed_s']:.2f} s ({run['offered_per_s']:,.0f}/s, "
          f"{run['runs']:,} runs of {run['batch']}, {run['late_runs']} late)\n")
        w(f"  submitted {acc['flood_emitted']:,}, lost {acc['flood_dropped']:,} ({acc['lost_pct']} %); "
          f"the agent read {fmt(acc['agent_read_synthetic'], ',')} synthetic records; its kernel_dropped "
          f"{fmt(acc['agent_kernel_dropped'], ',')}, logged {lf.get('loss_logged', 0):,} lost\n")
        w(f"  accounting closes: offered = submitted + lost {acc['offered_eq_emitted_plus_dropped']}, "
          f"read = submitted {acc['read_eq_emitted']}, losses in the agent's counter {acc['loss_in_agent_counter']}\n")
        w(f"  agent during the flood: {core_pct(d):.1f} % of a core ({d['wakeups_per_s']:,.0f} wakeups/s), "
          f"host busy {fl['host']['busy_pct']:.0f} %; RSS {fl['memory_before']['vm_rss_kib'] / 1024:.1f} -> "
          f"{fl['memory_after_flood']['vm_rss_kib'] / 1024:.1f} -> {fl['memory_after_tail']['vm_rss_kib'] / 1024:.1f} "
          f"MiB, HWM {fl['memory_before']['vm_hwm_kib'] / 1024:.1f} -> "
          f"{fl['memory_after_tail']['vm_hwm_kib'] / 1024:.1f} MiB; "
          f"alive after: {fl['agent_alive_after']}, exit {acc['agent_exit']}\n")
        if fl["side_pid"] is None:
            w(f"  no fork storm during the flood (it starts {FLOOD_SIDE_AT_S:g} s in)\n")
        else:
            w(f"  the fork storm during the flood (pid {fl['side_pid']}): "
              + ", ".join(f"{k} alert degraded={json.dumps(v['degraded']) if v else 'no alert'}"
                          for k, v in fl["side_alerts"].items()) + "\n")

    hg = result.get("hog")
    if hg:
        seen = (f"its cpu_hog alert after {fmt(hg['alert_latency_s'], '.1f')} s, {hg['stacks']} stack(s), "
                f"top frame {hg['top_frame']}" if hg["alerted"] else "no cpu_hog alert")
        w(f"\nA new CPU hog symbolized ({' '.join(HOG_CMD)}, a fresh agent, cpu_hog at {HOG_RULE['threshold']}% "
          f"for {HOG_RULE['sustain']})\n")
        w(f"  {seen}; the hog had {hg['hog_cpu_pct_of_core']:.0f}% of a core; the agent "
          f"{core_pct(hg['agent']):.2f}% of a core over {hg['agent']['wall_s']:.1f} s\n")
        w(f"  VmHWM {hg['memory_before']['vm_hwm_kib'] / 1024:.1f} -> {hg['memory_after']['vm_hwm_kib'] / 1024:.1f} "
          f"MiB (the peak RSS with a hog symbolized), RSS after {hg['memory_after']['vm_rss_kib'] / 1024:.1f} MiB\n")

    rows = figures(result)
    if rows:
        w("\nSummary: issue 9's targets (\"before\": the issue's figures, docs/benchmarks.md of 2026-11-25)\n")
        w(f"  {'figure':44}{'this run':42}{'target':21}{'before':9}verdict\n")
        for r in rows:
            w(f"  {r['figure']:44}{r['shown']:42}{r['target']:21}{r['before']:9}{r['verdict']}\n")
            if r["note"]:
                w(f"      {r['note']}\n")


# -- 5. pressure: the idle agent's cost with N watched cgroups ---------------------------------

CGROUP2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")


def trigger_fds(pid: int) -> int:
    """The agent's open pressure files: its PSI triggers (the host's and every watched cgroup's)."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        n += target.endswith(".pressure") or target.startswith("/proc/pressure/")
    return n


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def rules_without_pressure(path: Path) -> Path:
    """The packaged rules with the three pressure rules disabled: the baseline of the pressure runs."""
    import tomllib

    from ksift.rules.parse import default_rules_text

    rules = tomllib.loads(default_rules_text())["rule"]
    with open(path, "w", encoding="utf-8") as fh:
        for rule in rules:
            if rule["signal"].startswith("pressure."):
                rule["enabled"] = False
            fh.write("[[rule]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in rule.items()) + "\n")
    return path


def bench_pressure(args, workdir: Path) -> dict:
    """What the pressure rules cost an idle agent with N extra cgroups (each holding a sleeping
    process) to watch. Two agents run side by side over the same --pressure-seconds, so the
    shared host's load hits both alike: the packaged rules as shipped (cpu/memory/io_pressure
    among them) and the same rules with the pressure rules disabled. Per N: both agents' CPU
    share of a core (mean and median 1-s slice), the per-slice difference, the trigger fds, and
    the sensor's own counters (cgroup walks, notifications, snapshots)."""
    out: dict = {}
    baseline_rules = rules_without_pressure(workdir / "nopressure.rules.toml")
    for n in args.pressure_cgroups:
        groups = [CGROUP2 / f"ksift-bench-{os.getpid()}-{i}" for i in range(n)]
        sleepers = []
        config = workdir / f"pressure{n}.toml"
        # Room for the host's own populated cgroups as well as the bench's.
        config.write_text(f"[pressure]\nmax_cgroups = {n + 64}\n")
        log(f"pressure: {n} extra cgroups, each with a sleeping process; {args.pressure_seconds:g}s idle, "
            "side by side with the pressure rules off")
        try:
            for g in groups:
                g.mkdir()
                sleepers.append(subprocess.Popen(["sh", "-c", f"echo $$ > {g}/cgroup.procs; exec sleep 3600"]))
            with Agent(args.ksift, workdir, f"pressure{n}", ("--config", str(config), "--api", "off")).start() as on, \
                    Agent(args.ksift, workdir, f"nopressure{n}", ("--rules", str(baseline_rules),
                                                                  "--api", "off")).start() as off:
                time.sleep(FOOTPRINT_SETTLE_S)
                a_on, a_off = on.sample(), off.sample()
                diffs, on_slices, off_slices = [], [], []
                end = time.monotonic() + args.pressure_seconds
                while (left := end - time.monotonic()) > 0:
                    time.sleep(min(1.0, left))
                    b_on, b_off = on.sample(), off.sample()
                    if None not in (a_on.cpu_ns, b_on.cpu_ns, a_off.cpu_ns, b_off.cpu_ns):
                        x = 100 * (b_on.cpu_ns - a_on.cpu_ns) / 1e9 / max(b_on.wall - a_on.wall, 1e-9)
                        y = 100 * (b_off.cpu_ns - a_off.cpu_ns) / 1e9 / max(b_off.wall - a_off.wall, 1e-9)
                        on_slices.append(round(x, 3))
                        off_slices.append(round(y, 3))
                        diffs.append(round(x - y, 3))
                    a_on, a_off = b_on, b_off
                fds = trigger_fds(on.proc.pid)
                on.stop()
                off.stop()
                counters = on.stats().get("kernel", {}).get("pressure", {})
            out[str(n)] = {
                "on_pct": round(statistics.fmean(on_slices), 3) if on_slices else None,
                "off_pct": round(statistics.fmean(off_slices), 3) if off_slices else None,
                "on_median_pct": round(median(on_slices), 3) if on_slices else None,
                "off_median_pct": round(median(off_slices), 3) if off_slices else None,
                "diff_median_pct": round(median(diffs), 3) if diffs else None,
                "diff_mean_pct": round(statistics.fmean(diffs), 3) if diffs else None,
                "slices": len(diffs), "trigger_fds": fds, "sensor": counters,
            }
        finally:
            for p in sleepers:
                p.kill()
                p.wait()
            for g in groups:
                for _ in range(50):
                    try:
                        g.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)
        r = out[str(n)]
        c = r["sensor"]
        log(f"  {n} cgroups: pressure rules on {fmt(r['on_pct'], '.3f')}% / off {fmt(r['off_pct'], '.3f')}% "
            f"of a core (medians {fmt(r['on_median_pct'], '.3f')}% / {fmt(r['off_median_pct'], '.3f')}%, "
            f"median difference {fmt(r['diff_median_pct'], '.3f')}%), {r['trigger_fds']} trigger fds, "
            f"{c.get('cgroups_watched', 0)} cgroups watched, "
            f"{c.get('rescan_us', 0) / max(c.get('rescans', 0), 1) / 1000:.2f} ms per walk, "
            f"{c.get('notifications', 0)} notifications, "
            f"{c.get('snapshot_us', 0) / max(c.get('snapshots', 0), 1) / 1000:.2f} ms per snapshot")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ksift overhead, footprint, latency and flood benchmark (run as root)")
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds of the fork loop, each side once a round (default 10)")
    p.add_argument("--forks", type=int, default=20000, help="forks per fork-loop run (default 20000)")
    p.add_argument("--storm-rate", type=int, default=2000, help="paced storm rate, forks/s (default 2000)")
    p.add_argument("--phase-seconds", type=float, default=10.0, help="idle and storm phases (default 10)")
    p.add_argument("--idle-seconds", type=float, default=60.0, help="the long idle after the storm (default 60)")
    p.add_argument("--latency-tries", type=int, default=5, help="detection latency tries (default 5)")
    p.add_argument("--flood-rate", type=int, default=1_000_000, help="records/s offered (default 1000000)")
    p.add_argument("--flood-seconds", type=float, default=10.0, help="length of the flood (default 10)")
    p.add_argument("--flood-batch", type=int, default=1000, help="records per BPF_PROG_TEST_RUN (default 1000)")
    p.add_argument("--flood-obj", type=Path, default=FLOOD_OBJ, help="the built bench/flood.bpf.c")
    p.add_argument("--flood-agent-wakeup", action="store_true",
                   help="submit flood records like the sensors (forced wake-ups past the watermark) instead of "
                        "with flags 0")
    p.add_argument("--agent-api", choices=("on", "off"), default="on",
                   help="the footprint agent's HTTP API: on as shipped (default), or off to see what it costs")
    p.add_argument("--pressure-cgroups", type=int, nargs="+", default=[0, 10, 100],
                   help="extra watched cgroups per pressure run (default 0 10 100)")
    p.add_argument("--pressure-seconds", type=float, default=30.0, help="idle per pressure run (default 30)")
    p.add_argument("--skip", action="append", default=[],
                   choices=("overhead", "footprint", "latency", "flood", "pressure", "hog"),
                   help="leave a part out (repeatable)")
    p.add_argument("--ksift", type=Path, default=DEFAULT_KSIFT, help="the ksift executable")
    p.add_argument("--out", type=Path, help="JSON result file (default: a new file in the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (agent logs, stats, dbs)")
    args = p.parse_args(argv)
    if (args.rounds < 1 or args.forks < 1 or args.storm_rate < 1 or args.phase_seconds <= 0
            or args.idle_seconds < 0 or args.flood_rate < 1 or args.flood_seconds <= 0 or args.flood_batch < 1
            or args.latency_tries < 0):
        p.error("counts, rates and lengths must be positive")
    if "latency" in args.skip:
        args.latency_tries = 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run_bench.py: needs root (ksift loads BPF programs); try `sudo make bench`", file=sys.stderr)
        return 1
    if not os.access(args.ksift, os.X_OK):
        print(f"run_bench.py: {args.ksift} is not executable; run `make build` first", file=sys.stderr)
        return 1
    args.ksift = args.ksift.resolve()
    out_path = args.out
    if out_path is None:
        fd, name = tempfile.mkstemp(prefix="ksift-bench-", suffix=".json")
        os.close(fd)
        out_path = Path(name)

    workdir = Path(tempfile.mkdtemp(prefix="ksift-bench-"))
    started = time.time()
    t0 = time.monotonic()
    host0 = host_cpu_times()
    result = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
              "machine": machine_info(), "git": git_info(),
              "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    mounted_tracefs = False
    try:
        already = foreign_ksift_programs()
        result["foreign_ksift_programs_at_start"] = already
        if already:
            log(f"WARNING: ksift programs already loaded by another process: {len(already)} "
                f"({', '.join(sorted({p['name'] for p in already}))})")
        forkloop = build_forkloop(workdir)
        flood_obj = ensure_flood_obj(args.flood_obj) if "flood" not in args.skip else None
        if "overhead" not in args.skip:
            if shutil.which("bpftrace"):
                mounted_tracefs = ensure_tracefs()
            result["overhead"] = bench_overhead(args, forkloop, workdir)
        if "footprint" not in args.skip:
            result["footprint"] = bench_footprint(args, forkloop, workdir)
        if args.latency_tries > 0 or flood_obj is not None:
            result["latency_flood"] = bench_latency_and_flood(args, forkloop, workdir, flood_obj)
        if "pressure" not in args.skip:
            result["pressure"] = bench_pressure(args, workdir)
        if "hog" not in args.skip:
            result["hog"] = bench_hog(args, workdir)
    except BenchError as exc:
        print(f"run_bench.py: {exc}", file=sys.stderr)
        print(f"run_bench.py: agent logs kept in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"run_bench.py: interrupted; work directory {workdir}", file=sys.stderr)
        return 130
    finally:
        if mounted_tracefs:
            subprocess.run(["umount", str(TRACEFS)], capture_output=True)
    result["duration_s"] = round(time.monotonic() - t0, 1)
    result["host_over_run"] = host_cpu_share(host0, host_cpu_times())
    result["machine"]["loadavg_at_end"] = (read_text("/proc/loadavg") or "").split()[:3]
    result["summary"] = figures(result)
    if args.keep:
        result["workdir"] = str(workdir)
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_report(result)
    print(f"\nresults: {out_path}" + (f"\nwork directory: {workdir}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
