"""Workload: touch anonymous memory at a given rate up to a given size, then hold it.

usage: allocator.py --size-mb N [--rate-mb R] [--hold S] [--comm NAME] [--memcg DIR]

--rate-mb 0 touches everything at once. --memcg joins a cgroup v1 memory
directory (writes our pid to its cgroup.procs) before allocating, so the
memory is charged there. Every page is written, so it is resident, not just
reserved. Prints one JSON line at the end:
{"pid": ..., "ppid": ..., "touched_bytes": ..., "peak_rss_bytes": ..., "grow_s": ..., "elapsed_s": ...}.
A process the OOM killer takes prints nothing.
"""

import mmap
import time

from workload_common import join_cgroup, pace, parser, report, set_comm

MIB = 1 << 20


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = parser(comm="ks-alloc")
    ap.add_argument("--size-mb", type=float, required=True, help="MiB to touch in all")
    ap.add_argument("--rate-mb", type=float, default=0.0, help="MiB per second (0 = all at once)")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to hold the memory afterwards")
    ap.add_argument("--memcg", help="cgroup v1 memory directory to join first")
    args = ap.parse_args()

    if args.memcg:
        join_cgroup(args.memcg)
    set_comm(args.comm)

    size = int(args.size_mb * MIB)
    chunk = MIB
    ones = b"\x01" * chunk
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = time.monotonic()
    touched = 0
    while touched < size:
        n = min(chunk, size - touched)
        buf[touched:touched + n] = ones[:n]
        touched += n
        if args.rate_mb > 0:
            pace(start, touched, args.rate_mb * MIB)
    grow_s = time.monotonic() - start
    time.sleep(args.hold)
    report(touched_bytes=touched, peak_rss_bytes=peak_rss_bytes(), grow_s=round(grow_s, 3),
           elapsed_s=round(time.monotonic() - start, 3))
    buf.close()


if __name__ == "__main__":
    main()
