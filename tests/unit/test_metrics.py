"""Prometheus metrics: every family read from the agent at scrape time, with the right values."""

from __future__ import annotations

import time
from pathlib import Path

from agent_helpers import fork_storm_crossing, fork_storm_rules, plain_enricher
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ksift.agent import Agent
from ksift.config import AgentConfig
from ksift.interfaces.api import ApiServer
from ksift.interfaces.metrics import read_bpf_stats_enabled
from ksift.interfaces.settings import ApiSettings
from ksift.sensors.process import ProcessSensor
from ksift.transport.records import COMMON_COUNTER_NAMES


class FakeProgramStats:
    """Stands in for a loaded BpfObject's program_stats() (the kernel side is tested in tests/kernel)."""

    def __init__(self, stats=None, error=None):
        self.stats, self.error, self.attached = stats or {}, error, list((stats or {}).keys())

    def program_stats(self):
        if self.error:
            raise self.error
        return self.stats


class BrokenSink:
    name = "webhook"
    delivered = 4
    failed = 2

    def emit(self, alert):
        pass

    def close(self):
        pass


def build(bpf_stats: bool = False, obj=None):
    config, rules = AgentConfig(), fork_storm_rules()
    # A real sensor object, never started: the metrics only read its name, counter names and obj.
    sensor = ProcessSensor(None, Path("/nonexistent"), config, 1, rules)
    sensor.obj = obj
    api = ApiServer(ApiSettings(), None, version="9.9.9", bpf_stats_enabled=lambda: bpf_stats)
    agent = Agent(config, rules, [sensor], plain_enricher(), [BrokenSink(), api])
    return agent, api


def scrape(api: ApiServer) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(api.registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def alert(status: str, rule: str = "fork_storm", severity: str = "warning") -> dict:
    return {"id": f"{status}-{time.monotonic_ns()}", "status": status, "rule": rule, "severity": severity}


def open_incident(agent: Agent, pid: int) -> None:
    agent.engine.observe(fork_storm_crossing(pid, count=60))


def test_families_and_values_come_from_the_agent():
    agent, api = build()
    counters = {name: 0 for name in COMMON_COUNTER_NAMES + ProcessSensor.counter_names}
    counters.update(fork_seen=10_000, rb_emitted=12, rb_dropped=1, rb_wakeups=3, map_full=2)
    agent.funnel.kernel["process"] = counters  # what a tick copies from the BPF counters
    agent.funnel.records_read, agent.funnel.records_failed = 12, 1
    agent.funnel.records_malformed, agent.funnel.records_discarded = 2, 5
    agent.funnel.ticks = 7
    for a in (alert("open"), alert("open"), alert("resolved"), alert("open", "oom_kill", "critical")):
        api.emit(a)
    open_incident(agent, 101)
    open_incident(agent, 102)

    s = scrape(api)
    assert value(s, "ksift_build_info", version="9.9.9") == 1
    assert value(s, "ksift_agent_ready") == 0
    assert value(s, "ksift_agent_ticks_total") == 7
    assert value(s, "ksift_kernel_events_total", sensor="process", counter="fork_seen") == 10_000
    # Common ring-buffer slots have their own families, not kernel_events.
    assert ("ksift_kernel_events_total", frozenset({"sensor": "process", "counter": "rb_emitted"}.items())) not in s
    assert value(s, "ksift_ringbuf_records_emitted_total", sensor="process") == 12
    assert value(s, "ksift_ringbuf_records_dropped_total", sensor="process") == 1
    assert value(s, "ksift_ringbuf_wakeups_total", sensor="process") == 3
    assert value(s, "ksift_kernel_map_full_total", sensor="process") == 2
    assert value(s, "ksift_records_read_total") == 12
    assert value(s, "ksift_records_decoded_total") == 11
    assert value(s, "ksift_records_malformed_total") == 2
    assert value(s, "ksift_records_discarded_total") == 5
    assert value(s, "ksift_records_failed_total") == 1
    assert value(s, "ksift_alerts_opened_total", rule="fork_storm", severity="warning") == 2
    assert value(s, "ksift_alerts_resolved_total", rule="fork_storm", severity="warning") == 1
    assert value(s, "ksift_alerts_opened_total", rule="oom_kill", severity="critical") == 1
    assert value(s, "ksift_alerts_resolved_total", rule="oom_kill", severity="critical") == 0
    assert value(s, "ksift_incidents_open", rule="fork_storm", severity="warning") == 2
    assert value(s, "ksift_engine_events_total", event="opened") == 2
    assert value(s, "ksift_sink_alerts_delivered_total", sink="api") == 4
    assert value(s, "ksift_sink_alerts_delivered_total", sink="webhook") == 4
    assert value(s, "ksift_sink_alerts_failed_total", sink="webhook") == 2
    assert value(s, "ksift_sse_clients") == 0 and value(s, "ksift_sse_events_published_total") == 4
    assert value(s, "ksift_process_cpu_seconds_total") > 0
    assert value(s, "ksift_process_resident_memory_bytes") > 1_000_000
    # bpf_stats_enabled is off: no run-time figures, and the reason is visible.
    assert value(s, "ksift_bpf_stats_enabled") == 0
    assert not any(name.startswith("ksift_bpf_program_") for name, _ in s)


def test_values_are_read_at_scrape_time():
    agent, api = build()
    assert value(scrape(api), "ksift_alerts_opened_total", rule="fork_storm", severity="warning") == 0
    api.emit(alert("open"))
    agent.funnel.records_read = 3
    s = scrape(api)
    assert value(s, "ksift_alerts_opened_total", rule="fork_storm", severity="warning") == 1
    assert value(s, "ksift_records_read_total") == 3


def test_bpf_program_run_time_when_the_kernel_counts_it():
    stats = {"ks_fork": (2_500_000_000, 1_000_000), "ks_exit": (1_000, 10)}
    agent, api = build(bpf_stats=True, obj=FakeProgramStats(stats))
    s = scrape(api)
    assert value(s, "ksift_bpf_stats_enabled") == 1
    assert value(s, "ksift_bpf_program_run_time_seconds_total", sensor="process", program="ks_fork") == 2.5
    assert value(s, "ksift_bpf_program_runs_total", sensor="process", program="ks_fork") == 1_000_000
    assert value(s, "ksift_bpf_program_runs_total", sensor="process", program="ks_exit") == 10


def test_one_failing_part_does_not_cost_the_scrape():
    agent, api = build(bpf_stats=True, obj=FakeProgramStats(error=OSError(9, "bad fd")))
    api.emit(alert("open"))
    s = scrape(api)
    assert value(s, "ksift_alerts_opened_total", rule="fork_storm", severity="warning") == 1
    assert value(s, "ksift_process_cpu_seconds_total") > 0


def test_each_agent_has_its_own_registry():
    agent_a, api_a = build()
    agent_b, api_b = build()
    api_a.emit(alert("open"))
    assert api_a.registry is not api_b.registry
    assert value(scrape(api_a), "ksift_alerts_opened_total", rule="fork_storm", severity="warning") == 1
    assert value(scrape(api_b), "ksift_alerts_opened_total", rule="fork_storm", severity="warning") == 0


def test_bpf_stats_sysctl_is_only_read(tmp_path):
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("1\n")
    assert read_bpf_stats_enabled(str(sysctl)) is True
    sysctl.write_text("0\n")
    assert read_bpf_stats_enabled(str(sysctl)) is False
    assert read_bpf_stats_enabled(str(tmp_path / "missing")) is False
    assert sysctl.read_text() == "0\n"


class CountingSink(BrokenSink):
    name = "alertmanager"

    def counters(self):
        return {"delivered": 4, "failed": 2, "retried": 7, "gave_up": 1, "note": "not a number"}


def test_other_sink_counters_are_exported_by_event():
    config, rules = AgentConfig(), fork_storm_rules()
    api = ApiServer(ApiSettings(), None, version="9.9.9", bpf_stats_enabled=lambda: False)
    Agent(config, rules, [], plain_enricher(), [CountingSink(), api])
    samples = scrape(api)
    assert value(samples, "ksift_sink_events_total", sink="alertmanager", event="retried") == 7
    assert value(samples, "ksift_sink_events_total", sink="alertmanager", event="gave_up") == 1
    # delivered/failed have their own families; non-numbers are not metrics
    assert ("ksift_sink_events_total", frozenset({"sink": "alertmanager", "event": "delivered"}.items())) \
        not in samples
    assert not any(labels and ("event", "note") in labels for _, labels in samples)


def test_degraded_alerts_and_attached_programs():
    agent, api = build(obj=FakeProgramStats({"ks_fork": (0, 0), "ks_exit": (0, 0)}))
    s = scrape(api)
    # Every enabled rule starts at 0, so increase() works from the first degraded alert on.
    assert value(s, "ksift_alerts_degraded_total", rule="fork_storm", severity="warning") == 0
    assert value(s, "ksift_bpf_programs_attached", sensor="process") == 2
    api.emit(dict(alert("open"), degraded={"records_lost": 3, "reason": "ring buffer full"}))
    api.emit(dict(alert("resolved"), degraded={"records_lost": 3, "reason": "ring buffer full"}))
    api.emit(dict(alert("open"), degraded=None))
    s = scrape(api)
    assert value(s, "ksift_alerts_degraded_total", rule="fork_storm", severity="warning") == 2
    assert value(s, "ksift_alerts_opened_total", rule="fork_storm", severity="warning") == 2
    agent.sensors[0].obj = None  # e.g. closed: nothing attached any more
    assert value(scrape(api), "ksift_bpf_programs_attached", sensor="process") == 0


def test_an_alert_sent_again_is_not_counted_twice():
    from alert_factory import make_alert

    config, rules = AgentConfig(), fork_storm_rules()
    api = ApiServer(ApiSettings(), None, version="9.9.9", bpf_stats_enabled=lambda: False)
    Agent(config, rules, [], plain_enricher(), [api])
    alert = make_alert(rule="fork_storm", status="open", severity="warning")
    api.emit(alert)
    api.emit(dict(alert, remediation={"status": "done"}))  # the same alert, its decision changed
    assert api.alert_counts[("open", "fork_storm", "warning")] == 1


def test_ready_gauge_is_0_while_a_sink_reports_a_problem_as_readyz_says():
    agent, api = build()
    agent.ready = True
    assert value(scrape(api), "ksift_agent_ready") == 1
    agent.sinks[0].problem = lambda: "alert store not writable, alerts are not saved: disk I/O error"
    assert value(scrape(api), "ksift_agent_ready") == 0
    assert agent.view.sink_problems() == ["sink webhook: alert store not writable, alerts are not saved: "
                                          "disk I/O error"]
