#!/usr/bin/env python3
"""ksift benchmark: overhead and footprint side by side, in one run, as ratios.

A benchmark, not a test: it prints a table and writes a JSON result file; it
asserts nothing. Run it as root from the repository (`make bench`, or
`.venv/bin/python bench/run_bench.py [options]`). Standard library only.

What it measures (docs/benchmarks.md explains the method and the numbers):

1. Overhead on the workload. A tiny C program (bench/forkloop.c, compiled with
   `cc -O2` into a temporary directory) does N fork + _exit + waitpid as fast as
   it can. Rounds WITHOUT and WITH a running `ksift run` alternate (off/on, then
   on/off, ...) so slow drift of a shared machine hits both sides alike; the
   result is the median ns per fork of each side, their ratio, and the median
   of the per-round ratios. The benchmark's own fork storm trips the fork_storm
   rule: that is part of the cost, and the alerts are counted.

2. Footprint of the agent. With ksift running, its own CPU time (utime + stime
   from /proc/<pid>/stat, and the ns-precise process CPU clock as a cross-check)
   over a phase divided by the phase's wall time = share of one core, and its
   peak RSS (VmHWM), in two phases: idle, and a storm paced to --storm-rate
   forks/s. During the storm phase the kernel's per-program BPF run-time
   statistics are switched on (BPF_ENABLE_STATS, released at the end of the
   phase) to read the in-kernel cost of each hook directly. The funnel
   counters the agent writes with --stats show events seen in the kernel vs
   records emitted vs alerts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORKLOOP_SRC = Path(__file__).resolve().parent / "forkloop.c"
READY_MARK = "watching the host"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AGENT_CAP_S = 600  # --for given to every agent: it stops itself if this script dies
SETTLE_S = 0.5  # pause after the agent says it is ready (and before "off" rounds, for symmetry)
FOOTPRINT_SETTLE_S = 1.0
STORM_TAIL_S = 0.25  # let the agent's next tick hand over the end of the storm
PROGRAMS = ("ks_fork", "ks_exec", "ks_exit")

# bpf(2) on x86-64: BPF_ENABLE_STATS returns an fd; run-time stats stay on while it is open.
NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


class BenchError(Exception):
    pass


# -- small helpers -------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values):
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
    """Aggregate jiffies from /proc/stat's first line (steal shows a noisy VM host)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    fields = read_text("/proc/stat").splitlines()[0].split()[1:1 + len(names)]
    return dict(zip(names, map(int, fields)))


def host_cpu_share(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    delta = {k: after[k] - before[k] for k in before}
    total = sum(delta.values()) or 1
    busy = total - delta["idle"] - delta["iowait"]
    return {"busy_pct": round(100 * busy / total, 2), "steal_pct": round(100 * delta["steal"] / total, 2)}


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
        self.threads = int(status.get("Threads", 0))
        self.vol_cs = int(status.get("voluntary_ctxt_switches", 0))
        self.nonvol_cs = int(status.get("nonvoluntary_ctxt_switches", 0))


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
    """`ksift run` as a subprocess: started, waited for, sampled, stopped with SIGTERM."""

    def __init__(self, ksift: Path, workdir: Path, tag: str, extra_args: tuple[str, ...] = ()):
        self.ksift = ksift
        self.tag = tag
        self.extra_args = tuple(extra_args)
        self.db = workdir / f"{tag}.db"
        self.stats_path = workdir / f"{tag}.stats.json"
        self.out_path = workdir / f"{tag}.stdout"
        self.err_path = workdir / f"{tag}.stderr"
        self.proc: subprocess.Popen | None = None
        self.startup: dict = {}
        self.exit_code: int | None = None

    def start(self, timeout_s: float = 60.0) -> "Agent":
        cmd = [str(self.ksift), "run", "--json", "--for", str(AGENT_CAP_S),
               "--db", str(self.db), "--stats", str(self.stats_path), *self.extra_args]
        t0 = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=self.db.parent)
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
                        "vm_hwm_kib_at_ready": ready.vm_hwm_kib}
        return self

    def sample(self) -> ProcSample:
        assert self.proc is not None
        return ProcSample(self.proc.pid)

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

    def alerts(self) -> dict:
        """Alerts printed on stdout (one JSON object per line), counted by rule and status."""
        counts: dict[str, int] = {"total": 0}
        for line in (read_text(self.out_path) or "").splitlines():
            try:
                alert = json.loads(line)
            except json.JSONDecodeError:
                continue
            counts["total"] += 1
            key = f"{alert.get('rule')}/{alert.get('status')}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def warnings(self) -> list[str]:
        return [line for line in (read_text(self.err_path) or "").splitlines()
                if " WARNING " in line or " ERROR " in line]


def funnel_of(stats: dict) -> dict:
    """The funnel counters that tell the story: seen in the kernel -> emitted -> read -> alerts."""
    kernel = stats.get("kernel", {}).get("process", {})
    transport = stats.get("transport", {})
    rules = stats.get("rules", {})
    out = {
        "fork_seen": kernel.get("fork_seen"),
        "fork_threads": kernel.get("fork_threads"),
        "fork_aggregated": kernel.get("fork_aggregated"),
        "exit_seen": kernel.get("exit_seen"),
        "exec_seen": kernel.get("exec_seen"),
        "rb_emitted": kernel.get("rb_emitted"),
        "rb_dropped": kernel.get("rb_dropped"),
        "rb_wakeups": kernel.get("rb_wakeups"),
        "map_full": kernel.get("map_full"),
        "records_read": transport.get("records_read"),
        "crossings": rules.get("crossings"),
        "folded": rules.get("folded"),
        "incidents_opened": rules.get("opened"),
        "alerts_open": stats.get("alerts", {}).get("open"),
        "alerts_resolved": stats.get("alerts", {}).get("resolved"),
        "dropped_total": stats.get("dropped_total"),
        "ticks": stats.get("ticks"),
    }
    seen, emitted = out["fork_seen"], out["rb_emitted"]
    alerts = (out["alerts_open"] or 0) + (out["alerts_resolved"] or 0)
    out["events_per_record"] = round(seen / emitted, 1) if seen and emitted else None
    out["events_per_alert"] = round(seen / alerts, 1) if seen and alerts else None
    return out


# -- in-kernel cost of the hooks (BPF run-time statistics) ------------------------------

class BpfRunStats:
    """Holds BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) open; reads per-program counters with bpftool."""

    def __init__(self):
        self.fd = -1
        self.error: str | None = None
        self.bpftool = shutil.which("bpftool")

    def __enter__(self) -> "BpfRunStats":
        if self.bpftool is None:
            self.error = "bpftool not found"
            return self
        if NR_BPF is None:
            self.error = f"bpf(2) syscall number unknown for {platform.machine()}"
            return self
        libc = ctypes.CDLL(None, use_errno=True)
        attr = ctypes.create_string_buffer(8)  # union bpf_attr { __u32 type; } zero = BPF_STATS_RUN_TIME
        ctypes.c_uint32.from_buffer(attr).value = BPF_STATS_RUN_TIME
        fd = libc.syscall(ctypes.c_long(NR_BPF), ctypes.c_int(BPF_ENABLE_STATS), attr, ctypes.c_uint(8))
        if fd < 0:
            self.error = f"BPF_ENABLE_STATS: {os.strerror(ctypes.get_errno())}"
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def snapshot(self, prog_ids: set[int]) -> dict[int, dict]:
        """run_cnt / run_time_ns of the given programs, by id."""
        progs = list_programs()
        if progs is None:
            self.error = "bpftool prog show failed"
            return {}
        return {p["id"]: {"name": p.get("name"), "run_cnt": p.get("run_cnt", 0),
                          "run_time_ns": p.get("run_time_ns", 0)}
                for p in progs if p.get("id") in prog_ids}


def list_programs() -> list[dict] | None:
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        return None
    try:
        out = subprocess.run([bpftool, "prog", "show", "--json"], capture_output=True, text=True, timeout=20)
        return json.loads(out.stdout or "[]")
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return None


def agent_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds, from /proc/<pid>/fdinfo (no need for bpftool's pid view)."""
    ids: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ids
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
        except OSError:
            continue
        for line in (read_text(f"/proc/{pid}/fdinfo/{fd}") or "").splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def foreign_ksift_programs(own: set[int] = frozenset()) -> list[dict]:
    """ksift programs loaded by someone else (another agent, a test): they tax the "without" side too."""
    progs = list_programs() or []
    return [{"id": p.get("id"), "name": p.get("name")} for p in progs
            if p.get("name") in PROGRAMS and p.get("id") not in own]


# -- the two halves ----------------------------------------------------------------------

def bench_overhead(args, forkloop: Path, workdir: Path) -> dict:
    log(f"warm-up: {min(args.forks, 2000)} forks without ksift")
    run_forkloop(forkloop, min(args.forks, 2000))
    rounds = []
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for side in order:
            if side == "off":
                foreign = foreign_ksift_programs()
                time.sleep(SETTLE_S)
                host0 = host_cpu_times()
                loop = run_forkloop(forkloop, args.forks)
                entry = {"round": r + 1, "side": "off", **loop}
            else:
                with Agent(args.ksift, workdir, f"overhead-{r + 1}").start() as agent:
                    foreign = foreign_ksift_programs(agent_prog_ids(agent.proc.pid))
                    time.sleep(SETTLE_S)
                    host0 = host_cpu_times()
                    a = agent.sample()
                    loop = run_forkloop(forkloop, args.forks)
                    b = agent.sample()
                    agent.stop()
                    entry = {"round": r + 1, "side": "on", **loop,
                             "agent_during_loop": cpu_delta(a, b), "agent_startup": agent.startup,
                             "alerts": agent.alerts(), "funnel": funnel_of(agent.stats()),
                             "agent_exit": agent.exit_code, "agent_warnings": agent.warnings()}
            entry["cpu_ns_per_fork"] = round(1e9 * (loop["cpu_self_s"] + loop["cpu_children_s"]) / loop["n"], 1)
            entry["host"] = host_cpu_share(host0, host_cpu_times())
            entry["foreign_ksift_programs"] = len(foreign)
            rounds.append(entry)
            extra = ""
            if side == "on":
                extra = (f", alerts {entry['alerts']['total']}, agent "
                         f"{core_pct(entry['agent_during_loop']):.2f}% of a core")
            log(f"round {r + 1}/{args.rounds} {side:>3}: {loop['ns_per_fork']:,.0f} ns/fork "
                f"(cpu {entry['cpu_ns_per_fork']:,.0f} ns/fork, host busy {entry['host']['busy_pct']:.0f}%, "
                f"steal {entry['host']['steal_pct']:.1f}%){extra}"
                + (f" [{len(foreign)} foreign ksift programs loaded]" if foreign else ""))

    def side(name, key):
        return [e[key] for e in rounds if e["side"] == name]

    off, on = side("off", "ns_per_fork"), side("on", "ns_per_fork")
    off_cpu, on_cpu = side("off", "cpu_ns_per_fork"), side("on", "cpu_ns_per_fork")
    by_round = {}
    for e in rounds:
        by_round.setdefault(e["round"], {})[e["side"]] = e
    paired = [p["on"]["ns_per_fork"] / p["off"]["ns_per_fork"] for p in by_round.values()]
    paired_cpu = [p["on"]["cpu_ns_per_fork"] / p["off"]["cpu_ns_per_fork"] for p in by_round.values()]
    on_rounds = [e for e in rounds if e["side"] == "on"]
    summary = {
        "forks_per_round": args.forks,
        "rounds": args.rounds,
        "median_ns_per_fork_off": median(off),
        "median_ns_per_fork_on": median(on),
        "ratio_on_off": round(ratio(median(on), median(off)), 4),
        "delta_ns_per_fork": round(median(on) - median(off), 1),
        "min_ns_per_fork_off": min(off),
        "min_ns_per_fork_on": min(on),
        "ratio_of_minima": round(min(on) / min(off), 4),
        "paired_ratio_median": round(median(paired), 4),
        "paired_ratio_min": round(min(paired), 4),
        "paired_ratio_max": round(max(paired), 4),
        "spread_off_pct": round(100 * (max(off) - min(off)) / median(off), 2),
        "median_cpu_ns_per_fork_off": median(off_cpu),
        "median_cpu_ns_per_fork_on": median(on_cpu),
        "cpu_ratio_on_off": round(ratio(median(on_cpu), median(off_cpu)), 4),
        "cpu_paired_ratio_median": round(median(paired_cpu), 4),
        "alerts_per_on_round": median([e["alerts"]["total"] for e in on_rounds]),
        "alerts_total": sum(e["alerts"]["total"] for e in on_rounds),
        "agent_cpu_pct_during_fast_storm": median([core_pct(e["agent_during_loop"]) for e in on_rounds]),
        "agent_ready_after_s": median([e["agent_startup"]["ready_after_s"] for e in on_rounds]),
        "agent_cpu_s_to_ready": median([e["agent_startup"]["cpu_s_to_ready"] for e in on_rounds]),
        "steal_pct_median": median([e["host"]["steal_pct"] for e in rounds]),
        "host_busy_pct_median_off": median([e["host"]["busy_pct"] for e in rounds if e["side"] == "off"]),
        "host_busy_pct_median_on": median([e["host"]["busy_pct"] for e in rounds if e["side"] == "on"]),
        "rounds_with_foreign_ksift": sum(1 for e in rounds if e["foreign_ksift_programs"]),
    }
    return {"summary": summary, "rounds": rounds}


def bench_footprint(args, forkloop: Path, workdir: Path) -> dict:
    phases = {}

    log(f"footprint: idle for {args.phase_seconds:g}s")
    with Agent(args.ksift, workdir, "idle").start() as agent:
        time.sleep(FOOTPRINT_SETTLE_S)
        host0, a = host_cpu_times(), agent.sample()
        time.sleep(args.phase_seconds)
        b = agent.sample()
        host = host_cpu_share(host0, host_cpu_times())
        agent.stop()
        phases["idle"] = {"agent": cpu_delta(a, b), "startup": agent.startup, "host": host,
                          "funnel": funnel_of(agent.stats()), "alerts": agent.alerts(),
                          "agent_exit": agent.exit_code, "agent_warnings": agent.warnings()}
    log(f"  idle: {core_pct(phases['idle']['agent']):.2f}% of a core, "
        f"VmHWM {phases['idle']['agent']['vm_hwm_kib'] / 1024:.1f} MiB")

    n = max(1, int(args.storm_rate * args.phase_seconds))
    log(f"footprint: storm of {args.storm_rate} forks/s for {args.phase_seconds:g}s ({n} forks)")
    with Agent(args.ksift, workdir, "storm").start() as agent:
        time.sleep(FOOTPRINT_SETTLE_S)
        own = agent_prog_ids(agent.proc.pid)
        foreign = foreign_ksift_programs(own)
        with BpfRunStats() as bpf:
            p0 = bpf.snapshot(own) if bpf.error is None else {}
            host0, a = host_cpu_times(), agent.sample()
            loop = run_forkloop(forkloop, n, args.storm_rate)
            time.sleep(STORM_TAIL_S)
            b = agent.sample()
            host = host_cpu_share(host0, host_cpu_times())
            p1 = bpf.snapshot(own) if bpf.error is None else {}
        hooks = {}
        for prog_id, after in p1.items():
            if prog_id in p0 and after["name"] in PROGRAMS:
                cnt = after["run_cnt"] - p0[prog_id]["run_cnt"]
                ns = after["run_time_ns"] - p0[prog_id]["run_time_ns"]
                hooks[after["name"]] = {"id": prog_id, "run_cnt": cnt, "run_time_ns": ns,
                                        "ns_per_run": round(ns / cnt, 1) if cnt else None}
        if "ks_fork" in hooks and "ks_exit" in hooks and hooks["ks_fork"]["run_cnt"]:
            hooks["ns_per_fork_fork_plus_exit"] = round(
                (hooks["ks_fork"]["run_time_ns"] + hooks["ks_exit"]["run_time_ns"]) / hooks["ks_fork"]["run_cnt"], 1)
        agent.stop()
        phases["storm"] = {"agent": cpu_delta(a, b), "startup": agent.startup, "host": host, "forkloop": loop,
                           "funnel": funnel_of(agent.stats()), "alerts": agent.alerts(),
                           "bpf_hooks": hooks, "bpf_stats_error": bpf.error, "foreign_ksift_programs": foreign,
                           "agent_exit": agent.exit_code, "agent_warnings": agent.warnings()}
    log(f"  storm: {core_pct(phases['storm']['agent']):.2f}% of a core, "
        f"VmHWM {phases['storm']['agent']['vm_hwm_kib'] / 1024:.1f} MiB, "
        f"achieved {loop['achieved_rate']:.0f} forks/s")
    return phases


# -- report --------------------------------------------------------------------------------

def print_report(result: dict, out=sys.stdout) -> None:
    m, ov, fp = result["machine"], result["overhead"]["summary"], result["footprint"]
    w = out.write
    w(f"\nksift benchmark  {result['started_at']}  {m['kernel']}, {m['cpus']} CPU ({m['cpu_model']}), "
      f"VM {m['vm'] or '?'}, container {m['container'] or 'none'}, wall {result['duration_s']:.0f}s\n")

    w(f"\nOverhead on fork+exit+wait ({ov['rounds']} interleaved rounds x {ov['forks_per_round']:,} forks)\n")
    w(f"  {'':26}{'without':>12}{'with':>12}{'ratio':>9}{'delta':>10}\n")
    w(f"  {'wall ns/fork (median)':26}{ov['median_ns_per_fork_off']:>12,.0f}{ov['median_ns_per_fork_on']:>12,.0f}"
      f"{ov['ratio_on_off']:>9.3f}{ov['delta_ns_per_fork']:>+10,.0f}\n")
    w(f"  {'CPU ns/fork (median)':26}{ov['median_cpu_ns_per_fork_off']:>12,.0f}"
      f"{ov['median_cpu_ns_per_fork_on']:>12,.0f}{ov['cpu_ratio_on_off']:>9.3f}"
      f"{ov['median_cpu_ns_per_fork_on'] - ov['median_cpu_ns_per_fork_off']:>+10,.0f}\n")
    w(f"  {'wall ns/fork (best round)':26}{ov['min_ns_per_fork_off']:>12,.0f}{ov['min_ns_per_fork_on']:>12,.0f}"
      f"{ov['ratio_of_minima']:>9.3f}{ov['min_ns_per_fork_on'] - ov['min_ns_per_fork_off']:>+10,.0f}\n")
    w(f"  per-round ratio with/without: median {ov['paired_ratio_median']:.3f} "
      f"(min {ov['paired_ratio_min']:.3f}, max {ov['paired_ratio_max']:.3f}); "
      f"spread of 'without' rounds {ov['spread_off_pct']:.1f}%\n")
    w(f"  alerts per 'with' round: {ov['alerts_per_on_round']:g} ({ov['alerts_total']} in all); "
      f"agent during the fast storm: {ov['agent_cpu_pct_during_fast_storm']:.2f}% of a core; "
      f"host steal (median) {ov['steal_pct_median']:.1f}%\n")
    w(f"  host CPU busy during the loops (median, of {m['cpus']} CPUs): without "
      f"{ov['host_busy_pct_median_off']:.0f}%, with {ov['host_busy_pct_median_on']:.0f}%\n")
    w(f"  agent start: ready after {ov['agent_ready_after_s']:.2f}s, {ov['agent_cpu_s_to_ready']:.2f} CPU s\n")

    w("\nFootprint of the agent\n")
    w(f"  {'phase':8}{'wall s':>8}{'CPU %core':>11}{'(clock)':>9}{'user s':>8}{'sys s':>7}"
      f"{'wakeups/s':>11}{'us/wakeup':>11}{'RSS MiB':>9}{'HWM MiB':>9}\n")
    for name, ph in fp.items():
        a = ph["agent"]
        w(f"  {name:8}{a['wall_s']:>8.1f}{a['cpu_pct_of_core']:>11.2f}{fmt(a['cpu_clock_pct_of_core'], '.2f'):>9}"
          f"{a['utime_s']:>8.2f}{a['stime_s']:>7.2f}{a['wakeups_per_s']:>11.1f}"
          f"{fmt(a['cpu_us_per_wakeup'], '.0f'):>11}{a['vm_rss_kib_end'] / 1024:>9.1f}{a['vm_hwm_kib'] / 1024:>9.1f}\n")
    worst = max(fp, key=lambda name: core_pct(fp[name]["agent"]))
    verdict = "within" if core_pct(fp[worst]["agent"]) <= 1.0 else f"ABOVE in the {worst} phase"
    w(f"  1% of one core budget: {verdict} ('CPU %core' = utime+stime in {1000 // CLK_TCK} ms ticks; "
      f"'(clock)' = process CPU clock in ns, used for the verdict)\n")
    storm = fp["storm"]
    loop = storm["forkloop"]
    w(f"  storm: {loop['n']:,} forks at {loop['achieved_rate']:,.0f}/s achieved (asked {loop['rate']:,}/s, "
      f"{loop['late']} late)\n")

    w("\nFunnel (from --stats)\n")
    w(f"  {'phase':8}{'forks seen':>12}{'rb records':>12}{'read':>8}{'crossings':>11}{'folded':>8}"
      f"{'alerts':>8}{'dropped':>9}{'seen/record':>13}\n")
    for name, ph in fp.items():
        f = ph["funnel"]
        alerts = (f["alerts_open"] or 0) + (f["alerts_resolved"] or 0)
        w(f"  {name:8}{fmt(f['fork_seen'], ','):>12}{fmt(f['rb_emitted'], ','):>12}{fmt(f['records_read'], ','):>8}"
          f"{fmt(f['crossings'], ','):>11}{fmt(f['folded'], ','):>8}{alerts:>8}{fmt(f['dropped_total'], ','):>9}"
          f"{fmt(f['events_per_record'], ',.0f'):>13}\n")

    hooks = storm["bpf_hooks"]
    if hooks:
        w("\nIn-kernel cost of the hooks during the storm (BPF_ENABLE_STATS)\n")
        for name in PROGRAMS:
            if name in hooks:
                h = hooks[name]
                w(f"  {name:9} {h['run_cnt']:>9,} runs  {fmt(h['ns_per_run'], ',.0f'):>6} ns/run\n")
        if "ns_per_fork_fork_plus_exit" in hooks:
            w(f"  per fork (ks_fork + the child's ks_exit): {hooks['ns_per_fork_fork_plus_exit']:,.0f} ns\n")
    elif storm.get("bpf_stats_error"):
        w(f"\nIn-kernel hook cost not measured: {storm['bpf_stats_error']}\n")
    foreign = {"at start": len(result.get("foreign_ksift_programs_at_start", [])),
               "overhead rounds": ov["rounds_with_foreign_ksift"],
               "storm phase": len(storm.get("foreign_ksift_programs", []))}
    if any(foreign.values()):
        w(f"\nWARNING: another ksift (agent or test) had programs loaded: {foreign} "
          f"(programs at start / rounds affected / programs during the storm); its hooks tax both sides\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ksift overhead and footprint benchmark (run as root)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each side (default 5)")
    p.add_argument("--forks", type=int, default=20000, help="forks per overhead round (default 20000)")
    p.add_argument("--storm-rate", type=int, default=2000, help="paced storm rate, forks/s (default 2000)")
    p.add_argument("--phase-seconds", type=float, default=10.0, help="length of each footprint phase (default 10)")
    p.add_argument("--ksift", type=Path, default=REPO / ".venv" / "bin" / "ksift", help="the ksift executable")
    p.add_argument("--out", type=Path, help="JSON result file (default: a new file in the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (agent logs, stats, dbs)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.forks < 1 or args.storm_rate < 1 or args.phase_seconds <= 0:
        p.error("--rounds, --forks, --storm-rate and --phase-seconds must be positive")
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
              "machine": machine_info(),
              "params": {"rounds": args.rounds, "forks": args.forks, "storm_rate": args.storm_rate,
                         "phase_seconds": args.phase_seconds, "ksift": str(args.ksift)}}
    try:
        already = foreign_ksift_programs()
        result["foreign_ksift_programs_at_start"] = already
        if already:
            log(f"WARNING: ksift programs already loaded by another process: {already}")
        forkloop = build_forkloop(workdir)
        result["overhead"] = bench_overhead(args, forkloop, workdir)
        result["footprint"] = bench_footprint(args, forkloop, workdir)
    except BenchError as exc:
        print(f"run_bench.py: {exc}", file=sys.stderr)
        print(f"run_bench.py: agent logs kept in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"run_bench.py: interrupted; work directory {workdir}", file=sys.stderr)
        return 130
    result["duration_s"] = round(time.monotonic() - t0, 1)
    result["host_over_run"] = host_cpu_share(host0, host_cpu_times())
    result["machine"]["loadavg_at_end"] = (read_text("/proc/loadavg") or "").split()[:3]
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
