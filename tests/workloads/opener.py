"""Workload: one process that opens (and closes) files at a steady rate.

usage: opener.py --dir PATH[:WEIGHT] [--dir ...] --rate N --seconds S [--comm NAME] [--relative]

Each open picks a directory by weight and a file in it (every regular file the
directory holds at start; the caller creates them). With --relative the file
is opened relative to a directory fd (openat(dirfd, name)), as tree walkers do;
otherwise by its absolute path. Prints one JSON line at the end:
{"pid": ..., "opens": ..., "elapsed_s": ...}.
"""

import os
import random
import time

from workload_common import add_rate_args, pace, parser, report, set_comm

BATCH = 100  # opens between pacing checks: cheap enough to reach tens of thousands a second


def parse_dir(text: str) -> tuple[str, float]:
    path, _, weight = text.partition(":")
    return os.path.abspath(path), float(weight or 1)


def main() -> None:
    ap = parser(comm="ks-opener")
    ap.add_argument("--dir", action="append", type=parse_dir, required=True, help="PATH[:WEIGHT]")
    add_rate_args(ap, "opens")
    ap.add_argument("--relative", action="store_true", help="open relative to a directory fd")
    args = ap.parse_args()
    set_comm(args.comm)

    dirs = []
    for path, weight in args.dir:
        names = sorted(e.name for e in os.scandir(path) if e.is_file())
        if not names:
            raise SystemExit(f"{path}: no files to open")
        dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if args.relative else None
        dirs.append((path, dirfd, names, weight))
    rng = random.Random(1)
    picks = rng.choices(dirs, weights=[d[3] for d in dirs], k=4096)

    opens = 0
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        for _ in range(BATCH):
            path, dirfd, names, _ = picks[opens % len(picks)]
            name = names[opens % len(names)]
            if dirfd is None:
                fd = os.open(os.path.join(path, name), os.O_RDONLY)
            else:
                fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
            os.close(fd)
            opens += 1
        pace(start, opens, args.rate)
    report(opens=opens, elapsed_s=round(time.monotonic() - start, 3))


if __name__ == "__main__":
    main()
