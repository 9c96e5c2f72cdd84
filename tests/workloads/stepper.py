"""Workload: grow resident memory only when told, so a test decides when RSS moves.

usage: stepper.py [--comm NAME] [--memcg DIR]

Reads commands from stdin, one a line, and answers each on stdout once done:
  grow N   touch N more MiB of anonymous memory (every page written: resident) -> "ok <touched MiB>"
  exit     leave                                                          -> (nothing)
Prints "ready <pid>" first, after joining --memcg (a cgroup directory, v1 or v2) and naming itself.
"""

import mmap
import os
import sys

from workload_common import join_cgroup, parser, set_comm

MIB = 1 << 20


def main() -> None:
    ap = parser(comm="ks-stepper")
    ap.add_argument("--memcg", help="cgroup directory to join first")
    args = ap.parse_args()
    if args.memcg:
        join_cgroup(args.memcg)
    set_comm(args.comm)
    chunks: list[mmap.mmap] = []
    ones = b"\x01" * MIB
    touched = 0
    print(f"ready {os.getpid()}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "exit":
            break
        if cmd[0] == "grow":
            n = int(cmd[1])
            buf = mmap.mmap(-1, n * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for i in range(n):
                buf[i * MIB:(i + 1) * MIB] = ones
            chunks.append(buf)
            touched += n
            print(f"ok {touched}", flush=True)


if __name__ == "__main__":
    main()
