"""Workload: one parent that creates child processes at a steady rate.

usage: forker.py --rate N --seconds S [--comm NAME] [--cgroup DIR] [--threads]

Each child exits at once; the parent reaps it. With --threads the children are
threads (clones in the same thread group), which ksift must not count. Prints one JSON line at the end:
{"pid": ..., "ppid": ..., "forks": ..., "elapsed_s": ...}.
"""

import argparse
import ctypes
import json
import os
import threading
import time

PR_SET_NAME = 15


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, required=True, help="children per second")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--comm", default="ks-forker", help="process name the kernel will report")
    ap.add_argument("--cgroup", help="cgroup v2 directory to move into first")
    ap.add_argument("--threads", action="store_true", help="start threads instead of processes")
    args = ap.parse_args()

    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, args.comm.encode(), 0, 0, 0)

    forks = 0
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        if args.threads:
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
        else:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        forks += 1
        # Pace to absolute deadlines so the rate holds even when a fork is slow.
        delay = start + forks / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "forks": forks,
                      "elapsed_s": round(time.monotonic() - start, 3)}), flush=True)


if __name__ == "__main__":
    main()
