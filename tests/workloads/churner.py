"""Workload: one parent that keeps starting (exec'ing) child programs at a steady rate.

usage: churner.py --rate N --seconds S [--child CMD ...] [--comm NAME] [--cgroup DIR]

Children are started with posix_spawn (fork + exec) from the --child commands in
turn (default /bin/true), their stdout goes to /dev/null, and the parent reaps
them as they exit, so a child that lives long (e.g. "/bin/sleep 1.5") overlaps
the next ones. Prints one JSON line at the end:
{"pid": ..., "children": ..., "by_exe": {exe: n}, "elapsed_s": ...}.
"""

import argparse
import ctypes
import json
import os
import shlex
import time
from collections import Counter

PR_SET_NAME = 15


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, required=True, help="children started per second")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--child", action="append", help="command line of a child; repeat to alternate")
    ap.add_argument("--comm", default="ks-churner", help="process name the kernel will report")
    ap.add_argument("--cgroup", help="cgroup v2 directory to move into first")
    args = ap.parse_args()

    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, args.comm.encode(), 0, 0, 0)
    commands = [shlex.split(c) for c in (args.child or ["/bin/true"])]
    quiet = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]

    started: Counter[str] = Counter()
    running = set()
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < args.seconds:
        argv = commands[n % len(commands)]
        running.add(os.posix_spawn(argv[0], argv, os.environ, file_actions=quiet))
        started[argv[0]] += 1
        n += 1
        while running:  # reap whoever is done, without blocking
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
        # Pace to absolute deadlines so the rate holds even when a spawn is slow.
        delay = start + n / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - start
    for pid in running:
        os.waitpid(pid, 0)
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "children": n, "by_exe": dict(started),
                      "elapsed_s": round(elapsed, 3)}), flush=True)


if __name__ == "__main__":
    main()
