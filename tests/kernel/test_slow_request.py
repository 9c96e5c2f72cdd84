"""Slow requests end to end: a real HTTP server on loopback, the real BPF object, the real agent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from harness import (
    assert_released,
    owned_bpf_ids,
    packaged_rule,
    program_names,
    run_workload_script,
    start_agent,
    wait_for,
    workload_command,
    write_rules,
)

SERVER = "slow_http_server.py"
REQ_PROGRAMS = {"ks_req_state", "ks_req_recv", "ks_req_send"}


def rules_file(tmp_path: Path, threshold: int | None = None, enabled: bool = True) -> Path:
    """The packaged slow_request rule alone (its threshold overridden when a test says so)."""
    overrides = {"enabled": enabled} if threshold is None else {"enabled": enabled, "threshold": threshold}
    return write_rules(tmp_path / "rules.toml", packaged_rule("slow_request", **overrides))


class HttpServer:
    """tests/workloads/slow_http_server.py serve (or raw-serve), stopped by closing its stdin."""

    def __init__(self, *args: str):
        self.args = args or ("serve", "--comm", "ks-httpd")

    def __enter__(self) -> "HttpServer":
        self.proc = subprocess.Popen(workload_command(SERVER, *self.args),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline())
        self.pid, self.port = hello["pid"], hello["port"]
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_client(port: int, host: str = "127.0.0.1", **plan: float) -> dict:
    args: list[object] = ["client", "--host", host, "--port", port]
    for name, value in plan.items():
        args += [f"--{name.replace('_', '-')}", value]
    return run_workload_script(SERVER, *args, timeout=120)


def alerts_of(agent, pid: int) -> list[dict]:
    """Alerts whose subject is pid; a line still being written is read on the next try."""
    lines = agent.stdout_path.read_text().splitlines()
    out = []
    for line in lines:
        try:
            alert = json.loads(line)
        except ValueError:
            continue
        if alert["subject"]["pid"] == pid:
            out.append(alert)
    return out


def wait_for_open(agent, pid: int, timeout: float = 30.0) -> list[dict]:
    return wait_for(f"an open alert for pid {pid}", lambda: [a for a in alerts_of(agent, pid) if a["status"] == "open"],
                    timeout, proc=agent.proc, log=agent.stderr_path, interval=0.1)


def test_slow_endpoint_gives_one_alert_with_the_request(tmp_path):
    agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path)))
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    with HttpServer() as server:
        # Keep-alive and one request per connection; the client thinks 0.6 s between
        # requests on its keep-alive connection, which would look like slow requests
        # if its own (connected, not accepted) socket were ever tracked.
        work = run_client(server.port, keepalive_fast=4, new_fast=10, keepalive_slow=1, new_slow=2, think=0.6)
        assert work["statuses"] == [200] * 17 and work["keepalive_reused"]
        wait_for_open(agent, server.pid)
    assert agent.terminate() == 0, agent.stderr()

    alerts = alerts_of(agent, server.pid)
    assert [a["status"] for a in alerts] == ["open"], alerts
    (alert,) = alerts
    assert alert["rule"] == "slow_request"
    assert alert["subject"]["comm"] == "ks-httpd" and alert["subject"]["ppid"] == os.getpid()
    d = alert["details"]
    assert (d["method"], d["path"]) == ("GET", "/api/orders")
    assert d["duration_ms"] >= 800
    assert d["local"] == f"127.0.0.1:{server.port}" and d["peer"].startswith("127.0.0.1:")
    # Everything the client sent fell in one 10 s window (it takes about 5 s).
    assert (d["slow_requests"], d["requests"]) == (work["slow"], work["requests"]) == (3, 17)
    assert (d["slow_total"], d["requests_total"]) == (3, 17)
    assert sum(b["count"] for b in d["histogram"]) == 17
    assert sum(b["count"] for b in d["histogram"] if b["le_ms"] is None or b["le_ms"] > 500) == 3
    assert d["max_ms"] >= 800 and d["latency_ms"] == 500
    assert alert["summary"].startswith("GET /api/orders took ")
    assert alert["summary"].endswith(f"ms in PID {server.pid} (ks-httpd): 3 of 17 requests over 500 ms "
                                     "in the last 10s"), alert["summary"]
    assert alert["count"] == 3 and alert["threshold"] == 2

    # The client side is never a request.
    assert alerts_of(agent, work["pid"]) == []
    kernel = agent.stats()["kernel"]["request"]
    assert kernel["req_conn_accepted"] >= 13  # one keep-alive connection and 12 single-request ones
    assert kernel["req_done"] >= 17 and kernel["req_slow"] >= 3
    assert kernel["rb_dropped"] == 0 and agent.stats()["transport"]["malformed"] == 0
    assert_released(held)


def test_only_fast_requests_give_no_alert(tmp_path):
    agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path)))
    agent.wait_ready()
    with HttpServer() as server:
        work = run_client(server.port, keepalive_fast=10, new_fast=10)
        assert work["statuses"] == [200] * 20
    assert agent.terminate() == 0, agent.stderr()

    assert alerts_of(agent, server.pid) == [] and alerts_of(agent, work["pid"]) == []
    kernel = agent.stats()["kernel"]["request"]
    assert kernel["req_done"] >= 20  # it was watching, and it measured them


def test_slow_requests_at_the_threshold_give_no_alert(tmp_path):
    # The packaged threshold is 2: two slow requests in a window are not more than it.
    agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path)))
    agent.wait_ready()
    with HttpServer() as server:
        work = run_client(server.port, new_fast=3, new_slow=2)
        assert work["statuses"] == [200] * 5
    assert agent.terminate() == 0, agent.stderr()

    assert alerts_of(agent, server.pid) == []
    kernel = agent.stats()["kernel"]["request"]
    assert kernel["req_slow"] >= 2 and kernel["req_done"] >= 5


def test_client_side_is_never_the_subject(tmp_path):
    # Threshold 0: the first slow request alerts. The client reads each response,
    # thinks 0.8 s and writes the next request: three "slow requests" if a
    # connection it made were taken for one it accepted.
    agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path, threshold=0)))
    agent.wait_ready()
    with HttpServer() as server:
        work = run_client(server.port, keepalive_fast=4, think=0.8, new_slow=1)
        assert work["statuses"] == [200] * 5 and work["keepalive_reused"]
        wait_for_open(agent, server.pid)  # the rule is live: the server's one slow request alerts
    assert agent.terminate() == 0, agent.stderr()

    assert alerts_of(agent, work["pid"]) == []
    (alert,) = alerts_of(agent, server.pid)
    assert alert["details"]["path"] == "/api/orders"
    assert (alert["details"]["slow_requests"], alert["details"]["requests"]) == (1, 5)


def test_request_line_is_found_behind_each_kind_of_read(tmp_path):
    # The kernel finds the request's bytes from the syscall's registers: read(2) and
    # recvfrom(2) pass the buffer, readv(2) an iovec, recvmsg(2) a msghdr. IPv6 too.
    calls = {"recv": "127.0.0.1", "read": "127.0.0.1", "readv": "::1", "recvmsg": "::1"}
    agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path, threshold=0)))
    agent.wait_ready()
    seen = {}
    for call, host in calls.items():
        with HttpServer("raw-serve", "--read-call", call, "--host", host, "--comm", f"ks-raw-{call}") as server:
            work = run_client(server.port, host=host, new_fast=1, new_slow=1)
            assert work["statuses"] == [200, 200]
            seen[call] = (server.pid, server.port, wait_for_open(agent, server.pid))
    assert agent.terminate() == 0, agent.stderr()

    for call, (pid, port, (alert, *more)) in seen.items():
        assert more == [], f"{call}: more than one open alert"
        d = alert["details"]
        assert (d["method"], d["path"]) == ("GET", "/api/orders"), (call, d)
        assert d["duration_ms"] >= 800 and (d["slow_requests"], d["requests"]) == (1, 2)
        assert alert["subject"]["comm"] == f"ks-raw-{call}"
        local = f"[::1]:{port}" if calls[call] == "::1" else f"127.0.0.1:{port}"
        assert d["local"] == local and d["peer"].rsplit(":", 1)[0] == local.rsplit(":", 1)[0], (call, d)
    assert agent.stats()["kernel"]["request"]["req_head_missed"] == 0


def test_hooks_are_attached_only_while_the_rule_is_enabled(tmp_path):
    off = start_agent(tmp_path / "off", "--rules", str(rules_file(tmp_path, enabled=False)))
    off.wait_ready()
    progs, links = owned_bpf_ids(off.proc.pid)
    assert not (program_names(progs) & REQ_PROGRAMS), "a disabled rule attached request hooks"
    assert "sensor request" not in off.stderr()
    assert off.terminate() == 0, off.stderr()

    on = start_agent(tmp_path / "on", "--rules", str(rules_file(tmp_path, enabled=True)))
    on.wait_ready()
    held = owned_bpf_ids(on.proc.pid)
    assert program_names(held[0]) == REQ_PROGRAMS | {"ks_exec"}  # with the core object's exec hook
    assert len(held[1]) == 4, f"expected 4 links, got {held[1]}"
    assert on.terminate() == 0, on.stderr()
    assert_released(held)
