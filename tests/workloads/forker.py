"""Workload: one parent that creates child processes at a steady rate.

usage: forker.py --rate N --seconds S [--comm NAME] [--cgroup DIR] [--threads]

Each child exits at once; the parent reaps it. With --threads the children are
threads (clones in the same thread group), which ksift must not count. Prints one JSON line at the end:
{"pid": ..., "ppid": ..., "forks": ..., "elapsed_s": ...}.
"""

import os
import threading
import time

from workload_common import add_rate_args, join_cgroup, pace, parser, report, set_comm


def main() -> None:
    ap = parser(comm="ks-forker")
    add_rate_args(ap, "children")
    ap.add_argument("--cgroup", help="cgroup v2 directory to move into first")
    ap.add_argument("--threads", action="store_true", help="start threads instead of processes")
    args = ap.parse_args()

    if args.cgroup:
        join_cgroup(args.cgroup)
    set_comm(args.comm)

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
        pace(start, forks, args.rate)
    report(forks=forks, elapsed_s=round(time.monotonic() - start, 3))


if __name__ == "__main__":
    main()
