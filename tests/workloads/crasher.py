"""Workload: a supervisor that restarts one program each time it exits.

usage: crasher.py --exe PATH [--arg A ...] --runs N (--rate R | --pause S [--backoff F])
                  [--comm NAME] [--cgroup DIR ...] [--unit DIR [--recreate]]

Runs the program (posix_spawn), waits for it, and starts it again, N times in
all; core dumps are off. Pacing: --rate starts it at most R times a second;
--pause waits S seconds after each exit before the next start, times F after
each restart with --backoff (2: 1 s, 2 s, 4 s ... as Kubernetes' back-off).
--cgroup moves the supervisor into a cgroup first (repeat for v1 and v2).
--unit starts each run the way systemd or a container runtime does: from a
new intermediate process each time (a new parent, as conmon is), with the
program moved into the cgroup DIR of its own before it execs; with
--recreate that cgroup is made before each run and removed after it, as
systemd does between a unit's restarts. Prints one JSON
line at the end with the wait() statuses it saw, as the kernel's raw numbers,
and the pid of each run's parent:
{"pid": ..., "runs": ..., "statuses": {"768": 20}, "parents": [...], "elapsed_s": ...}.
"""

import os
import resource
import time
from collections import Counter

from workload_common import join_cgroup, pace, parser, report, set_comm


def run_in_unit(exe: str, argv: list[str], unit: str, pipe: tuple[int, int]) -> tuple[int, int]:
    """One run under a fresh intermediate parent, the program in cgroup `unit`: (its status, the parent).

    The intermediate exits 0 itself (its exit is no failure of its own) and hands the program's
    status up through `pipe`.
    """
    middle = os.fork()
    if middle == 0:
        try:
            child = os.fork()
            if child == 0:
                join_cgroup(unit)
                os.execv(exe, argv)
            _, status = os.waitpid(child, 0)
            os.write(pipe[1], status.to_bytes(4, "little"))
        finally:
            os._exit(0)
    os.waitpid(middle, 0)
    return int.from_bytes(os.read(pipe[0], 4), "little"), middle


def main() -> None:
    ap = parser(comm="ks-superv")
    ap.add_argument("--exe", required=True)
    ap.add_argument("--arg", action="append", default=[], help="argument of the program; repeat for more")
    ap.add_argument("--runs", type=int, required=True)
    ap.add_argument("--rate", type=float, help="starts per second at most")
    ap.add_argument("--pause", type=float, help="seconds between an exit and the next start")
    ap.add_argument("--backoff", type=float, default=1.0, help="the pause is multiplied by this after each run")
    ap.add_argument("--cgroup", action="append", default=[], help="cgroup directory to move into first")
    ap.add_argument("--unit", help="cgroup directory each run's program is moved into, from a new parent")
    ap.add_argument("--recreate", action="store_true",
                    help="make the --unit cgroup before each run and remove it after, as systemd does between "
                         "a unit's restarts: each run has a new cgroup id")
    args = ap.parse_args()
    if (args.rate is None) == (args.pause is None):
        ap.error("give one of --rate and --pause")

    for directory in args.cgroup:
        join_cgroup(directory)
    set_comm(args.comm)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # crashing children leave no core files
    pipe = os.pipe() if args.unit else (-1, -1)
    argv = [args.exe, *args.arg]
    statuses: Counter[int] = Counter()
    parents: list[int] = []
    pause = args.pause
    start = time.monotonic()
    for n in range(1, args.runs + 1):
        if args.unit:
            if args.recreate:
                os.mkdir(args.unit)
            status, parent = run_in_unit(args.exe, argv, args.unit, pipe)
            parents.append(parent)
            if args.recreate:
                os.rmdir(args.unit)
        else:
            pid = os.posix_spawn(args.exe, argv, os.environ)
            _, status = os.waitpid(pid, 0)
        statuses[status] += 1
        if n == args.runs:
            break
        if pause is not None:
            time.sleep(pause)
            pause *= args.backoff
        else:
            pace(start, n, args.rate)
    report(runs=args.runs, statuses={str(k): v for k, v in statuses.items()}, parents=parents,
           elapsed_s=round(time.monotonic() - start, 3))


if __name__ == "__main__":
    main()
