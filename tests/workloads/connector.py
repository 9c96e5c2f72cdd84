"""Workload: one process that opens TCP connections to one address and port at a steady rate.

usage: connector.py --host ADDR --port N --rate N --seconds S [--comm NAME]

Each attempt is a non-blocking connect() (the socket enters SYN_SENT inside it)
followed by an abortive close (SO_LINGER 0: no TIME_WAIT, so ports do not run
out). Prints one JSON line at the end:
{"pid": ..., "connects": ..., "errors": ..., "elapsed_s": ...}.
"""

import errno
import socket
import struct
import time

from workload_common import add_rate_args, pace, parser, report, set_comm

LINGER_ABORT = struct.pack("ii", 1, 0)


def main() -> None:
    ap = parser(comm="ks-connector")
    ap.add_argument("--host", required=True, help="IPv4 or IPv6 address")
    ap.add_argument("--port", type=int, required=True)
    add_rate_args(ap, "connection attempts")
    args = ap.parse_args()
    set_comm(args.comm)
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
        pace(start, connects, args.rate)
    report(connects=connects, errors=errors, elapsed_s=round(time.monotonic() - start, 3))


if __name__ == "__main__":
    main()
