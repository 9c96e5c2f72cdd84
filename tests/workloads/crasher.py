"""Workload: a supervisor that restarts one program each time it exits.

usage: crasher.py --exe PATH [--arg A ...] --runs N --rate R [--comm NAME]

Runs the program (posix_spawn), waits for it, and starts it again, at most
R times per second, N times in all; core dumps are off. Prints one JSON line
at the end with the wait() statuses it saw, as the kernel's raw numbers:
{"pid": ..., "runs": ..., "statuses": {"768": 20}, "elapsed_s": ...}.
"""

import os
import resource
import time
from collections import Counter

from workload_common import pace, parser, report, set_comm


def main() -> None:
    ap = parser(comm="ks-superv")
    ap.add_argument("--exe", required=True)
    ap.add_argument("--arg", action="append", default=[], help="argument of the program; repeat for more")
    ap.add_argument("--runs", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True, help="starts per second at most")
    args = ap.parse_args()

    set_comm(args.comm)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # crashing children leave no core files
    argv = [args.exe, *args.arg]
    statuses: Counter[int] = Counter()
    start = time.monotonic()
    for n in range(1, args.runs + 1):
        pid = os.posix_spawn(args.exe, argv, os.environ)
        _, status = os.waitpid(pid, 0)
        statuses[status] += 1
        pace(start, n, args.rate)
    report(runs=args.runs, statuses={str(k): v for k, v in statuses.items()},
           elapsed_s=round(time.monotonic() - start, 3))


if __name__ == "__main__":
    main()
