"""Workload: make a cgroup stall on CPU, memory or I/O, for the pressure tests.

usage: stall.py MODE --seconds S [--cgroup DIR ...] [--cpu N] [--procs K] [--comm NAME] [--file PATH]

Joins every --cgroup directory first (v1 or v2: a v2 directory for the pressure
files, v1 ones for a CPU quota or a memory limit), then:
- spin: K processes (--procs) busy on CPU N (--cpu, sched_setaffinity) for S seconds;
- thrash: under a memory limit of about 64 MiB, holds 58 MiB of anonymous memory and
  reads the first 48 MiB of --file over and over: the page cache never fits, and every
  read reclaims (memory pressure, the cgroup's own limit the cause);
- read: drops --file from the page cache (posix_fadvise DONTNEED) and reads it all,
  over and over (I/O pressure: the reads wait for the disk).
Prints one JSON line at the end: {"pid": ..., "ppid": ..., "mode": ..., "pids": [...]}.
"""

import os
import time

from workload_common import join_cgroup, parser, report, set_comm

MIB = 1 << 20


def spin(until: float) -> None:
    while time.monotonic() < until:
        pass


def thrash(path: str, until: float) -> None:
    held = bytearray(58 * MIB)
    for i in range(0, len(held), 4096):
        held[i] = 1
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # its pages become ours, charged to our limit
        while time.monotonic() < until:
            for off in range(0, 48 * MIB, MIB):
                os.pread(fd, MIB, off)
    finally:
        os.close(fd)


def read(path: str, until: float) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while time.monotonic() < until:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off = 0
            while time.monotonic() < until and (n := len(os.pread(fd, MIB, off))):
                off += n
    finally:
        os.close(fd)


def main() -> None:
    ap = parser(comm="ks-stall")
    ap.add_argument("mode", choices=("spin", "thrash", "read"))
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--cgroup", action="append", default=[], help="cgroup directory to join (repeatable)")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (spin)")
    ap.add_argument("--procs", type=int, default=1, help="processes (spin)")
    ap.add_argument("--file", help="file to read (thrash, read)")
    args = ap.parse_args()
    for directory in args.cgroup:
        join_cgroup(directory)
    set_comm(args.comm)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    until = time.monotonic() + args.seconds
    pids = []
    if args.mode == "spin":
        for _ in range(args.procs - 1):
            pid = os.fork()
            if pid == 0:
                spin(until)
                os._exit(0)
            pids.append(pid)
        spin(until)
        for pid in pids:
            os.waitpid(pid, 0)
    elif args.mode == "thrash":
        thrash(args.file, until)
    else:
        read(args.file, until)
    report(mode=args.mode, pids=[os.getpid(), *pids])


if __name__ == "__main__":
    main()
