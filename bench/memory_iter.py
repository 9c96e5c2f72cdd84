#!/usr/bin/env python3
"""What memory_growth costs the host: one iterator pass, and what a fork pays.

A benchmark, not a test: it prints one JSON object and asserts nothing. Run it
as root from the repository:

    .venv/bin/python bench/memory_iter.py                       # this checkout's memory.bpf.o
    .venv/bin/python bench/memory_iter.py --extra-procs 400     # with 400 more (sleeping) processes
    .venv/bin/python bench/memory_iter.py --object OLD.bpf.o --program ks_rss_stat   # an older object

It loads the memory object alone (its own ring buffer; memory_growth's rodata,
ksift_tgid = this process) with just the named programs attached, switches the
kernel's BPF run-time statistics on (BPF_ENABLE_STATS, held only for the run),
and measures:
- passes: `--passes` runs of the iter/task program (when attached), each one
  bpf_iter_create + read to EOF + close as the agent's poll() does it: the
  program's run time and runs per pass (one run per task plus one at the end),
  and poll()'s wall and CPU time (this thread) per pass;
- forks: `--forks` fork + _exit + waitpid (bench/forkloop.c): the runs and run
  time of every attached program per fork (the child's exit included).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ksift.loader.bpf_object import BpfObject  # noqa: E402
from ksift.loader.libbpf import Libbpf  # noqa: E402
from ksift.sensors.base import default_objects_dir  # noqa: E402
from ksift.transport.ringbuf import RingBufferReader  # noqa: E402

BPF_STATS_RUN_TIME = 0
STEP_PAGES = (32 << 20) // os.sysconf("SC_PAGE_SIZE")  # the packaged rule's step


def build_forkloop(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("no C compiler (cc or gcc) on PATH")
    exe = workdir / "forkloop"
    subprocess.run([cc, "-O2", "-o", str(exe), str(REPO / "bench" / "forkloop.c")], check=True)
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--object", type=Path, default=default_objects_dir() / "memory.bpf.o")
    ap.add_argument("--program", action="append", help="program to attach (default: ks_rss_iter)")
    ap.add_argument("--passes", type=int, default=200)
    ap.add_argument("--forks", type=int, default=20000)
    ap.add_argument("--extra-procs", type=int, default=0, help="sleeping processes to add for the passes")
    args = ap.parse_args()
    programs = args.program or ["ks_rss_iter"]

    lib = Libbpf()
    lib.so.bpf_enable_stats.restype = ctypes.c_int
    lib.so.bpf_enable_stats.argtypes = [ctypes.c_int]
    stats_fd = lib.so.bpf_enable_stats(BPF_STATS_RUN_TIME)
    if stats_fd < 0:
        sys.exit(f"BPF_ENABLE_STATS: {os.strerror(-stats_fd)}")
    extra: list[subprocess.Popen] = []
    obj = BpfObject(args.object, lib)
    out: dict = {"object": str(args.object), "programs": programs}
    try:
        obj.open()
        obj.set_rodata(ksift_tgid=os.getpid(), rss_step_pages=STEP_PAGES)
        for prog in obj.program_names():
            obj.set_autoload(prog, prog in programs)
        obj.load()
        for prog in programs:
            obj.attach(prog)
        events = obj.map("ks_events")
        reader = RingBufferReader(events.fd, events.max_entries)

        iters = [p for p in programs if obj.section_name(p).startswith("iter")]
        if iters:
            extra = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.extra_procs)]
            time.sleep(0.5 if extra else 0)
            before = obj.program_stats()
            wall = cpu = 0
            for _ in range(args.passes):
                w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                obj.run_iter(iters[0])
                wall += time.perf_counter_ns() - w0
                cpu += time.thread_time_ns() - c0
                reader.read()
            after = obj.program_stats()
            run_ns = after[iters[0]][0] - before[iters[0]][0]
            runs = after[iters[0]][1] - before[iters[0]][1]
            out["passes"] = {
                "passes": args.passes,
                "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
                "extra_procs": len(extra),
                "runs_per_pass": round(runs / args.passes, 1),
                "bpf_us_per_pass": round(run_ns / args.passes / 1e3, 1),
                "bpf_ns_per_run": round(run_ns / max(runs, 1), 1),
                "poll_wall_us_per_pass": round(wall / args.passes / 1e3, 1),
                "poll_cpu_us_per_pass": round(cpu / args.passes / 1e3, 1),
            }
            for p in extra:
                p.kill()
                p.wait()
            extra = []

        with tempfile.TemporaryDirectory() as tmp:
            forkloop = build_forkloop(Path(tmp))
            before = obj.program_stats()
            done = json.loads(subprocess.run([str(forkloop), str(args.forks)], capture_output=True, text=True,
                                             check=True).stdout)
            after = obj.program_stats()
        reader.read()
        out["forks"] = {"forks": args.forks, "ns_per_fork": round(done["ns_per_fork"])}
        for prog in programs:
            run_ns = after[prog][0] - before[prog][0]
            runs = after[prog][1] - before[prog][1]
            out["forks"][prog] = {"runs_per_fork": round(runs / args.forks, 2),
                                  "bpf_ns_per_fork": round(run_ns / args.forks, 1),
                                  "bpf_ns_per_run": round(run_ns / max(runs, 1), 1)}
        reader.close()
    finally:
        for p in extra:
            p.kill()
            p.wait()
        obj.close()
        os.close(stats_fd)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
