"""Workload: one parent that keeps starting (exec'ing) child programs at a steady rate.

usage: churner.py --rate N --seconds S [--child CMD ...] [--comm NAME] [--cgroup DIR]

Children are started with posix_spawn (fork + exec) from the --child commands in
turn (default /bin/true), their stdout goes to /dev/null, and the parent reaps
them as they exit, so a child that lives long (e.g. "/bin/sleep 1.5") overlaps
the next ones. Prints one JSON line at the end:
{"pid": ..., "children": ..., "by_exe": {exe: n}, "elapsed_s": ...}.
"""

import os
import shlex
import time
from collections import Counter

from workload_common import add_rate_args, join_cgroup, pace, parser, report, set_comm


def main() -> None:
    ap = parser(comm="ks-churner")
    add_rate_args(ap, "children started")
    ap.add_argument("--child", action="append", help="command line of a child; repeat to alternate")
    ap.add_argument("--cgroup", help="cgroup v2 directory to move into first")
    args = ap.parse_args()

    if args.cgroup:
        join_cgroup(args.cgroup)
    set_comm(args.comm)
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
        pace(start, n, args.rate)
    elapsed = time.monotonic() - start
    for pid in running:
        os.waitpid(pid, 0)
    report(children=n, by_exe=dict(started), elapsed_s=round(elapsed, 3))


if __name__ == "__main__":
    main()
