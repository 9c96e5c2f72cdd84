"""Workload: one process that opens TCP connections to one address and port at a steady rate.

usage: connector.py --host ADDR --port N --rate N --seconds S [--comm NAME]

Each attempt is a non-blocking connect() (the socket enters SYN_SENT inside it)
followed by an abortive close (SO_LINGER 0: no TIME_WAIT, so ports do not run
out). Prints one JSON line at the end:
{"pid": ..., "connects": ..., "errors": ..., "elapsed_s": ...}.
"""

import argparse
import ctypes
import errno
import json
import os
import socket
import struct
import time

PR_SET_NAME = 15
LINGER_ABORT = struct.pack("ii", 1, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True, help="IPv4 or IPv6 address")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True, help="connection attempts per second")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--comm", default="ks-connector", help="process name the kernel will report")
    args = ap.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, args.comm.encode(), 0, 0, 0)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET

    connects = errors = 0
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
        err = sock.connect_ex((args.host, args.port))
        if err not in (0, errno.EINPROGRESS):
            errors += 1
        sock.close()
        connects += 1
        # Pace to absolute deadlines so the rate holds even when a connect is slow.
        delay = start + connects / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "connects": connects, "errors": errors,
                      "elapsed_s": round(time.monotonic() - start, 3)}), flush=True)


if __name__ == "__main__":
    main()
