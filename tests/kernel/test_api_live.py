"""The HTTP API of a real agent: a real fork storm reaches /api/v1/alerts, the SSE stream and /metrics."""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

from harness import free_port, packaged_rule, run_forker_retried, start_agent, wait_for, wait_http_ok, write_rules
from prometheus_client import generate_latest

from ksift.agent import Agent
from ksift.config import AgentConfig
from ksift.enrich.cgroup import CgroupResolver
from ksift.enrich.context import Enricher
from ksift.enrich.procfs import ProcFS
from ksift.interfaces.api import ApiServer
from ksift.interfaces.settings import ApiSettings
from ksift.loader.libbpf import Libbpf
from ksift.rules.parse import load_rules
from ksift.sensors.base import default_objects_dir
from ksift.sensors.registry import build_sensors

DEADLINE_S = 30.0
BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


def rules_file(tmp_path: Path) -> Path:
    # The packaged rule's defaults, alone, so no other sensor loads.
    return write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text, labels matched exactly (any order)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_:]+)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


class SseReader(threading.Thread):
    """Reads /api/v1/events in the background and keeps every parsed event."""

    def __init__(self, host: str, port: int, token: str):
        super().__init__(daemon=True)
        self.token = token
        self.conn = http.client.HTTPConnection(host, port, timeout=DEADLINE_S)
        self.events: list[tuple[str, dict]] = []
        self.connected = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.conn.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {self.token}"})
            response = self.conn.getresponse()
            assert response.status == 200, response.status
            self.connected.set()
            fields: dict[str, str] = {}
            for raw in response:
                line = raw.decode().rstrip("\n")
                if not line:
                    if "event" in fields:
                        self.events.append((fields["event"], json.loads(fields["data"])))
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value.lstrip(" ")
        except Exception as exc:  # the agent stopping ends the stream; anything else is kept for the test
            self.error = exc

    def close(self) -> None:
        self.conn.close()


def test_fork_storm_reaches_the_api_the_stream_and_the_metrics(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path)), api=f"127.0.0.1:{port}")
    try:
        agent.wait_ready()
        wait_http_ok(base + "/readyz", DEADLINE_S)
        # No [api] token configured: the agent made one next to its store, root only; root reads it.
        token = agent.api_token
        status = json.loads(get(base + "/api/v1/status", token)[1])
        [sensor] = status["sensors"]
        assert sensor["name"] == "process" and "ks_fork" in sensor["attached"]

        stream = SseReader("127.0.0.1", port, token)
        stream.start()
        assert stream.connected.wait(DEADLINE_S), stream.error

        work: dict = {}
        forker = threading.Thread(target=lambda: work.update(run_forker_retried(rate=200, seconds=4,
                                                                                comm="ks-apifork")))
        forker.start()

        def our_incident():
            incidents = json.loads(get(base + "/api/v1/incidents", token)[1])["incidents"]
            return [i for i in incidents if i["subject"]["comm"] == "ks-apifork"]

        incident = wait_for("the incident in /api/v1/incidents", our_incident, DEADLINE_S, interval=0.1)[0]
        assert incident["rule"] == "fork_storm" and incident["count"] > 50
        assert incident["ancestry"][0]["pid"] == os.getpid()  # the workload is this test's child
        pid = incident["subject"]["pid"]
        forker.join(timeout=60)
        assert work, "the workload did not finish"

        def stored(status_wanted: str):
            code, body = get(base + "/api/v1/alerts?rule=fork_storm&since=10m", token)
            assert code == 200, body
            return [a for a in json.loads(body)["alerts"]
                    if a["subject"]["pid"] == pid and a["status"] == status_wanted]

        [opened] = wait_for("the open alert in /api/v1/alerts", lambda: stored("open"), DEADLINE_S, interval=0.1)
        assert opened["summary"].startswith(f"PID {pid} (ks-apifork) forked ")
        code, body = get(base + f"/api/v1/alerts/{opened['id']}", token)
        assert code == 200 and json.loads(body)["incident_id"] == incident["incident_id"]

        def streamed(status_wanted: str):
            return [d for kind, d in list(stream.events)
                    if kind == "alert" and d["subject"]["pid"] == pid and d["status"] == status_wanted]

        [live] = wait_for("the open alert on the SSE stream", lambda: streamed("open"), DEADLINE_S, interval=0.1)
        assert live["id"] == opened["id"]
        wait_for("the resolution on the SSE stream", lambda: streamed("resolved"), DEADLINE_S, interval=0.1)

        # /metrics counts what this agent alerted: ours, plus any other storm on the host.
        text = get(base + "/metrics", token)[1].decode()
        opened_total = metric(text, "ksift_alerts_opened_total", rule="fork_storm", severity="warning")
        code, body = get(base + "/api/v1/alerts?rule=fork_storm&status=open&limit=10000", token)
        assert opened_total == len(json.loads(body)["alerts"]) >= 1
        assert metric(text, "ksift_alerts_resolved_total", rule="fork_storm", severity="warning") >= 1
        assert metric(text, "ksift_kernel_events_total", sensor="process", counter="fork_seen") >= work["forks"]
        assert metric(text, "ksift_ringbuf_records_dropped_total", sensor="process") == 0
        assert metric(text, "ksift_records_read_total") >= 1
        assert metric(text, "ksift_agent_ready") == 1
        assert metric(text, "ksift_process_resident_memory_bytes") > 0
        assert metric(text, "ksift_bpf_stats_enabled") in (0, 1)

        funnel = json.loads(get(base + "/api/v1/funnel", token)[1])
        # The funnel in one line: hundreds of forks in, a handful of records and one alert out.
        assert funnel["summary"]["kernel_events"] >= work["forks"]
        assert funnel["summary"]["records_read"] * 20 <= funnel["summary"]["kernel_events"]
        stream.close()
    finally:
        code = agent.terminate()
    assert code == 0, agent.stderr()
    # The listener is gone with the agent (SO_REUSEADDR: closed connections may linger in TIME_WAIT).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_port_in_use_is_one_clear_error_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path)), api=f"127.0.0.1:{port}")
        assert agent.wait(timeout=60) == 1
    errors = [line for line in agent.stderr().splitlines() if line.startswith("ksift: error:")]
    assert errors == [f"ksift: error: API cannot listen on 127.0.0.1:{port}: address already in use "
                      "(is another ksift running? choose another with [api] listen or --api HOST:PORT, "
                      "or --api off)"], agent.stderr()
    assert "Traceback" not in agent.stderr()


def test_bpf_program_run_time_is_read_from_the_kernel(tmp_path):
    # Turn the kernel's run-time accounting on for this test only, through BPF_ENABLE_STATS: it
    # lasts while the fd is open (even if the test dies), and ksift itself never does this.
    config, rules = AgentConfig(), load_rules(rules_file(tmp_path))
    lib = Libbpf()
    api = ApiServer(ApiSettings(), None, bpf_stats_enabled=lambda: True)
    agent = Agent(config, rules, build_sensors(lib, default_objects_dir(), config, rules),
                  Enricher(ProcFS(), CgroupResolver(None)), [api])
    enable_stats = lib.so.bpf_enable_stats
    enable_stats.restype, enable_stats.argtypes = ctypes.c_int, [ctypes.c_int]
    with agent:
        before = agent.sensors[0].obj.program_stats()["ks_fork"]
        stats_fd = enable_stats(BPF_STATS_RUN_TIME)
        assert stats_fd >= 0, f"BPF_ENABLE_STATS failed: {os.strerror(ctypes.get_errno())}"
        try:
            work = run_forker_retried(rate=100, seconds=1, comm="ks-statfork")
        finally:
            os.close(stats_fd)
        text = generate_latest(api.registry).decode()
    runs = metric(text, "ksift_bpf_program_runs_total", sensor="process", program="ks_fork")
    run_time = metric(text, "ksift_bpf_program_run_time_seconds_total", sensor="process", program="ks_fork")
    assert runs is not None and runs - before[1] >= work["forks"], (runs, before, work)
    assert run_time is not None and run_time > before[0] / 1e9
    assert metric(text, "ksift_bpf_program_runs_total", sensor="process", program="ks_exit") > 0
