"""Workload: touch anonymous memory at a given rate up to a given size, then hold it.

usage: allocator.py --size-mb N [--rate-mb R] [--hold S] [--comm NAME] [--memcg DIR]

--rate-mb 0 touches everything at once. --memcg joins a cgroup v1 memory
directory (writes our pid to its cgroup.procs) before allocating, so the
memory is charged there. Every page is written, so it is resident, not just
reserved. Prints one JSON line at the end:
{"pid": ..., "touched_bytes": ..., "peak_rss_bytes": ..., "grow_s": ..., "elapsed_s": ...}.
A process the OOM killer takes prints nothing.
"""

import argparse
import ctypes
import json
import mmap
import os
import time

PR_SET_NAME = 15
MIB = 1 << 20


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, required=True, help="MiB to touch in all")
    ap.add_argument("--rate-mb", type=float, default=0.0, help="MiB per second (0 = all at once)")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to hold the memory afterwards")
    ap.add_argument("--comm", default="ks-alloc", help="process name the kernel will report")
    ap.add_argument("--memcg", help="cgroup v1 memory directory to join first")
    args = ap.parse_args()

    if args.memcg:
        with open(os.path.join(args.memcg, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, args.comm.encode(), 0, 0, 0)

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
            # Pace to absolute deadlines so the rate holds even when a chunk is slow.
            delay = start + touched / (args.rate_mb * MIB) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    grow_s = time.monotonic() - start
    time.sleep(args.hold)
    print(json.dumps({"pid": os.getpid(), "touched_bytes": touched, "peak_rss_bytes": peak_rss_bytes(),
                      "grow_s": round(grow_s, 3), "elapsed_s": round(time.monotonic() - start, 3)}), flush=True)
    buf.close()


if __name__ == "__main__":
    main()
