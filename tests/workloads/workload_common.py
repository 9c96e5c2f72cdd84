"""What the workload scripts share: arguments, process name, cgroup, pacing and the final report.

The workloads run as scripts (python tests/workloads/NAME.py), so Python puts
their directory first on sys.path and `import workload_common` finds this file.
"""

import argparse
import ctypes
import json
import os
import time

PR_SET_NAME = 15


def parser(comm: str) -> argparse.ArgumentParser:
    """An argument parser with --comm (default `comm`), the name tests find the workload by."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--comm", default=comm, help="process name the kernel will report")
    return ap


def add_rate_args(ap: argparse.ArgumentParser, unit: str) -> None:
    """--rate (`unit` per second) and --seconds, both required: a steady pace for a while."""
    ap.add_argument("--rate", type=float, required=True, help=f"{unit} per second")
    ap.add_argument("--seconds", type=float, required=True)


def set_comm(name: str) -> None:
    """Set the name the kernel reports for this process; threads started afterwards inherit it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def join_cgroup(directory: str) -> None:
    """Move this process into a cgroup directory (v1 or v2): what it does from now on is counted there."""
    with open(os.path.join(directory, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))


def pace(start: float, done: float, rate: float) -> None:
    """Sleep until `done` units at `rate` a second from `start` are due.

    Pacing to absolute deadlines keeps the rate even when one unit was slow.
    """
    delay = start + done / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def report(**fields) -> None:
    """Print the workload's one JSON line: its pid and parent's pid, then `fields`."""
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), **fields}), flush=True)
