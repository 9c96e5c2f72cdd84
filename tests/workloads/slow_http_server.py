"""Workload: a real HTTP/1.1 server on loopback with one slow endpoint, and its client.

usage:
  slow_http_server.py serve [--comm NAME] [--slow-ms MS] [--seconds S]
      Serves on 127.0.0.1 (a free port) until stdin closes or S seconds pass.
      GET /api/orders sleeps MS (default 800) before it answers; GET /api/health
      answers at once. Prints one JSON line once listening: {"pid": ..., "port": ...}.
  slow_http_server.py raw-serve --read-call {recv,read,readv,recvmsg} [--host H] [--comm NAME] [--slow-ms MS]
      The same two endpoints from a minimal server on raw sockets that reads each
      request with the named call (recv -> recvfrom(2), read(2), readv(2),
      recvmsg(2)), on 127.0.0.1 or --host (e.g. ::1). Same JSON line and stop.
  slow_http_server.py client [--host H] --port P [--keepalive-fast N] [--new-fast N]
                             [--keepalive-slow N] [--new-slow N] [--think S] [--comm NAME]
      Sends, in this order: fast requests on one keep-alive connection (with
      --think seconds between them), fast requests on a new connection each,
      slow requests on the same keep-alive connection (after a think time too),
      slow requests on a new connection each. Prints one JSON line at the end:
      {"pid": ..., "requests": ..., "slow": ..., "statuses": [...], "keepalive_reused": bool}.

The think time makes the client look like a slow server if client sockets
were ever mistaken for accepted ones: it reads a response, waits, then writes.
"""

import argparse
import http.client
import http.server
import json
import os
import select
import socket
import sys
import threading
import time
import urllib.request

from workload_common import set_comm

SLOW_PATH = "/api/orders"
FAST_PATH = "/api/health"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client asks to close
    # Headers and body go out in two writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (~40 ms a request), as in any server that does not set it.
    disable_nagle_algorithm = True
    slow_s = 0.8

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == SLOW_PATH:
            time.sleep(self.slow_s)
            body = b'{"orders": []}\n'
        elif path == FAST_PATH:
            body = b'{"ok": true}\n'
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # quiet: the test reads only our JSON line


def serve(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    Handler.slow_s = args.slow_ms / 1000
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    print(json.dumps({"pid": os.getpid(), "port": server.server_address[1]}), flush=True)
    # Until the test closes our stdin (or the time limit): never outlive the test.
    select.select([sys.stdin], [], [], args.seconds)
    server.shutdown()
    server.server_close()


def read_some(conn: socket.socket, call: str) -> bytes:
    """Up to 4 KiB from conn through one specific system call."""
    if call == "recv":
        return conn.recv(4096)
    if call == "read":
        return os.read(conn.fileno(), 4096)
    if call == "readv":
        buf = bytearray(4096)
        return bytes(buf[: os.readv(conn.fileno(), [buf])])
    if call == "recvmsg":
        return conn.recvmsg(4096)[0]
    raise ValueError(f"unknown read call {call!r}")


def raw_connection(conn: socket.socket, call: str, slow_s: float) -> None:
    pending = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in pending:
                data = read_some(conn, call)
                if not data:
                    return  # the client closed
                pending += data
            head, pending = pending.split(b"\r\n\r\n", 1)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            path = parts[1].decode("ascii", "replace").split("?", 1)[0] if len(parts) > 1 else ""
            if path == SLOW_PATH:
                time.sleep(slow_s)
            status, body = (b"200 OK", b'{"ok": true}\n') if path in (SLOW_PATH, FAST_PATH) else (b"404 Not Found", b"")
            conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def raw_serve(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((args.host, 0))
    listener.listen(16)
    listener.settimeout(0.1)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed at shutdown
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=raw_connection, args=(conn, args.read_call, args.slow_ms / 1000),
                             daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    print(json.dumps({"pid": os.getpid(), "port": listener.getsockname()[1]}), flush=True)
    select.select([sys.stdin], [], [], args.seconds)
    listener.close()


def client(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    statuses: list[int] = []
    conn = http.client.HTTPConnection(args.host, args.port, timeout=30)
    local_ports: set[int] = set()

    def on_keepalive(path: str) -> None:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
        local_ports.add(conn.sock.getsockname()[1])  # one port: one connection reused

    def on_new_connection(path: str) -> None:
        # urllib opens a connection per request and asks the server to close it.
        with urllib.request.urlopen(base + path, timeout=30) as resp:
            resp.read()
            statuses.append(resp.status)

    for i in range(args.keepalive_fast):
        if i:
            time.sleep(args.think)
        on_keepalive(FAST_PATH)
    for _ in range(args.new_fast):
        on_new_connection(FAST_PATH)
    for _ in range(args.keepalive_slow):
        if args.keepalive_fast:
            time.sleep(args.think)
        on_keepalive(SLOW_PATH)
    for _ in range(args.new_slow):
        on_new_connection(SLOW_PATH)
    conn.close()
    slow = args.keepalive_slow + args.new_slow
    print(json.dumps({"pid": os.getpid(), "requests": len(statuses), "slow": slow, "statuses": statuses,
                      "keepalive_reused": len(local_ports) <= 1}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--comm", default="ks-httpd")
    s.add_argument("--slow-ms", type=float, default=800.0)
    s.add_argument("--seconds", type=float, default=120.0, help="stop after this long at the latest")
    r = sub.add_parser("raw-serve")
    r.add_argument("--read-call", choices=["recv", "read", "readv", "recvmsg"], required=True)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--comm", default="ks-rawhttpd")
    r.add_argument("--slow-ms", type=float, default=800.0)
    r.add_argument("--seconds", type=float, default=120.0, help="stop after this long at the latest")
    c = sub.add_parser("client")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--comm", default="ks-http-client")
    c.add_argument("--keepalive-fast", type=int, default=0)
    c.add_argument("--new-fast", type=int, default=0)
    c.add_argument("--keepalive-slow", type=int, default=0)
    c.add_argument("--new-slow", type=int, default=0)
    c.add_argument("--think", type=float, default=0.0, help="seconds between requests on the keep-alive connection")
    args = ap.parse_args()
    {"serve": serve, "raw-serve": raw_serve, "client": client}[args.mode](args)


if __name__ == "__main__":
    main()
