"""Workload: a service that starts its workers and stops them with SIGTERM, a few times over.

usage: service.py --workers N --cycles C --up S [--comm NAME] [--cgroup DIR ...]

Each cycle starts N workers (posix_spawn of /bin/sh; each exits 143, as a JVM
or a shell's trap does, when it gets SIGTERM), lets them run S seconds, sends
each one SIGTERM, waits for them all, then pauses 0.3 s before the next cycle.
Prints one JSON line at the end with the wait() statuses the workers ended with:
{"pid": ..., "statuses": {"36608": 24}, "elapsed_s": ...}.
"""

import os
import signal
import time
from collections import Counter

from workload_common import join_cgroup, parser, report, set_comm

WORKER = ["/bin/sh", "-c", "trap 'exit 143' TERM; while :; do sleep 0.05; done"]


def main() -> None:
    ap = parser(comm="ks-service")
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--cycles", type=int, required=True)
    ap.add_argument("--up", type=float, required=True, help="seconds the workers run before the stop")
    ap.add_argument("--cgroup", action="append", default=[], help="cgroup directory to move into first")
    args = ap.parse_args()

    for directory in args.cgroup:
        join_cgroup(directory)
    set_comm(args.comm)
    statuses: Counter[int] = Counter()
    start = time.monotonic()
    for cycle in range(args.cycles):
        workers = [os.posix_spawn(WORKER[0], WORKER, os.environ) for _ in range(args.workers)]
        time.sleep(args.up)
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        for pid in workers:
            statuses[os.waitpid(pid, 0)[1]] += 1
        if cycle + 1 < args.cycles:
            time.sleep(0.3)
    report(statuses={str(k): v for k, v in statuses.items()}, elapsed_s=round(time.monotonic() - start, 3))


if __name__ == "__main__":
    main()
