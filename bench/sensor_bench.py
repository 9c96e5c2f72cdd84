#!/usr/bin/env python3
"""ksift per-sensor benchmark: each sensor's cost on the operation it hooks, as ratios in one run.

A benchmark, not a test: it prints a table and writes a JSON result file; it
asserts nothing. Run it as root from the repository (`make bench-sensors`).

For each case (one sensor, enabled alone through a rules file holding just
its default rules), a micro-workload (bench/microloops.c; fork+exit+wait from
bench/forkloop.c) runs N operations as fast as it can, in rounds that
alternate WITHOUT and WITH a running `ksift run` (off/on, then on/off, ...),
so slow drift of a shared machine hits both sides alike. Reported per case:
the median ns per operation of each side, their ratio, the median of the
per-round ratios, and, from the kernel's own BPF run-time statistics
(BPF_ENABLE_STATS, held only during the "with" rounds), the in-kernel ns the
sensor's programs spent per operation: the most direct number on a noisy VM.
A workload that trips its rule (a fork loop is a fork storm) pays for the
alert too; the alerts are counted. docs/benchmarks.md has the method and numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from run_bench import (
    REPO,
    SETTLE_S,
    Agent,
    BenchError,
    BpfRunStats,
    agent_prog_ids,
    build_forkloop,
    fmt,
    host_cpu_share,
    host_cpu_times,
    log,
    machine_info,
    median,
    run_forkloop,
)

MICROLOOPS_SRC = Path(__file__).resolve().parent / "microloops.c"
DEFAULT_RULES = REPO / "src" / "ksift" / "rules" / "default_rules.toml"


@dataclass(frozen=True)
class Case:
    name: str
    rules: tuple[str, ...]  # default rules enabled alone; ("*",) = every default rule
    mode: str  # microloops mode, or "fork" for forkloop
    n: int  # operations per round
    what: str


CASES = (
    Case("fork_storm", ("fork_storm",), "fork", 10_000, "fork + _exit + waitpid"),
    Case("exec_churn+crash_loop", ("exec_churn", "crash_loop"), "forkexec", 1_000, "fork + exec /bin/true + wait"),
    Case("fd_burst/open", ("fd_burst",), "open", 300_000, "openat(/dev/null) + close"),
    Case("fd_burst/getpid", ("fd_burst",), "getpid", 2_000_000, "getpid(): the tax on every syscall"),
    Case("connect_storm", ("connect_storm",), "connect", 4_000, "TCP connect + accept + close on loopback"),
    Case("slow_request", ("slow_request",), "request", 20_000, "64-byte request/response on loopback TCP"),
    Case("cpu_hog", ("cpu_hog",), "spin", 4_000_000, "100 multiply-adds, no syscall"),
    Case("oom_kill+memory_growth", ("oom_kill", "memory_growth"), "fault", 300_000, "anonymous page fault"),
    Case("all defaults/getpid", ("*",), "getpid", 2_000_000, "getpid() with every default rule"),
    Case("all defaults/fork", ("*",), "fork", 10_000, "fork + _exit + waitpid with every default rule"),
)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise BenchError(f"cannot write {value!r} as TOML")


def rules_file(names: tuple[str, ...], path: Path) -> Path:
    """The packaged default rules named in `names`, enabled, and nothing else; ("*",): the defaults as shipped."""
    rules = tomllib.loads(DEFAULT_RULES.read_text())["rule"]
    chosen = [r for r in rules if names == ("*",) or r["name"] in names]
    missing = set(names) - {"*"} - {r["name"] for r in chosen}
    if missing:
        raise BenchError(f"no default rule named {', '.join(sorted(missing))} in {DEFAULT_RULES}")
    lines = []
    for rule in chosen:
        lines.append("[[rule]]")
        # A rule named on its own is measured enabled; "*" keeps each rule's shipped state.
        lines += [f"{key} = {toml_value(value)}" for key, value in rule.items() if key != "enabled" or names == ("*",)]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def build_microloops(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (cc or gcc) on PATH; install gcc")
    exe = workdir / "microloops"
    result = subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(exe), str(MICROLOOPS_SRC)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"compiling {MICROLOOPS_SRC} failed:\n{result.stderr}")
    return exe


class Workloads:
    def __init__(self, workdir: Path):
        self.microloops = build_microloops(workdir)
        self.forkloop = build_forkloop(workdir)

    def run(self, mode: str, n: int) -> dict:
        """One round: ns per operation and CPU, in one shape for every mode."""
        if mode == "fork":
            out = run_forkloop(self.forkloop, n)
            return {"n": n, "ns_per_op": out["ns_per_fork"], "cpu_s": out["cpu_self_s"] + out["cpu_children_s"]}
        result = subprocess.run([str(self.microloops), mode, str(n)], capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"microloops {mode} {n} failed (exit {result.returncode}): {result.stderr.strip()}")
        out = json.loads(result.stdout)
        return {"n": n, "ns_per_op": out["ns_per_op"], "cpu_s": out["cpu_self_s"] + out["cpu_children_s"]}


def run_case(case: Case, args, loops: Workloads, workdir: Path) -> dict:
    n = max(1, int(case.n * args.scale))
    tag = case.name.replace("/", "-").replace("+", "-").replace(" ", "-")
    rules = rules_file(case.rules, workdir / f"{tag}.rules.toml")
    loops.run(case.mode, max(1, n // 10))  # warm-up: page cache, ports, allocator
    rounds = []
    for r in range(args.rounds):
        for side in (("off", "on") if r % 2 == 0 else ("on", "off")):
            if side == "off":
                time.sleep(SETTLE_S)
                host0 = host_cpu_times()
                entry = {"round": r + 1, "side": "off", **loops.run(case.mode, n)}
            else:
                with Agent(args.ksift, workdir, f"{tag}-{r + 1}", ("--rules", str(rules))).start() as agent:
                    own = agent_prog_ids(agent.proc.pid)
                    time.sleep(SETTLE_S)
                    with BpfRunStats() as bpf:
                        p0 = bpf.snapshot(own) if bpf.error is None else {}
                        host0 = host_cpu_times()
                        loop = loops.run(case.mode, n)
                        p1 = bpf.snapshot(own) if bpf.error is None else {}
                    agent.stop()
                    progs = {after["name"]: {"run_cnt": after["run_cnt"] - p0[pid]["run_cnt"],
                                             "run_time_ns": after["run_time_ns"] - p0[pid]["run_time_ns"]}
                             for pid, after in p1.items() if pid in p0}
                    entry = {"round": r + 1, "side": "on", **loop, "programs": progs,
                             "bpf_stats_error": bpf.error, "alerts": agent.alerts(),
                             "agent_exit": agent.exit_code, "agent_warnings": agent.warnings()}
            entry["host"] = host_cpu_share(host0, host_cpu_times())
            rounds.append(entry)

    off = [e["ns_per_op"] for e in rounds if e["side"] == "off"]
    on = [e["ns_per_op"] for e in rounds if e["side"] == "on"]
    pairs: dict[int, dict] = {}
    for e in rounds:
        pairs.setdefault(e["round"], {})[e["side"]] = e["ns_per_op"]
    on_rounds = [e for e in rounds if e["side"] == "on"]
    kernel_ns = [sum(p["run_time_ns"] for p in e["programs"].values()) / e["n"] for e in on_rounds if e["programs"]]
    summary = {
        "case": case.name, "rules": list(case.rules), "workload": case.what, "mode": case.mode, "n": n,
        "ns_per_op_off": round(median(off), 1), "ns_per_op_on": round(median(on), 1),
        "ratio_on_off": round(median(on) / median(off), 4),
        "paired_ratio_median": round(median([p["on"] / p["off"] for p in pairs.values()]), 4),
        "spread_off_pct": round(100 * (max(off) - min(off)) / median(off), 1),
        "kernel_ns_per_op": round(median(kernel_ns), 1) if kernel_ns else None,
        "programs": sorted({name for e in on_rounds for name in e["programs"]}),
        "alerts_per_on_round": median([e["alerts"]["total"] for e in on_rounds]),
        "agent_failures": sum(1 for e in on_rounds if e["agent_exit"] not in (0, None)),
    }
    log(f"{case.name:24} off {summary['ns_per_op_off']:>11,.0f} ns/op  on {summary['ns_per_op_on']:>11,.0f}  "
        f"ratio {summary['ratio_on_off']:.3f}  in-kernel {fmt(summary['kernel_ns_per_op'], ',.0f')} ns/op  "
        f"alerts/round {summary['alerts_per_on_round']:g}")
    return {"summary": summary, "rounds": rounds}


def print_report(result: dict, out=sys.stdout) -> None:
    m = result["machine"]
    w = out.write
    w(f"\nksift per-sensor benchmark  {result['started_at']}  {m['kernel']}, {m['cpus']} CPU, VM {m['vm'] or '?'}, "
      f"{result['params']['rounds']} interleaved rounds per case, wall {result['duration_s']:.0f}s\n\n")
    w(f"  {'case':24}{'workload':44}{'without':>10}{'with':>10}{'ratio':>8}{'paired':>8}{'kernel':>9}"
      f"{'alerts':>8}\n")
    w(f"  {'':24}{'':44}{'ns/op':>10}{'ns/op':>10}{'':>8}{'':>8}{'ns/op':>9}{'/round':>8}\n")
    for case in result["cases"]:
        s = case["summary"]
        w(f"  {s['case']:24}{s['workload'][:43]:44}{s['ns_per_op_off']:>10,.0f}{s['ns_per_op_on']:>10,.0f}"
          f"{s['ratio_on_off']:>8.3f}{s['paired_ratio_median']:>8.3f}{fmt(s['kernel_ns_per_op'], ',.0f'):>9}"
          f"{s['alerts_per_on_round']:>8g}\n")
    w("\n  ratio = median with / median without; paired = median of per-round ratios; kernel = run time of the\n"
      "  case's BPF programs (BPF_ENABLE_STATS) per operation, which the noise of a shared VM does not blur\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ksift per-sensor overhead benchmark (run as root)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each side per case (default 3)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every case's operation count")
    p.add_argument("--only", action="append", default=[], metavar="CASE", help="run only this case (repeatable)")
    p.add_argument("--ksift", type=Path, default=REPO / ".venv" / "bin" / "ksift", help="the ksift executable")
    p.add_argument("--out", type=Path, help="JSON result file (default: a new file in the temp dir)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.scale <= 0:
        p.error("--rounds and --scale must be positive")
    known = {c.name for c in CASES}
    for name in args.only:
        if name not in known:
            p.error(f"unknown case {name!r} (cases: {', '.join(sorted(known))})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("sensor_bench.py: needs root (ksift loads BPF programs); try `sudo make bench-sensors`", file=sys.stderr)
        return 1
    if not os.access(args.ksift, os.X_OK):
        print(f"sensor_bench.py: {args.ksift} is not executable; run `make build` first", file=sys.stderr)
        return 1
    args.ksift = args.ksift.resolve()
    out_path = args.out
    if out_path is None:
        fd, name = tempfile.mkstemp(prefix="ksift-sensor-bench-", suffix=".json")
        os.close(fd)
        out_path = Path(name)
    workdir = Path(tempfile.mkdtemp(prefix="ksift-sensor-bench-"))
    t0 = time.monotonic()
    result = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
              "params": {"rounds": args.rounds, "scale": args.scale}, "cases": []}
    try:
        loops = Workloads(workdir)
        for case in CASES:
            if args.only and case.name not in args.only:
                continue
            result["cases"].append(run_case(case, args, loops, workdir))
    except BenchError as exc:
        print(f"sensor_bench.py: {exc}\nsensor_bench.py: agent logs kept in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sensor_bench.py: interrupted; work directory {workdir}", file=sys.stderr)
        return 130
    result["duration_s"] = round(time.monotonic() - t0, 1)
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_report(result)
    print(f"\nresults: {out_path}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
