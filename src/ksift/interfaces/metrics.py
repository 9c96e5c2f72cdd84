"""Prometheus metrics, read from the running agent at scrape time.

Nothing here counts on its own: a scrape reads the funnel the agent already
keeps (kernel counters from the last tick, transport, rules, sinks), the API
sink's per-rule alert counts and, when the host has kernel.bpf_stats_enabled
on, each BPF program's run time and run count. Each agent gets its own
registry, so two agents in one process (tests) never share a metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ksift.transport.records import COMMON_COUNTER_NAMES

if TYPE_CHECKING:
    from ksift.agent import AgentView

log = logging.getLogger("ksift.metrics")

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
NS = 1e9


def read_bpf_stats_enabled(path: str = BPF_STATS_SYSCTL) -> bool:
    """Whether the kernel is counting BPF run time (sysctl kernel.bpf_stats_enabled)."""
    try:
        return Path(path).read_text().strip() == "1"
    except OSError:
        return False


class AgentCollector(Collector):
    """A custom collector: every value comes from the agent when Prometheus asks."""

    def __init__(self, agent: AgentView, alert_counts: Callable[[], dict[tuple[str, str, str], int]],
                 sse_stats: Callable[[], dict[str, int]] | None = None, version: str = "unknown",
                 bpf_stats_enabled: Callable[[], bool] = read_bpf_stats_enabled,
                 server_stats: Callable[[], dict] | None = None):
        self.agent = agent
        self.server_stats = server_stats
        self.alert_counts = alert_counts  # (kind, rule, severity) -> alerts, counted by the API sink
        self.sse_stats = sse_stats
        self.version = version
        self.bpf_stats_enabled = bpf_stats_enabled
        self._report: dict = {}  # the funnel as read at the start of the current scrape

    def collect(self) -> Iterator[Metric]:
        # One read of the funnel per scrape (the kernel counters are read now, not kept fresh).
        try:
            self._report = self.agent.funnel_report()
        except Exception:
            log.exception("metrics: reading the funnel failed")
            self._report = {}
        # One failing part must not cost the whole scrape: log it and serve the rest.
        for part in (self._agent, self._kernel, self._transport, self._rules, self._sinks, self._sse,
                     self._server, self._bpf_programs, self._sensor_metrics):
            try:
                yield from part()
            except Exception:
                log.exception("metrics: reading %s failed", part.__name__.lstrip("_"))

    # -- parts ---------------------------------------------------------------

    def _agent(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("ksift_build_info", "ksift version (always 1)", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        # As /readyz: a sink that cannot do its job (an alert store refusing writes) makes it 0 too.
        ready = self.agent.ready and not self.agent.sink_problems()
        yield GaugeMetricFamily("ksift_agent_ready", "1 while the loop runs with every sensor attached and no sink "
                                "reports a problem (GET /readyz says which)", value=1 if ready else 0)
        yield CounterMetricFamily("ksift_agent_ticks", "agent housekeeping runs (at most one per tick)",
                                  value=self._report.get("ticks", 0))

    def _kernel(self) -> Iterator[Metric]:
        events = CounterMetricFamily("ksift_kernel_events", "events the sensor's BPF programs counted, by counter",
                                     labels=["sensor", "counter"])
        emitted = CounterMetricFamily("ksift_ringbuf_records_emitted", "records the kernel put in the ring buffer",
                                      labels=["sensor"])
        dropped = CounterMetricFamily("ksift_ringbuf_records_dropped",
                                      "records lost because the ring buffer was full", labels=["sensor"])
        wakeups = CounterMetricFamily("ksift_ringbuf_wakeups", "forced ring-buffer wake-ups", labels=["sensor"])
        map_full = CounterMetricFamily("ksift_kernel_map_full", "updates refused by a full BPF map",
                                       labels=["sensor"])
        common = {"rb_emitted": emitted, "rb_dropped": dropped, "rb_wakeups": wakeups, "map_full": map_full}
        kernel = self._report.get("kernel", {})
        for sensor in self.agent.sensors():
            counters = kernel.get(sensor.name, {})
            for name in COMMON_COUNTER_NAMES:
                common[name].add_metric([sensor.name], counters.get(name, 0))
            for name in sensor.counter_names:
                events.add_metric([sensor.name, name], counters.get(name, 0))
        yield events
        yield from common.values()

    def _transport(self) -> Iterator[Metric]:
        t = self._report.get("transport", {})
        yield CounterMetricFamily("ksift_transport_records_emitted",
                                  "records every BPF object put in the shared ring buffer",
                                  value=t.get("kernel_emitted", 0))
        yield CounterMetricFamily("ksift_transport_records_dropped",
                                  "records any BPF object lost because the shared ring buffer was full",
                                  value=t.get("kernel_dropped", 0))
        yield CounterMetricFamily("ksift_records_read", "well-formed records read from the ring buffer",
                                  value=t.get("records_read", 0))
        yield CounterMetricFamily("ksift_records_decoded", "records read and handled (read minus failed)",
                                  value=max(t.get("records_read", 0) - t.get("failed", 0), 0))
        yield CounterMetricFamily("ksift_records_discarded", "records the kernel discarded after reserving",
                                  value=t.get("discarded", 0))
        yield CounterMetricFamily("ksift_records_malformed", "records with a bad length or type, skipped",
                                  value=t.get("malformed", 0) + t.get("unknown_type", 0))
        yield CounterMetricFamily("ksift_records_failed", "records that could not be decoded or handled",
                                  value=t.get("failed", 0))

    def _rules(self) -> Iterator[Metric]:
        severities = {rule.name: str(rule.severity) for rule in self.agent.rules.enabled()}
        counts = self.alert_counts()
        # Every enabled rule (and any rule seen) shows in both families from the start, at 0,
        # so rate() and increase() work from the first alert on.
        labels = set(severities.items()) | {(rule, sev) for (_, rule, sev) in counts}
        for kind, metric_name, what in (("open", "ksift_alerts_opened", "alerts with status open"),
                                        ("resolved", "ksift_alerts_resolved", "alerts with status resolved"),
                                        ("degraded", "ksift_alerts_degraded",
                                         "alerts sent with records lost while their incident was open")):
            family = CounterMetricFamily(metric_name, f"{what}, by rule", labels=["rule", "severity"])
            per_label = dict.fromkeys(labels, 0)
            for (k, rule, sev), n in counts.items():
                if k == kind:
                    per_label[(rule, sev)] = per_label.get((rule, sev), 0) + n
            for (rule, sev), n in sorted(per_label.items()):
                family.add_metric([rule, sev], n)
            yield family
        open_now = GaugeMetricFamily("ksift_incidents_open", "incidents open now, by rule", labels=["rule", "severity"])
        per_rule = {(rule, sev): 0 for rule, sev in severities.items()}
        for incident in self.agent.open_incidents():
            label = (incident.rule.name, str(incident.rule.severity))
            per_rule[label] = per_rule.get(label, 0) + 1
        for label, n in sorted(per_rule.items()):
            open_now.add_metric(list(label), n)
        yield open_now
        engine = CounterMetricFamily("ksift_engine_events", "what the incident engine did with crossings",
                                     labels=["event"])
        for name, n in sorted(self.agent.engine_stats().items()):
            engine.add_metric([name], n)
        yield engine

    def _sinks(self) -> Iterator[Metric]:
        delivered = CounterMetricFamily("ksift_sink_alerts_delivered", "alerts a sink handed over", labels=["sink"])
        failed = CounterMetricFamily("ksift_sink_alerts_failed", "alerts a sink lost to an error", labels=["sink"])
        # What else a sink counts: retries, give-ups and queue drops of network sinks,
        # remediation's decisions by status.
        other = CounterMetricFamily("ksift_sink_events", "other outcomes a sink counts, by sink and event",
                                    labels=["sink", "event"])
        for name, counters in self.agent.sink_counters().items():
            delivered.add_metric([name], counters.get("delivered", 0))
            failed.add_metric([name], counters.get("failed", 0))
            for event, n in sorted(counters.items()):
                if event not in ("delivered", "failed") and isinstance(n, int):
                    other.add_metric([name, event], n)
        yield delivered
        yield failed
        yield other

    def _sse(self) -> Iterator[Metric]:
        if self.sse_stats is None:
            return
        stats = self.sse_stats()
        yield GaugeMetricFamily("ksift_sse_clients", "clients connected to /api/v1/events", value=stats["clients"])
        yield CounterMetricFamily("ksift_sse_events_published", "events published to the SSE stream",
                                  value=stats["published"])
        yield CounterMetricFamily("ksift_sse_events_lost", "SSE events a slow client lost (its queue was full)",
                                  value=stats["lost"])

    def _server(self) -> Iterator[Metric]:
        if self.server_stats is None:
            return
        stats = self.server_stats()
        yield GaugeMetricFamily("ksift_api_connections", "connections open to the API now",
                                value=stats["connections"])
        yield GaugeMetricFamily("ksift_api_connections_max", "connections the API holds at most",
                                value=stats["max_connections"])
        closed = CounterMetricFamily("ksift_api_connections_closed", "connections the API closed on its own, by reason",
                                     labels=["reason"])
        for reason, n in sorted(stats["closed"].items()):
            closed.add_metric([reason], n)
        yield closed
        errors = CounterMetricFamily("ksift_api_accept_errors", "failed accepts of API connections, by errno",
                                     labels=["errno"])
        for name, n in sorted(stats["accept_errors"].items()):
            errors.add_metric([name], n)
        yield errors

    def _sensor_metrics(self) -> Iterator[Metric]:
        """What sensors read at scrape time (the pressure sensor: each watched cgroup's pressure)."""
        for kind, name, doc, labels, samples in self.agent.scrape_metrics():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=list(labels))
            for values, value in samples:
                family.add_metric(list(values), value)
            yield family

    def _bpf_programs(self) -> Iterator[Metric]:
        attached = GaugeMetricFamily("ksift_bpf_programs_attached", "BPF programs the sensor has attached now",
                                     labels=["sensor"])
        for sensor in self.agent.sensors():
            if sensor.object_file:  # the pressure sensor has no BPF object (PSI triggers)
                attached.add_metric([sensor.name], len(sensor.attached))
        yield attached
        enabled = self.bpf_stats_enabled()
        yield GaugeMetricFamily("ksift_bpf_stats_enabled",
                                "1 when kernel.bpf_stats_enabled is on (BPF program run time is counted)",
                                value=1 if enabled else 0)
        if not enabled:
            return  # the kernel counts nothing then: zeros would read as "free"
        run_time = CounterMetricFamily("ksift_bpf_program_run_time_seconds", "time spent in the BPF program",
                                       labels=["sensor", "program"])
        runs = CounterMetricFamily("ksift_bpf_program_runs", "times the BPF program ran",
                                   labels=["sensor", "program"])
        for sensor in self.agent.sensors():
            if not sensor.attached:
                continue
            for program, (ns, count) in sorted(sensor.program_stats().items()):
                run_time.add_metric([sensor.name, program], ns / NS)
                runs.add_metric([sensor.name, program], count)
        yield run_time
        yield runs


def build_registry(agent: AgentView, alert_counts: Callable[[], dict[tuple[str, str, str], int]],
                   sse_stats: Callable[[], dict[str, int]] | None = None, version: str = "unknown",
                   bpf_stats_enabled: Callable[[], bool] = read_bpf_stats_enabled,
                   process_metrics: bool = True, server_stats: Callable[[], dict] | None = None) -> CollectorRegistry:
    """A registry of this agent's metrics (no global state), plus its own CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent, alert_counts, sse_stats, version, bpf_stats_enabled, server_stats))
    if process_metrics:
        # ksift_process_cpu_seconds_total, ksift_process_resident_memory_bytes, ...
        ProcessCollector(namespace="ksift", registry=registry)
    return registry
