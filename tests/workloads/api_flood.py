#!/usr/bin/env python3
"""Hold many idle TCP connections and a few slowloris ones against an HTTP server, as a hostile local user.

usage: api_flood.py --port P --idle N --seconds S [--slowloris K]

Keeps N connections to 127.0.0.1:P open that never send a byte; one the server closes is opened
again (at most one reopen per 5 ms, so the pressure lasts without a busy loop). K more connections
send a request head one byte a second and never finish it; each is reopened when closed. Prints one
JSON line: connects, closed_by_server, connect_errors, the most held at once, and how long each
slowloris connection lived before the server closed it.
"""

from __future__ import annotations

import json
import selectors
import socket
import time

from workload_common import parser

HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200


def main() -> None:
    ap = parser("ks-apiflood")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--idle", type=int, required=True)
    ap.add_argument("--slowloris", type=int, default=0)
    ap.add_argument("--seconds", type=float, required=True)
    args = ap.parse_args()

    sel = selectors.DefaultSelector()
    stats = {"connects": 0, "closed_by_server": 0, "connect_errors": 0, "held_max": 0, "slowloris_lived_s": []}
    slow: dict[socket.socket, list] = {}  # socket -> [opened at, bytes sent]

    def connect(kind: str) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", args.port))
        except BlockingIOError:
            pass
        except OSError:
            stats["connect_errors"] += 1
            sock.close()
            return
        stats["connects"] += 1
        sel.register(sock, selectors.EVENT_READ, kind)
        if kind == "slow":
            slow[sock] = [time.monotonic(), 0]

    end = time.monotonic() + args.seconds
    for _ in range(args.idle):
        connect("idle")
    for _ in range(args.slowloris):
        connect("slow")
    reopen = {"idle": 0, "slow": 0}
    next_drip = time.monotonic()
    while time.monotonic() < end:
        stats["held_max"] = max(stats["held_max"], len(sel.get_map()))
        for key, _ in sel.select(timeout=0.005):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:
                continue  # an answer (to nothing we finished): ignore, wait for the close
            stats["closed_by_server"] += 1
            sel.unregister(sock)
            if key.data == "slow":
                stats["slowloris_lived_s"].append(round(time.monotonic() - slow.pop(sock)[0], 2))
            sock.close()
            reopen[key.data] += 1
        for kind in ("slow", "idle"):
            if reopen[kind]:
                reopen[kind] -= 1
                connect(kind)
                break  # one reopen per 5 ms round
        if time.monotonic() >= next_drip:
            next_drip += 1.0
            for sock, state in slow.items():
                if state[1] < len(HEAD):
                    try:
                        sock.send(HEAD[state[1]:state[1] + 1])
                        state[1] += 1
                    except OSError:
                        pass
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
