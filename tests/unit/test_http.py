"""The API's HTTP server (ksift.interfaces.http) on real loopback sockets: framing, JSON errors,
keep-alive, HEAD, and the connection control that keeps it up against local clients that
send nothing, dribble, or flood it (caps, eviction, header and idle timeouts, accept errors)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksift.interfaces.http import HttpServer, Limits, Request, Router, StreamResponse, json_response

DEADLINE_S = 10.0


def app_with(router: Router):
    async def app(request: Request):
        return await router.dispatch(request)
    return app


def hello_router() -> Router:
    router = Router()

    async def hello(request: Request):
        return json_response({"hello": request.single("name") or "world", "body": len(request.body)})

    async def ticks(request: Request):
        async def chunks():
            for n in range(3):
                await asyncio.sleep(0.4)
                yield f"tick {n}\n".encode()
        return StreamResponse(chunks(), headers=[("Content-Type", "text/plain")])

    router.get("/hello", hello, params=("name",))
    router.post("/hello", hello)
    router.get("/ticks", ticks)
    return router


async def serve(limits: Limits = Limits()) -> tuple[HttpServer, int]:
    server = HttpServer(app_with(hello_router()), limits, default_headers=[("X-Content-Type-Options", "nosniff")])
    _, port = server.listen_tcp("127.0.0.1", 0)
    return server, port


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or DEADLINE_S)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    async with asyncio.timeout(DEADLINE_S):
        data = await reader.read()
    writer.close()
    return data


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """The first response in these bytes: (status, headers, body)."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return int(lines[0].split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_requests_keep_alive_and_head():
    async def main():
        server, port = await serve()
        try:
            raw = (b"GET /hello?name=ks HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
            data = await exchange(port, raw)
            first, rest = data.split(b"\r\n\r\n", 1)
            assert b"200 OK" in first and b"nosniff" in first
            assert rest.startswith(b'{"hello":"ks","body":0}')
            # HEAD: the same headers (length of the GET body), no body; then the POST on the same connection.
            rest = rest[len(b'{"hello":"ks","body":0}'):]
            head, post = rest.split(b"\r\n\r\n", 1)
            assert b"content-length: 26" in head.lower()
            status, _, body = split(post)
            assert status == 200 and json.loads(body) == {"hello": "world", "body": 3}
        finally:
            await server.close()

    asyncio.run(main())


@pytest.mark.parametrize("raw, status, fragment", [
    (b"GARBAGE\r\n\r\n", 400, "malformed request"),
    (b"GET /hello HTTP/1.1\r\n\r\n", 400, "malformed request"),  # HTTP/1.1 without Host
    (b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", 413, "larger than 65536"),
    (b"GET /hello?nme=x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "unknown parameter 'nme'"),
    (b"GET /hello?name=a&name=b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "given 2 times"),
    (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint"),
    (b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n", 405, "DELETE is not allowed"),
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "larger than 16384"),
])
def test_bad_requests_get_json_errors(raw, status, fragment):
    async def main():
        server, port = await serve()
        try:
            return split(await exchange(port, raw + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        finally:
            await server.close()

    got, headers, body = asyncio.run(main())
    assert got == status and headers["content-type"].startswith("application/json")
    assert fragment in json.loads(body)["error"], body


def test_a_client_that_sends_nothing_or_dribbles_is_closed_at_the_header_timeout():
    async def main():
        server, port = await serve(Limits(header_timeout_s=0.5, idle_timeout_s=30))
        try:
            _, silent = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            for byte in b"GET /hello HTTP/1.1\r\n":  # slowloris: one byte at a time, never the whole head
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
                if reader.at_eof():
                    break
            assert await closed_by_server(reader, 2.0)
            assert 0.4 < time.monotonic() - started < 2.0
            assert server.closed["header_timeout"] == 2 and server.stats()["connections"] == 0
            silent.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_idle_keep_alive_is_closed_but_a_stream_is_not():
    async def main():
        server, port = await serve(Limits(header_timeout_s=5, idle_timeout_s=0.3))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in await reader.readuntil(b"}")
            assert await closed_by_server(reader, 2.0)
            assert server.closed["idle_timeout"] == 1
            # A stream that is silent for longer than idle_timeout between chunks stays open.
            data = await exchange(port, b"GET /ticks HTTP/1.1\r\nHost: x\r\n\r\n")
            assert all(f"tick {n}".encode() in data for n in range(3))
            assert server.closed["idle_timeout"] == 1
        finally:
            await server.close()

    asyncio.run(main())


def test_over_the_cap_the_longest_waiting_connection_makes_room():
    async def main():
        server, port = await serve(Limits(max_connections=10, max_connections_per_peer=3))
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            await asyncio.sleep(0.1)
            # A fourth client from the same address is served: the oldest silent one is closed for it.
            status, _, _ = split(await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            assert status == 200
            assert await closed_by_server(idle[0][0], 2.0)
            assert server.closed["evicted"] == 1
            # Busy connections (streams) are never evicted: when all are busy, the newcomer is closed at once.
            streams = []
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /ticks HTTP/1.1\r\nHost: x\r\n\r\n")
                await reader.readuntil(b"\r\n\r\n")
                streams.append((reader, writer))
            reader, _ = await asyncio.open_connection("127.0.0.1", port)
            assert await closed_by_server(reader, 1.0)
            assert server.closed["over_cap"] == 1
            for reader, _ in streams:
                assert b"tick 2" in await reader.read()
        finally:
            await server.close()

    asyncio.run(main())


ACCEPT_ERRORS = textwrap.dedent("""
    import asyncio, json, logging, os, resource, sys
    from ksift.interfaces.http import HttpServer, Limits, Request, json_response

    async def app(request: Request):
        return json_response({"ok": True})

    async def main():
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
        server = HttpServer(app, Limits(max_connections=10_000, max_connections_per_peer=10_000,
                                        accept_pause_s=0.1, accept_log_interval_s=60))
        _, port = server.listen_tcp("127.0.0.1", 0)
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 10, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the flood is over
        await asyncio.sleep(1.0)
        print(json.dumps(server.stats()), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the last request was answered
        await server.close()

    asyncio.run(main())
""")


def test_accept_errors_are_counted_logged_once_and_do_not_spin(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", ACCEPT_ERRORS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        time.sleep(1.5)  # the child runs out of fds and keeps failing to accept the rest
        cpu = _cpu_seconds(child.pid)
        time.sleep(1.0)
        assert _cpu_seconds(child.pid) - cpu < 0.5  # paused, not spinning on a readable listener
        for sock in flood:
            sock.close()
        child.stdin.write("\n")
        child.stdin.flush()
        stats = json.loads(child.stdout.readline())
        assert stats["accept_errors"].get("EMFILE", 0) > 1
        # Once fds are free again it serves.
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b'{"ok":true}' in sock.recv(4096)
        child.stdin.write("\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=DEADLINE_S)
    finally:
        child.kill()
    warnings = [line for line in err.splitlines() if "cannot accept" in line]
    assert len(warnings) == 1 and "Too many open files" in warnings[0], err
    assert "Traceback" not in err


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks (USER_HZ = 100)


# -- fuzzing: query strings and raw bytes against the real API (issue 16 section 4) ----------------

class LiveApi:
    """The real ApiServer (store, every route, auth off) in a loop of its own thread, for blocking clients."""

    def __init__(self, tmp_path):
        from ksift.interfaces.api import ApiServer
        from ksift.interfaces.settings import parse_api
        from ksift.store.sqlite import AlertStore

        self.store = AlertStore(tmp_path / "alerts.db")
        self.api = ApiServer(parse_api({"listen": "127.0.0.1:0", "auth": "none", "header_timeout": "1s"}, "test"),
                             self.store)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.api.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(DEADLINE_S)
        self.port = int(self.api.addresses[0].rpartition(":")[2])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.api.stop(), self.loop).result(DEADLINE_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE_S)
        self.store.close()

    def raw(self, data: bytes) -> bytes:
        """Send data, end our side, read the answer until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    api = LiveApi(tmp_path_factory.mktemp("fuzz"))
    yield api
    api.close()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_PATHS = ["/api/v1/alerts", "/api/v1/alerts/a1", "/api/v1/incidents", "/api/v1/funnel", "/healthz", "/openapi.json",
          "/", "/nothing", "/api/v1/events"]
_NAMES = st.one_of(st.sampled_from(["rule", "severity", "status", "since", "limit", "token", ""]), st.text(max_size=8))
_VALUES = st.one_of(st.sampled_from(["warning", "open", "10m", "1", "0", "99999999999999999999", "", " ", "nan",
                                     "2026-11-25T12:00:00Z", "-1d"]), st.text(max_size=12))


@FUZZ
@given(path=st.sampled_from(_PATHS), params=st.lists(st.tuples(_NAMES, _VALUES), max_size=4))
def test_any_query_string_gets_json_and_never_a_500(live_api, path, params):
    query = urllib.parse.urlencode(params)
    status, headers, body = split(live_api.raw(
        f"GET {path}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()))
    assert status in (200, 400, 404, 503), (status, body)
    if status != 200 or headers["content-type"].startswith("application/json"):
        data = json.loads(body)
    if status == 400:
        name = data["parameter"]  # named as given, or as its repr when it is unprintable
        assert name in {n for n, _ in params} and (name in data["error"] or repr(name) in data["error"]), data
    elif status == 404:
        assert "no " in data["error"]


@FUZZ
@given(data=st.one_of(st.binary(max_size=600),
                      st.builds(lambda verb, target, rest: verb + b" " + target + b" HTTP/1.1\r\n" + rest,
                                st.sampled_from([b"GET", b"POST", b"HEAD", b"G\x00T", b""]),
                                st.binary(max_size=80), st.binary(max_size=300))))
def test_random_bytes_get_a_json_error_or_a_close_and_the_server_stays_up(live_api, data):
    answer = live_api.raw(data)
    if answer:
        status, headers, body = split(answer)
        assert status < 500, answer[:300]
        if status >= 400:
            assert "error" in json.loads(body), answer[:300]
    status, _, body = split(live_api.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 200 and json.loads(body) == {"status": "ok"}
