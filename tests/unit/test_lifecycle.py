"""The lifecycle sensor's pure parts: decoding exec churn and crash loop records, top
executables, exit statuses, rodata, programs, summaries and details (no root)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from records_helpers import crossing_head, task_record, unstarted_sensor

from ksift.errors import ConfigError
from ksift.rules.incidents import NS, IncidentEngine
from ksift.rules.model import Rule, RuleSet, Severity
from ksift.rules.parse import load_rules, parse_rules
from ksift.sensors import lifecycle
from ksift.transport import records

PARENT, PARENT_START = 1200, 777_000

churn_rule = partial(Rule, name="exec_churn", severity=Severity.INFO, signal="process.short_lived", key="tgid",
                     threshold=40, window_s=2.0, params={"max_lifetime": 1.0})
crash_rule = partial(Rule, name="crash_loop", severity=Severity.WARNING, signal="process.crash", key="parent_exe",
                     threshold=4, window_s=600.0, params={"max_lifetime": 60.0, "min_gap": 0.02, "tight_for": 5.0})


def sensor(*rules: Rule) -> lifecycle.LifecycleSensor:
    return unstarted_sensor(lifecycle.LifecycleSensor, rules or (churn_rule(), crash_rule()))


def record(rec_type: int, payload: np.ndarray, tgid: int, comm: bytes, exe: bytes, ppid: int = 1,
           ancestry: tuple[tuple[int, bytes], ...] = (), start: int = PARENT_START) -> np.ndarray:
    return task_record(rec_type, payload, tgid=tgid, ktime_ns=5 * NS, comm=comm, exe=exe, ppid=ppid,
                       start_boottime_ns=start, ancestry=ancestry)


def churn_crossing(window_count=41, total=41, start=4 * NS, child_exe=b"/bin/date") -> np.ndarray:
    p = np.zeros(1, dtype=lifecycle.CHURN_CROSSING)
    p["head"] = crossing_head(window_start_ns=start, total=total, window_count=window_count, threshold=40)
    p["max_lifetime_ns"], p["last_lifetime_ns"], p["last_child_tgid"] = NS, 3_000_000, 1300
    p["last_child_exe"] = child_exe
    return record(lifecycle.REC_CHURN_CROSSING, p, PARENT, b"make", b"/usr/bin/make")


def crash_run(events: list[tuple[float | None, float]], codes: dict[int, int], other: int = 0,
              paced: int = 5) -> np.ndarray:
    """A struct ksift_crash_run: `events` (pause before in s or None, lifetime in s) oldest first,
    written into the kernel's ring as it would be (the last CRASH_HISTORY of them)."""
    run = np.zeros((), dtype=lifecycle.CRASH_RUN)
    for i, (gap, life) in enumerate(events):
        slot = run["hist"][i % lifecycle.CRASH_HISTORY]
        slot["gap_ms"] = lifecycle.NO_GAP if gap is None else round(gap * 1000)
        slot["lifetime_us"] = round(life * 1e6)
    run["hist_n"], run["paced"], run["other_codes"] = len(events), paced, other
    for i, (status, count) in enumerate(codes.items()):
        run["codes"][i]["status"], run["codes"][i]["count"] = status, count
    return run


BACKOFF = [(None, 0.002), (10.0, 0.002), (20.0, 0.003), (40.0, 0.002), (80.0, 0.004)]


def crash_crossing(status: int = 1 << 8, events=BACKOFF, codes=None, window_count=5, total=5, child=1400,
                   exe=b"/usr/bin/worker", parent=PARENT, group=0, ktime_ns=None) -> np.ndarray:
    p = np.zeros(1, dtype=lifecycle.CRASH_CROSSING)
    p["head"] = crossing_head(window_start_ns=4 * NS, total=total, window_count=window_count, threshold=4)
    p["exit_code"], p["parent_tgid"], p["group_cgroup_id"] = status, parent, group
    p["run"] = crash_run(events, codes or {status: window_count})
    rec = record(lifecycle.REC_CRASH_CROSSING, p, child, b"worker", exe, ppid=parent,
                 ancestry=((parent, b"supervisord"), (1, b"init")), start=9_000)
    if ktime_ns is not None:
        rec[0]["ktime_ns"] = ktime_ns
    return rec


def open_incident(s: lifecycle.LifecycleSensor, batch: np.ndarray):
    decoded = s.decode(batch)
    engine = IncidentEngine(s.rules())
    (transition,) = [t for c in decoded.crossings for t in engine.observe(c)]
    return transition.incident


class FakeExeMap:
    """A stand-in for ks_churn_exe: answers lookup_batch with packed keys and values."""

    def __init__(self, entries: list[tuple[int, bytes, int, int]]):
        keys = np.zeros(len(entries), dtype=lifecycle.LC_KEY)
        vals = np.zeros(len(entries), dtype=lifecycle.CHURN_EXE)
        for i, (parent, exe, count, start) in enumerate(entries):
            keys[i]["parent_tgid"], keys[i]["exe"] = parent, exe
            vals[i]["count"], vals[i]["parent_start_ns"] = count, start
        self.answer = (keys.tobytes(), vals.tobytes(), len(entries))
        self.calls = 0

    def lookup_batch(self, delete: bool = False, chunk: int = 4096):
        self.calls += 1
        return self.answer


# -- exit statuses -------------------------------------------------------------


@pytest.mark.parametrize("status, fields, name", [
    (3 << 8, {"exit_status": 3, "signal": None, "core_dumped": False}, "exit 3"),
    (255 << 8, {"exit_status": 255, "signal": None}, "exit 255"),
    (11, {"exit_status": None, "signal": "SIGSEGV", "signal_number": 11, "core_dumped": False}, "SIGSEGV"),
    (6 | 0x80, {"signal": "SIGABRT", "core_dumped": True}, "SIGABRT (core dumped)"),
    (9, {"signal": "SIGKILL"}, "SIGKILL"),
    (100, {"signal": "signal 100", "signal_number": 100}, "signal 100"),
])
def test_exit_status_reads_like_wait(status, fields, name):
    described = lifecycle.describe_exit(status)
    assert {k: described[k] for k in fields} == fields
    assert lifecycle.exit_name(status) == name


# -- what reaches the kernel ---------------------------------------------------


def test_rodata_carries_each_enabled_rule_and_gates_the_other():
    both = sensor().rodata()
    assert both == {"churn_enabled": 1, "churn_threshold": 40, "churn_window_ns": 2 * NS,
                    "churn_max_lifetime_ns": NS, "crash_enabled": 1, "crash_threshold": 4,
                    "crash_window_ns": 600 * NS, "crash_max_lifetime_ns": 60 * NS,
                    "crash_min_gap_ns": NS // 50, "crash_tight_for_ns": 5 * NS}
    only_crash = sensor(crash_rule(threshold=3, window_s=0.5)).rodata()
    assert only_crash["crash_threshold"] == 3 and only_crash["crash_window_ns"] == NS // 2
    assert "churn_enabled" not in only_crash
    only_churn = sensor(churn_rule(params={"max_lifetime": 0.25})).rodata()
    assert only_churn["churn_max_lifetime_ns"] == NS // 4 and "crash_enabled" not in only_churn


def test_programs_only_when_a_rule_is_enabled():
    assert sensor(churn_rule()).programs() == ["ks_lc_exit"]
    assert sensor(crash_rule()).programs() == ["ks_lc_exit"]
    assert sensor(churn_rule(enabled=False), crash_rule(enabled=False)).programs() == []
    assert not lifecycle.LifecycleSensor.wanted(RuleSet((churn_rule(enabled=False),), "t.toml"))


def test_packaged_defaults_are_sane():
    rules = load_rules()
    churn, crash = rules.by_name("exec_churn"), rules.by_name("crash_loop")
    assert churn.signal == "process.short_lived" and churn.key == "tgid"
    assert churn.param("max_lifetime") == 1.0
    fork = rules.by_name("fork_storm")
    # Below fork_storm's rate, so it catches churn fork_storm does not.
    assert churn.threshold / churn.window_s < fork.threshold / fork.window_s
    assert crash.signal == "process.crash" and crash.key == "parent_exe"
    # systemd's StartLimitBurst: 5 starts; Kubernetes' longest back-off (5m) fits in the window twice.
    assert crash.threshold == 4 and crash.window_s == 600 and crash.sustain_s == 0
    assert crash.param("max_lifetime") == 60 and crash.param("min_gap") < 0.1  # systemd's RestartSec: 100ms
    assert crash.param("tight_for") >= 5  # a script's burst of failures is shorter


# -- exec churn ----------------------------------------------------------------


def test_churn_crossing_decodes_to_the_parent():
    s = sensor(churn_rule())
    decoded = s.decode(churn_crossing())
    assert decoded.failed == 0 and decoded.exits == []
    (c,) = decoded.crossings
    assert c.rule == "exec_churn" and c.key == PARENT
    assert c.task.comm == "make" and c.task.exe == "/usr/bin/make"
    assert (c.window_count, c.total, c.window_start_ns) == (41, 41, 4 * NS)
    assert c.details["max_lifetime_s"] == 1.0
    assert c.details["last_child"] == {"pid": 1300, "exe": "/bin/date", "lifetime_s": 0.003}


def test_churn_exit_record_ends_the_key():
    p = np.zeros(1, dtype=lifecycle.CHURN_EXIT)
    p["total"], p["exit_code"] = 512, 0
    (gone,) = sensor(churn_rule()).decode(record(lifecycle.REC_CHURN_EXIT, p, PARENT, b"make", b"")).exits
    assert (gone.rule, gone.key, gone.total, gone.exit_code) == ("exec_churn", PARENT, 512, 0)


def test_records_of_a_disabled_rule_are_ignored():
    assert sensor(crash_rule()).decode(churn_crossing()).crossings == []
    assert sensor(churn_rule()).decode(crash_crossing()).crossings == []


def test_top_executables_are_the_parents_own_by_count():
    entries = [
        (PARENT, b"/bin/date", 120, PARENT_START),
        (PARENT, b"/bin/sed", 40, PARENT_START),
        (PARENT, b"/bin/true", 60, PARENT_START),
        (PARENT, b"/bin/old", 999, PARENT_START - 1),  # an earlier process with the same pid
        (PARENT + 1, b"/bin/date", 500, PARENT_START),  # another parent
    ]
    fake = FakeExeMap(entries)
    top = lifecycle.top_executables(*fake.answer, PARENT, PARENT_START)
    assert top == [{"exe": "/bin/date", "count": 120}, {"exe": "/bin/true", "count": 60},
                   {"exe": "/bin/sed", "count": 40}]
    assert lifecycle.top_executables(*fake.answer, PARENT, PARENT_START, limit=1) == top[:1]
    assert lifecycle.top_executables(b"", b"", 0, PARENT, PARENT_START) == []


def test_churn_alert_sentence_and_details():
    s = sensor(churn_rule())
    s._churn_exe = FakeExeMap([(PARENT, b"/bin/date", 120, PARENT_START), (PARENT, b"/bin/true", 60, PARENT_START)])
    inc = open_incident(s, churn_crossing(window_count=180, total=180))
    assert s.summarize(inc, "open") == ("PID 1200 (make) created and exited 180 short-lived child processes "
                                        "in 2s (each lived under 1s)")
    details = s.details(inc, "open")
    assert details["top_executables"] == [{"exe": "/bin/date", "count": 120}, {"exe": "/bin/true", "count": 60}]
    assert details["last_child"]["exe"] == "/bin/date" and details["max_lifetime_s"] == 1.0

    # The map lost the entries by the resolution: the last good list stays.
    s._churn_exe = FakeExeMap([])
    inc.status, inc.resolved_ns, inc.latest_total = "resolved", 9 * NS, 400
    assert s.details(inc, "resolved")["top_executables"][0] == {"exe": "/bin/date", "count": 120}
    assert s.summarize(inc, "resolved") == ("PID 1200 (make) exec churn is over: 400 short-lived children "
                                            "in 5s (peak 180 in 2s)")


def test_churn_details_survive_a_failing_map_read():
    class Broken:
        def lookup_batch(self, delete=False, chunk=4096):
            raise OSError("gone")

    s = sensor(churn_rule())
    s._churn_exe = Broken()
    inc = open_incident(s, churn_crossing())
    details = s.details(inc, "open")
    assert "top_executables" not in details and details["last_child"]["pid"] == 1300


# -- crash loops: the pure parts -----------------------------------------------


@pytest.mark.parametrize("codes, other, text", [
    ([(1 << 8, 4), (11, 1)], 0, "exit 1 x4, SIGSEGV x1"),
    ([(11, 1), (1 << 8, 4)], 0, "exit 1 x4, SIGSEGV x1"),  # most frequent first
    ([(6 | 0x80, 2)], 3, "SIGABRT (core dumped) x2, other statuses x3"),
    ([(9, 7), (0, 0)], 0, "SIGKILL x7"),  # empty slots are left out
])
def test_exit_summary(codes, other, text):
    assert lifecycle.exit_summary(codes, other) == text


@pytest.mark.parametrize("delays, kind, words", [
    ([10.0, 20.0, 40.0, 80.0], "back-off", "restarting with back-off: 10s, 20s, 40s, 80s"),
    ([80.2, 160.4, 300.1, 300.0], "back-off", "restarting with back-off: 80s, 160s, 5m, 5m"),  # at its cap
    ([0.101, 0.2, 0.4, 0.8], "back-off", "restarting with back-off: 101ms, 200ms, 400ms, 800ms"),
    ([2.0, 2.01, 1.99, 2.0], "fixed", "restarting every 2s"),
    ([0.048, 0.049, 0.012, 0.048], "fixed", "restarting every 48ms"),  # one restart came late, the next early
    ([0.1, 0.2, 0.2, 0.2], "fixed", "restarting every 200ms"),  # grew once: no back-off
    ([0.001, 0.0004, 0.03, 0.002], "at once", "restarting at once (no pause)"),
    ([-0.5, -0.2, 0.001], "at once", "restarting at once (no pause)"),  # started before the last one died
    ([1.0, 5.0, 0.5, 3.0], "irregular", "restarting after 1s, 5s, 500ms, 3s"),
    ([], None, ""),
])
def test_restart_pattern(delays, kind, words):
    assert lifecycle.restart_pattern(delays, min_gap_s=0.02) == (kind, words)


def test_run_history_reads_the_ring_oldest_first():
    few = crash_run(BACKOFF, {256: 5})
    assert lifecycle.run_history(few) == [(None, 0.002), (10.0, 0.002), (20.0, 0.003), (40.0, 0.002), (80.0, 0.004)]
    many = [(None, 0.001)] + [(float(i), 0.001 * i) for i in range(1, 9)]  # 9 failures: the ring holds the last 6
    assert lifecycle.run_history(crash_run(many, {256: 9})) == many[3:]


def test_approx_rounds_a_measured_duration():
    assert [lifecycle.approx(s) for s in (300.4, 12.6, 1.26, 0.1014, 0.0000123)] == ["5m", "13s", "1.3s", "101ms",
                                                                                    "12us"]


# -- crash loops: records, alerts, live state ----------------------------------


def test_crash_crossing_keys_by_parent_and_exe_and_reads_the_run():
    (c,) = sensor(crash_rule()).decode(crash_crossing(11, codes={256: 4, 11: 1})).crossings
    assert c.rule == "crash_loop" and c.key == lifecycle.CrashKey(PARENT, 0, "/usr/bin/worker")
    assert c.task.tgid == 1400 and c.task.ppid == PARENT  # the subject is the failing process
    d = c.details
    assert d["exe"] == "/usr/bin/worker" and d["parent"] == {"pid": PARENT, "comm": "supervisord"}
    assert d["keyed_by"] == "parent" and d["group_cgroup_id"] is None and d["failures"] == 5
    assert d["exits"] == [{"exit_status": 1, "signal": None, "core_dumped": False, "count": 4},
                          {"exit_status": None, "signal": "SIGSEGV", "core_dumped": False, "count": 1}]
    assert (d["restart_pattern"], d["restart_delays_s"]) == ("back-off", [10.0, 20.0, 40.0, 80.0])
    assert d["typical_lifetime_s"] == 0.002 and d["last_lifetime_s"] == 0.004
    assert (d["signal"], d["wait_status"], d["last_pid"]) == ("SIGSEGV", 11, 1400)  # the last failure


def test_restarts_from_new_parents_in_one_slice_are_one_incident():
    s = sensor(crash_rule())
    engine = IncidentEngine(s.rules())
    group = 4242  # the cgroup above the unit's (or the pod's, above each new container's)
    first = s.decode(crash_crossing(parent=3000, child=3001, group=group)).crossings
    again = s.decode(crash_crossing(parent=3100, child=3101, group=group, ktime_ns=6 * NS)).crossings
    assert first[0].key == again[0].key == lifecycle.CrashKey(0, group, "/usr/bin/worker")
    transitions = [t for c in first + again for t in engine.observe(c)]
    assert [t.kind for t in transitions] == ["open"] and engine.stats["folded"] == 0
    assert first[0].details["keyed_by"] == "cgroup" and first[0].details["group_cgroup_id"] == group


def test_a_loop_keyed_by_cgroup_names_its_unit_or_container_from_the_kernels_cgroup_name():
    s = sensor(crash_rule())
    name = "cri-containerd-" + "cd" * 32 + ".scope"
    st = crash_state(4 * NS, 5 * NS, BACKOFF, {256: 5}, 5)
    st["cgroup_name"] = name.encode()
    key = lifecycle.CrashKey(0, 4242, "/usr/bin/worker")
    s._crash_state = OneKey(lifecycle.crash_key_bytes(key), st)
    inc = open_incident(s, crash_crossing(parent=3000, child=3001, group=4242))
    assert inc.key == key and inc.details["cgroup_name"] == name
    # The cgroup was gone when the alert was built: enrichment found nothing, the kept name says it.
    inc.context = {"subject": {"cgroup": None, "container_id": None, "systemd_unit": None}}
    assert " (supervisord) in container cdcdcdcdcdcd keeps failing: " in s.summarize(inc, "open")
    inc.details["cgroup_name"] = "web.service"
    assert " in unit web.service keeps failing: " in s.summarize(inc, "open")
    # Keyed by parent: no lookup, no name.
    assert sensor(crash_rule()).decode(crash_crossing()).crossings[0].details["cgroup_name"] is None


def test_crash_alert_says_how_often_how_long_and_how_it_is_restarted():
    s = sensor(crash_rule())
    inc = open_incident(s, crash_crossing(codes={256: 4, 11: 1}, ktime_ns=4 * NS + 150 * NS))
    assert s.summarize(inc, "open") == ("/usr/bin/worker under PID 1200 (supervisord) keeps failing: 5 failures "
                                        "in 150s (exit 1 x4, SIGSEGV x1), each lived about 2ms, "
                                        "restarting with back-off: 10s, 20s, 40s, 80s")
    assert not any(k.startswith("_") for k in s.details(inc, "open"))  # internal figures stay out of the alert

    inc.context = {"subject": {"systemd_unit": "web.service"}}
    assert " (supervisord) in unit web.service keeps failing: " in s.summarize(inc, "open")
    inc.context = {"subject": {"container_id": "ab" * 32, "container_name": "api", "pod_name": "api-7",
                               "pod_namespace": "shop", "systemd_unit": "cri-containerd-x.scope"}}
    assert " in container api (pod shop/api-7) keeps failing: " in s.summarize(inc, "open")
    inc.context = {"subject": {"container_id": "ab" * 32}}
    assert " in container abababababab keeps failing: " in s.summarize(inc, "open")

    inc.status, inc.resolved_ns, inc.latest_total = "resolved", 900 * NS, 9
    assert s.summarize(inc, "resolved") == ("/usr/bin/worker under PID 1200 (supervisord) in container "
                                            "abababababab stopped failing: 9 failures in 896s "
                                            "(exit 1 x4, SIGSEGV x1)")


class OneKey:
    def __init__(self, key: bytes, value: np.ndarray):
        self.key, self.value = key, value.tobytes()

    def lookup(self, key: bytes):
        return self.value if bytes(key) == self.key else None


def crash_state(run_start_ns: int, last_exit_ns: int, events, codes, count: int) -> np.ndarray:
    st = np.zeros(1, dtype=lifecycle.CRASH_STATE)
    st["win"]["window_start_ns"], st["win"]["window_count"], st["win"]["total"] = run_start_ns, count, count
    st["last_exit_ns"] = last_exit_ns
    st["run"] = crash_run(events, codes)
    return st


def test_a_loop_holds_while_it_fails_within_window_and_its_resolution_reads_the_whole_run():
    s = sensor(crash_rule())
    inc = open_incident(s, crash_crossing())
    key = lifecycle.crash_key_bytes(inc.key)
    # Kubernetes at its 5-minute cap: 2 failures per 10-minute window, still a loop.
    events = BACKOFF + [(160.0, 0.002), (300.0, 0.002), (300.0, 0.002)]
    s._crash_state = OneKey(key, crash_state(4 * NS, 1500 * NS, events, {256: 8}, 8))
    s.mono_ns = lambda: 1900 * NS
    assert s.holds("crash_loop", inc.key)
    s.mono_ns = lambda: 2101 * NS  # no failure for more than window (600 s)
    assert not s.holds("crash_loop", inc.key)
    assert not s.holds("exec_churn", PARENT) and not s.holds("crash_loop", lifecycle.CrashKey(1, 0, "x"))

    inc.status, inc.resolved_ns, inc.latest_total = "resolved", 2101 * NS, 8
    # The sentence is built first (build_alert), and already reads the whole run.
    assert s.summarize(inc, "resolved").endswith(" stopped failing: 8 failures in 2097s (exit 1 x8)")
    details = s.details(inc, "resolved")
    assert details["failures"] == 8 and details["exits"][0]["count"] == 8
    assert details["restart_delays_s"] == [20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    # A newer run of the key (another start): the incident keeps its own figures.
    s._crash_state = OneKey(key, crash_state(3000 * NS, 3001 * NS, BACKOFF[:1], {9: 1}, 1))
    assert s.details(inc, "resolved")["failures"] == 8


def test_crash_key_bytes_match_the_kernel_key():
    raw = lifecycle.crash_key_bytes(lifecycle.CrashKey(PARENT, 0, "/usr/bin/worker"))
    assert len(raw) == lifecycle.CRASH_KEY.itemsize == 144
    key = np.frombuffer(raw, dtype=lifecycle.CRASH_KEY)[0]
    assert key["parent_tgid"] == PARENT and key["cgroup_id"] == 0 and key["pad"] == 0
    assert key["exe"] == b"/usr/bin/worker" and raw[16 + len("/usr/bin/worker"):] == bytes(128 - 15)
    by_cgroup = np.frombuffer(lifecycle.crash_key_bytes(lifecycle.CrashKey(0, 77, "w")), dtype=lifecycle.CRASH_KEY)
    assert by_cgroup[0]["cgroup_id"] == 77 and by_cgroup[0]["parent_tgid"] == 0


def test_current_reads_each_rules_own_map():
    s = sensor()
    churn = np.zeros(1, dtype=lifecycle.CHURN_STATE)
    churn["win"]["total"], churn["win"]["window_start_ns"], churn["win"]["window_count"] = 90, 7 * NS, 55
    crash = np.zeros(1, dtype=lifecycle.CRASH_STATE)
    crash["win"]["total"], crash["win"]["window_start_ns"], crash["win"]["window_count"] = 25, 6 * NS, 14
    s._churn_state = OneKey(PARENT.to_bytes(4, "little"), churn)
    s._crash_state = OneKey(lifecycle.crash_key_bytes(lifecycle.CrashKey(PARENT, 0, "/usr/bin/worker")), crash)
    state = s.current("exec_churn", PARENT)
    assert (state.total, state.window_start_ns, state.window_count) == (90, 7 * NS, 55)
    state = s.current("crash_loop", lifecycle.CrashKey(PARENT, 0, "/usr/bin/worker"))
    assert (state.total, state.window_start_ns, state.window_count) == (25, 6 * NS, 14)
    assert s.current("crash_loop", lifecycle.CrashKey(PARENT, 0, "/usr/bin/other")) is None
    assert s.current("exec_churn", PARENT + 1) is None
    assert s.current("fork_storm", PARENT) is None


def test_an_undecodable_record_is_counted_not_fatal(monkeypatch):
    s = sensor()

    def broken(task):
        raise ValueError("bad task")

    monkeypatch.setattr(records, "task_context", broken)
    batch = np.concatenate([churn_crossing(), crash_crossing()])
    decoded = s.decode(batch)
    assert decoded.failed == 2 and decoded.crossings == []


def test_a_crash_loop_rule_with_a_sustain_is_refused_by_name():
    text = """
[[rule]]
name = "crash_loop"
severity = "warning"
signal = "process.crash"
key = "parent_exe"
threshold = 4
window = "10m"
sustain = "20s"
"""
    with pytest.raises(ConfigError) as err:
        parse_rules(text, "rules.toml")
    assert "rules.toml" in str(err.value) and "rule[0] (crash_loop).sustain" in str(err.value)
    assert "invalid sustain 20s" in str(err.value)
    assert parse_rules(text.replace('"20s"', '"0s"'), "rules.toml").by_name("crash_loop").sustain_s == 0
