"""The pressure sensor's pure parts: pressure files, triggers, settings, offenders, verdicts, words."""

from __future__ import annotations

import pytest
from records_helpers import unstarted_sensor

from ksift.errors import ConfigError
from ksift.events import TaskContext
from ksift.rules.incidents import NS, Crossing, IncidentEngine
from ksift.rules.model import Rule, Severity
from ksift.rules.parse import parse_rules
from ksift.sensors.pressure import PressureSensor
from ksift.sensors.psi import (
    PressureSettings,
    ProcUsage,
    Recent,
    Snapshot,
    Span,
    host_verdict,
    judge,
    open_summary,
    parse_cpu_list,
    parse_io_bytes,
    parse_pressure,
    parse_pressure_settings,
    parse_stat_usage,
    parse_throttled_ns,
    stalled_percent,
    trigger_text,
    usage_between,
)

PSI = ("some avg10=12.50 avg60=3.10 avg300=0.70 total=2093381\n"
       "full avg10=10.00 avg60=2.00 avg300=0.50 total=1442659\n")


def test_pressure_file_parses_both_lines():
    lines = parse_pressure(PSI)
    assert lines["some"].avg10 == 12.5 and lines["some"].total_us == 2093381
    assert lines["full"].total_us == 1442659


@pytest.mark.parametrize("text", ["some avg10=1 total", "some avg10=1 avg60=1 avg300=1", "full total=x avg10=1"])
def test_a_pressure_line_that_does_not_parse_is_named(text):
    with pytest.raises(ValueError, match="pressure line"):
        parse_pressure(text)


def test_trigger_is_the_share_of_the_window_nul_terminated():
    # The kernel overwrites the last byte written with NUL: ours must be one.
    assert trigger_text("some", 40, 10.0) == b"some 4000000 10000000\0"
    assert trigger_text("full", 25, 2.0) == b"full 500000 2000000\0"


def test_stalled_percent_from_two_totals():
    assert stalled_percent(1_000_000, 2_000_000, 2 * NS) == 50.0
    assert stalled_percent(0, 5_000_000, 2 * NS) == 100.0  # clamped
    assert stalled_percent(0, 1, 0) == 0.0


def test_settings_defaults_and_errors():
    assert parse_pressure_settings({}, "a.toml") == PressureSettings()
    s = parse_pressure_settings({"max_cgroups": 10, "rescan": "2s", "host": False,
                                 "cgroups": ["/system.slice/db.service/"]}, "a.toml")
    assert (s.max_cgroups, s.rescan_s, s.host, s.cgroups) == (10, 2.0, False, ("/system.slice/db.service",))
    with pytest.raises(ConfigError, match=r"pressure.cgroups: invalid cgroup path 'db.service'"):
        parse_pressure_settings({"cgroups": ["db.service"]}, "a.toml")
    with pytest.raises(ConfigError, match=r"pressure.rescan: invalid value '10ms'"):
        parse_pressure_settings({"rescan": "10ms"}, "a.toml")
    with pytest.raises(ConfigError, match=r"pressure.windows: unknown field"):
        parse_pressure_settings({"windows": 1}, "a.toml")


def test_proc_parsers():
    stat = (b"4242 (ks noisy) R 1 4242 4242 0 -1 4194304 100 0 0 0 700 50 0 0 20 0 1 0 123456 1000000 "
            b"2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0")
    assert parse_stat_usage(stat) == ("ks noisy", 1, 123456, 750, 2560, 1)
    assert parse_io_bytes("rchar: 5\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n") == 12288
    assert parse_throttled_ns("nr_periods 50\nnr_throttled 50\nthrottled_time 3974822357\n") == 3974822357
    assert parse_throttled_ns("usage_usec 10\nthrottled_usec 7\n") == 7000
    assert parse_throttled_ns("usage_usec 10\n") is None
    assert parse_cpu_list("0-2,5,7-8\n") == frozenset({0, 1, 2, 5, 7, 8})


def snap(resource: str, t_s: float, cgroups: dict[str, dict[int, tuple[int, int, int]]]) -> Snapshot:
    return Snapshot(resource, int(t_s * NS), {c: {pid: ProcUsage(start, f"p{pid}", value, cpu)
                                                 for pid, (start, value, cpu) in procs.items()}
                                             for c, procs in cgroups.items()})


def test_usage_between_ranks_cgroups_by_cpu_share_on_the_victims_cpus():
    before = snap("cpu", 10, {"/noisy": {10: (1, 0, 1), 11: (1, 0, 1)}, "/victim": {20: (1, 0, 1)},
                              "/other": {30: (1, 0, 0)}})
    after = snap("cpu", 12, {"/noisy": {10: (1, 150, 1), 11: (1, 100, 1)}, "/victim": {20: (1, 40, 1)},
                             "/other": {30: (1, 300, 0)}})
    ranked = usage_between(before, after, clock_ticks=100, cpus=frozenset({1}))
    assert [o.cgroup for o in ranked] == ["/noisy", "/victim"]  # /other ran on CPU 0 only
    noisy = ranked[0]
    assert noisy.processes == 2 and noisy.amount == pytest.approx(125.0)  # 250 ticks / 100 Hz / 2 s
    assert (noisy.hottest_pid, noisy.hottest_comm) == (10, "p10")
    assert [o.cgroup for o in usage_between(before, after, clock_ticks=100)][0] == "/other"


def test_a_recycled_pid_is_not_counted_as_usage_and_a_new_process_counts_from_its_start():
    before = snap("cpu", 10, {"/g": {10: (1, 500, 0)}})
    after = snap("cpu", 12, {"/g": {10: (2, 30, 0), 11: (1500, 20, 0)}})
    # pid 10 is another process now (start 2): unknown; pid 11 started after the first snapshot.
    [g] = usage_between(before, after, clock_ticks=100, boot_ticks_at_before=1000)
    assert g.processes == 1 and g.hottest_pid == 11


def test_memory_counts_growth_only():
    before = snap("memory", 0, {"/a": {1: (1, 100, 0)}, "/b": {2: (1, 900, 0)}})
    after = snap("memory", 2, {"/a": {1: (1, 600, 0)}, "/b": {2: (1, 100, 0)}})
    assert [(o.cgroup, o.amount) for o in usage_between(before, after)] == [("/a", 500.0)]


def offenders():
    before = snap("cpu", 0, {"/noisy": {1: (1, 0, 0)}, "/victim": {2: (1, 0, 0)}, "/": {3: (1, 0, 0)}})
    after = snap("cpu", 2, {"/noisy": {1: (1, 180, 0)}, "/victim": {2: (1, 20, 0)}, "/": {3: (1, 10, 0)}})
    return usage_between(before, after, clock_ticks=100)


def test_contention_names_the_others_first():
    v = judge("/victim", offenders())
    assert v.kind == "contention" and [o.cgroup for o in v.offenders] == ["/noisy", "/"]
    assert v.own.cgroup == "/victim"


def test_a_cgroup_that_used_the_most_itself_is_own():
    v = judge("/noisy", offenders())
    assert v.kind == "own" and [o.cgroup for o in v.offenders] == ["/victim", "/"]


def test_host_blames_every_cgroup():
    v = judge("/", offenders())
    assert v.kind == "contention" and v.offenders[0].cgroup == "/noisy" and v.own is None


def test_self_throttled_blames_no_neighbour_even_with_a_busy_one():
    v = judge("/victim", offenders(), throttled_ns=800_000_000, stalled_ns=1_000_000_000)
    assert v.kind == "self-throttled" and v.offenders == ()
    # Throttled a little while mostly waiting for others: contention.
    assert judge("/victim", offenders(), throttled_ns=100_000_000, stalled_ns=1_000_000_000).kind == "contention"


def test_memory_at_its_own_limit_is_self_limited():
    assert judge("/victim", offenders(), memory_used_share=0.99).kind == "self-limited"
    assert judge("/victim", offenders(), memory_used_share=0.5).kind == "contention"


def test_nobody_used_it_is_unknown():
    assert judge("/victim", []).kind == "unknown"


def test_sentences():
    base = {"cgroup": "/ksift-victim", "stalled_percent": 62.4, "span_s": 10.0}
    noisy = {"cgroup": "/ksift-noisy", "processes": 3, "amount": 190.0, "hottest_pid": 7, "hottest_comm": "burner",
             "hottest_exe": "/usr/bin/burner"}
    other = {"cgroup": "/", "processes": 1, "amount": 20.0, "hottest_pid": 1, "hottest_comm": "init"}
    text = open_summary("cpu", "some", {**base, "verdict": "contention", "offenders": [noisy, other]})
    assert text == ("CPU pressure: /ksift-victim stalled 62% of the last 10 s; top CPU users meanwhile: "
                    "/ksift-noisy (3 processes, 190% of a core, hottest: PID 7 (burner) /usr/bin/burner), "
                    "/ (1 process, 20% of a core: PID 1 (init))")
    text = open_summary("cpu", "some", {**base, "verdict": "self-throttled", "throttled_percent": 70})
    assert text.endswith("throttled by its own CPU quota for 70% of that time: self-throttled, no neighbour to blame")
    text = open_summary("memory", "full", {**base, "verdict": "self-limited",
                                           "memory_limit": {"limit_bytes": 64 << 20, "usage_bytes": 63 << 20}})
    assert text == ("Memory pressure: /ksift-victim stalled 62% of the last 10 s (all tasks at once) at its own "
                    "memory limit (64 MiB, 63 MiB used): self-limited, no neighbour to blame")
    assert open_summary("io", "full", {**base, "cgroup": "/", "verdict": "unknown"}).startswith(
        "I/O pressure: the host stalled 62%")


def test_the_host_stall_is_folded_into_the_cgroup_that_accounts_for_it():
    host, w = Span(10 * NS, 12 * NS, 80.0), 2 * NS
    victim = Recent(int(11.5 * NS), Span(int(9.5 * NS), int(11.5 * NS), 70.0))
    noisy = Recent(11 * NS, Span(9 * NS, 11 * NS, 95.0))
    assert host_verdict(host, w, {"/victim": victim}) == ("folded", "/victim")
    assert host_verdict(host, w, {"/victim": victim, "/noisy": noisy}) == ("folded", "/noisy")  # the most stalled
    # Its notification of this period came before the host's span (the groups' clocks differ): the same period.
    assert host_verdict(host, w, {"/v": Recent(int(8.5 * NS), Span(int(6.5 * NS), int(8.5 * NS), 70.0))})[0] == "folded"


def test_the_host_is_held_once_for_a_cgroup_whose_measure_is_to_come():
    host, w = Span(10 * NS, 12 * NS, 80.0), 2 * NS
    fresh = {"/v": Recent(11 * NS, None)}  # only a baseline so far: the host's notification came first
    assert host_verdict(host, w, fresh) == ("held", "/v")
    assert host_verdict(host, w, fresh, held_before=True) == ("alone", None)  # never twice in a row


def test_the_host_alone_when_no_watched_cgroup_accounts_for_its_stall():
    host, w = Span(10 * NS, 12 * NS, 80.0), 2 * NS
    assert host_verdict(host, w, {}) == ("alone", None)  # stalled in cgroups not watched
    spread = {f"/g{i}": Recent(11 * NS, Span(9 * NS, 11 * NS, 30.0)) for i in range(4)}
    assert host_verdict(host, w, spread) == ("alone", None)  # each far less than the host
    old = {"/v": Recent(7 * NS, Span(5 * NS, 7 * NS, 90.0))}  # its trigger quiet since before this period
    assert host_verdict(host, w, old) == ("alone", None)


def test_the_cgroup_alert_mentions_the_host_wide_share():
    d = {"cgroup": "/v", "stalled_percent": 62.4, "span_s": 2.0, "verdict": "unknown", "host_stalled_percent": 97.0}
    assert open_summary("cpu", "some", d).startswith("CPU pressure: /v stalled 62% of the last 2 s (host-wide 97%);")
    assert "(all tasks at once; host-wide 97%) at its own" in open_summary(
        "memory", "full", {**d, "verdict": "self-limited", "memory_limit": {"limit_bytes": 1 << 26}})


RULES = """
[[rule]]
name = "cpu_pressure"
severity = "warning"
signal = "pressure.cpu"
key = "cgroup"
threshold = {threshold}
window = "{window}"
params = {params}
"""


def rules(threshold=40, window="10s", params="{}", extra=""):
    return parse_rules(RULES.format(threshold=threshold, window=window, params=params) + extra, "r.toml")


def test_pressure_rules_take_the_kernels_windows_and_shares():
    rule = rules().rules[0]
    assert (rule.param("stall"), rule.param("critical")) == ("some", 0)
    with pytest.raises(ConfigError, match=r"rule\[0\] \(cpu_pressure\).window: invalid window 20s: the kernel's PSI"):
        rules(window="20s")
    with pytest.raises(ConfigError, match=r"window 300ms"):
        rules(window="300ms")
    with pytest.raises(ConfigError, match=r"invalid threshold 0: a pressure rule's threshold is the percent"):
        rules(threshold=0)
    with pytest.raises(ConfigError, match=r"params.stall: invalid value 'half' \(expected one of: some, full"):
        rules(params='{ stall = "half" }')
    with pytest.raises(ConfigError, match=r"params.critical: invalid value 20: critical must be 0"):
        rules(params="{ critical = 20 }")
    with pytest.raises(ConfigError, match=r"unknown signal 'pressure.disk'"):
        parse_rules(RULES.format(threshold=40, window="10s", params="{}").replace("pressure.cpu", "pressure.disk"),
                    "r.toml")


def test_pressure_rules_take_no_policy():
    with pytest.raises(ConfigError, match=r"policy: a pressure rule's subject is the stalled cgroup \(the victim\)"):
        rules(extra='policy = { action = "throttle", mode = "enforce" }\n')


def test_the_sensor_feeds_the_three_signals_and_polls_at_rescan():
    ruleset = parse_rules(RULES.format(threshold=40, window="10s", params="{}")
                          + RULES.format(threshold=20, window="10s", params='{ stall = "full" }')
                          .replace("cpu_pressure", "memory_pressure").replace("pressure.cpu", "pressure.memory"),
                          "r.toml")
    sensor = unstarted_sensor(PressureSensor, ruleset)
    assert set(sensor.by_resource) == {"cpu", "memory"}
    assert sensor.poll_interval_s == 10.0 and sensor.event_fd() is None and sensor.object_file == ""


def task() -> TaskContext:
    return TaskContext(tgid=7, pid=7, ppid=1, uid=0, gid=0, cgroup_id=9, start_boottime_ns=1, comm="x", exe="")


def crossing(t_s: float, severity=None) -> Crossing:
    ns = int(t_s * NS)
    return Crossing("cpu_pressure", "/v", ns, ns, 50, 1000, task(), {}, severity=severity)


def test_a_critical_crossing_raises_the_incident_once_and_for_its_resolution():
    rule = Rule("cpu_pressure", Severity.WARNING, "pressure.cpu", "cgroup", 30, 2.0)
    engine = IncidentEngine([rule])
    [opened] = engine.observe(crossing(1))
    assert opened.incident.severity is None  # the rule's: warning
    engine.observe(crossing(3, severity="critical"))
    assert opened.incident.severity == "critical"
    engine.observe(crossing(5, severity=None))
    assert opened.incident.severity == "critical"
    [again] = IncidentEngine([rule]).observe(crossing(1, severity="critical"))
    assert again.incident.severity == "critical"
