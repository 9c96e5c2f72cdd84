"""Workload: fork bombs as they really are, and ordinary busy work that must stay quiet.

usage: bombs.py SHAPE --cgroup DIR [--cgroup DIR]... [--treebomb BINARY] [--workdir DIR]

The launcher moves itself into every --cgroup (the test's pids cgroup, whose
pids.max bounds every bomb, and a v2 scratch cgroup), prints one JSON line
{"launcher": pid, "started_ns": CLOCK_MONOTONIC ns} and then becomes the shape:

bombs (they never end by themselves: the test kills their cgroup):
  shell    bash -c ':(){ :|:& };:'                    every member forks two and exits
  binary   tests/workloads/treebomb.c (--treebomb)      the same shape in C
  python   every process runs `while True: os.fork()`
  linear   10 shell loops, each starting `sleep 60 &` as fast as it can

ordinary work (each ends by itself, exit status 0):
  make     make -j8 over 64 targets of short shell commands
  xargs    xargs -P 8 over 400 short commands
  prefork  a server that forks 64 workers at start; they idle for 2 s
  ci       a test job: 4 parallel runners, each running 100 short commands in turn
"""

import argparse
import json
import os
import sys
import time

BOMBS = {
    "shell": ["bash", "-c", ":(){ :|:& };:"],
    "python": [sys.executable, "-c", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                                     "        pass\n"],
    "linear": ["bash", "-c", "for i in $(seq 10); do (while :; do sleep 60 & done) & done; wait"],
}

MAKEFILE_TARGETS = 64


def join(directory: str) -> None:
    with open(os.path.join(directory, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))


def prefork(workers: int = 64, idle_s: float = 2.0) -> None:
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            time.sleep(idle_s)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def make_dir(workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    targets = " ".join(f"t{i}" for i in range(MAKEFILE_TARGETS))
    rules = "".join(f"t{i}:\n\t@sh -c 'sleep 0.02; echo {i} > /dev/null'\n" for i in range(MAKEFILE_TARGETS))
    with open(os.path.join(workdir, "Makefile"), "w") as fh:
        fh.write(f".PHONY: all {targets}\nall: {targets}\n{rules}")
    return workdir


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=[*BOMBS, "binary", "make", "xargs", "prefork", "ci"])
    ap.add_argument("--cgroup", action="append", default=[])
    ap.add_argument("--treebomb", help="the compiled tests/workloads/treebomb.c (shape binary)")
    ap.add_argument("--workdir", default="/tmp", help="where the make shape writes its Makefile")
    args = ap.parse_args()
    for directory in args.cgroup:
        join(directory)
    print(json.dumps({"launcher": os.getpid(), "started_ns": time.monotonic_ns()}), flush=True)
    if args.shape in BOMBS:
        os.execvp(BOMBS[args.shape][0], BOMBS[args.shape])
    if args.shape == "binary":
        os.execv(args.treebomb, [args.treebomb])
    if args.shape == "make":
        os.execvp("make", ["make", "-s", "-j8", "-C", make_dir(os.path.join(args.workdir, "ks-make"))])
    if args.shape == "xargs":
        os.execvp("sh", ["sh", "-c", "seq 400 | xargs -P 8 -n 1 sh -c 'exit 0' sh"])
    if args.shape == "ci":
        runner = "for i in $(seq 100); do /bin/true; ls / > /dev/null; done"
        os.execvp("sh", ["sh", "-c", " & ".join([f"({runner})"] * 4) + "; wait"])
    prefork()
    return 0


if __name__ == "__main__":
    sys.exit(main())
