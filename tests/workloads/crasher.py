"""Workload: a supervisor that restarts one program each time it exits.

usage: crasher.py --exe PATH [--arg A ...] --runs N --rate R [--comm NAME]

Runs the program (posix_spawn), waits for it, and starts it again, at most
R times per second, N times in all; core dumps are off. Prints one JSON line
at the end with the wait() statuses it saw, as the kernel's raw numbers:
{"pid": ..., "runs": ..., "statuses": {"768": 20}, "elapsed_s": ...}.
"""

import argparse
import ctypes
import json
import os
import resource
import time
from collections import Counter

PR_SET_NAME = 15


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", required=True)
    ap.add_argument("--arg", action="append", default=[], help="argument of the program; repeat for more")
    ap.add_argument("--runs", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True, help="starts per second at most")
    ap.add_argument("--comm", default="ks-superv", help="process name the kernel will report")
    args = ap.parse_args()

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, args.comm.encode(), 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # crashing children leave no core files
    argv = [args.exe, *args.arg]
    statuses: Counter[int] = Counter()
    start = time.monotonic()
    for n in range(1, args.runs + 1):
        pid = os.posix_spawn(args.exe, argv, os.environ)
        _, status = os.waitpid(pid, 0)
        statuses[status] += 1
        delay = start + n / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "runs": args.runs,
                      "statuses": {str(k): v for k, v in statuses.items()},
                      "elapsed_s": round(time.monotonic() - start, 3)}), flush=True)


if __name__ == "__main__":
    main()
