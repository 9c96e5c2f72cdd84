"""The lifecycle sensor's pure parts: decoding exec churn and crash loop records, top
executables, exit statuses, rodata, programs, summaries and details (no root)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from records_helpers import crossing_head, task_record, unstarted_sensor

from ksift.rules.incidents import NS, IncidentEngine
from ksift.rules.model import Rule, RuleSet, Severity
from ksift.rules.parse import load_rules
from ksift.sensors import lifecycle
from ksift.transport import records

PARENT, PARENT_START = 1200, 777_000

churn_rule = partial(Rule, name="exec_churn", severity=Severity.INFO, signal="process.short_lived", key="tgid",
                     threshold=40, window_s=2.0, params={"max_lifetime": 1.0})
crash_rule = partial(Rule, name="crash_loop", severity=Severity.WARNING, signal="process.crash", key="parent_exe",
                     threshold=10, window_s=10.0)


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


def crash_crossing(status: int, run=11, window_count=11, total=11, child=1400,
                   exe=b"/usr/bin/worker") -> np.ndarray:
    p = np.zeros(1, dtype=lifecycle.CRASH_CROSSING)
    p["head"] = crossing_head(window_start_ns=4 * NS, total=total, window_count=window_count, threshold=10)
    p["exit_code"], p["same_code_run"], p["parent_tgid"], p["lifetime_ns"] = status, run, PARENT, 2_000_000
    return record(lifecycle.REC_CRASH_CROSSING, p, child, b"worker", exe, ppid=PARENT,
                  ancestry=((PARENT, b"supervisord"), (1, b"init")), start=9_000)


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


@pytest.mark.parametrize("status, fields, phrase", [
    (3 << 8, {"exit_status": 3, "signal": None, "core_dumped": False}, "exited with status 3"),
    (255 << 8, {"exit_status": 255, "signal": None}, "exited with status 255"),
    (11, {"exit_status": None, "signal": "SIGSEGV", "signal_number": 11, "core_dumped": False},
     "was killed by SIGSEGV"),
    (6 | 0x80, {"signal": "SIGABRT", "core_dumped": True}, "was killed by SIGABRT (core dumped)"),
    (9, {"signal": "SIGKILL"}, "was killed by SIGKILL"),
    (100, {"signal": "signal 100", "signal_number": 100}, "was killed by signal 100"),
])
def test_exit_status_reads_like_wait(status, fields, phrase):
    described = lifecycle.describe_exit(status)
    assert {k: described[k] for k in fields} == fields
    assert lifecycle.exit_phrase(status) == phrase


# -- what reaches the kernel ---------------------------------------------------


def test_rodata_carries_each_enabled_rule_and_gates_the_other():
    both = sensor().rodata()
    assert both == {"churn_enabled": 1, "churn_threshold": 40, "churn_window_ns": 2 * NS,
                    "churn_max_lifetime_ns": NS, "crash_enabled": 1, "crash_threshold": 10,
                    "crash_window_ns": 10 * NS}
    only_crash = sensor(crash_rule(threshold=3, window_s=0.5)).rodata()
    assert only_crash == {"crash_enabled": 1, "crash_threshold": 3, "crash_window_ns": NS // 2}
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
    assert crash.threshold / crash.window_s >= 1.0  # a failure a second is still quiet
    assert crash.sustain_s >= crash.window_s  # a burst is not a loop


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
    assert sensor(churn_rule()).decode(crash_crossing(3 << 8)).crossings == []


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


# -- crash loops ---------------------------------------------------------------


def test_crash_crossing_keys_by_parent_and_exe():
    (c,) = sensor(crash_rule()).decode(crash_crossing(3 << 8)).crossings
    assert c.rule == "crash_loop" and c.key == (PARENT, "/usr/bin/worker")
    assert c.task.tgid == 1400 and c.task.ppid == PARENT  # the subject is the failing process
    d = c.details
    assert d["exe"] == "/usr/bin/worker" and d["parent"] == {"pid": PARENT, "comm": "supervisord"}
    assert (d["exit_status"], d["signal"], d["wait_status"]) == (3, None, 768)
    assert d["same_failure_in_a_row"] == 11 and d["last_pid"] == 1400 and d["last_lifetime_s"] == 0.002


def test_crash_alert_when_every_failure_was_the_same():
    s = sensor(crash_rule())
    inc = open_incident(s, crash_crossing(3 << 8, run=20, window_count=20, total=20))
    assert s.summarize(inc, "open") == ("/usr/bin/worker exited with status 3 20 times in 10s "
                                        "under PID 1200 (supervisord)")
    details = s.details(inc, "open")
    assert details["exit_status"] == 3 and details["parent"]["pid"] == PARENT
    assert not any(k.startswith("_") for k in details)  # internal figures stay out of the alert

    segv = open_incident(s, crash_crossing(11, run=11))
    assert s.summarize(segv, "open").startswith("/usr/bin/worker was killed by SIGSEGV 11 times in 10s")
    assert s.details(segv, "open")["signal"] == "SIGSEGV"


def test_crash_alert_after_a_sustain_counts_the_whole_loop():
    s = sensor(crash_rule(sustain_s=20.0))
    engine = IncidentEngine(s.rules())
    for i, start in enumerate((0, 10, 20)):
        p = np.zeros(1, dtype=lifecycle.CRASH_CROSSING)
        p["head"] = crossing_head(window_start_ns=start * NS, total=11 * (i + 1), window_count=11, threshold=10)
        p["exit_code"], p["same_code_run"], p["parent_tgid"] = 3 << 8, 11 * (i + 1), PARENT
        batch = record(lifecycle.REC_CRASH_CROSSING, p, 1400 + i, b"worker", b"/usr/bin/worker", ppid=PARENT,
                       ancestry=((PARENT, b"supervisord"),))
        batch[0]["ktime_ns"] = (start + 1) * NS
        out = [t for c in s.decode(batch).crossings for t in engine.observe(c)]
    (opened,) = out  # pending for two windows, open on the third
    assert s.summarize(opened.incident, "open") == ("/usr/bin/worker exited with status 3 33 times in 21s "
                                                    "under PID 1200 (supervisord)")
    assert opened.incident.count == 33


def test_crash_alert_with_mixed_failures_names_the_last():
    s = sensor(crash_rule())
    inc = open_incident(s, crash_crossing(11, run=2, window_count=12, total=12))
    assert s.summarize(inc, "open") == ("/usr/bin/worker failed 12 times in 10s under PID 1200 (supervisord) "
                                        "(last: was killed by SIGSEGV)")
    inc.status, inc.resolved_ns, inc.latest_total = "resolved", 34 * NS, 30
    assert s.summarize(inc, "resolved") == ("/usr/bin/worker under PID 1200 (supervisord) stopped failing: "
                                            "30 failed exits in 30s (peak 12 in 10s)")


def test_crash_key_bytes_match_the_kernel_key():
    raw = lifecycle.crash_key_bytes((PARENT, "/usr/bin/worker"))
    assert len(raw) == lifecycle.LC_KEY.itemsize == 136
    key = np.frombuffer(raw, dtype=lifecycle.LC_KEY)[0]
    assert key["parent_tgid"] == PARENT and key["pad"] == 0 and key["exe"] == b"/usr/bin/worker"
    assert raw[8 + len("/usr/bin/worker"):] == bytes(128 - len("/usr/bin/worker"))


def test_current_reads_each_rules_own_map():
    class OneKey:
        def __init__(self, key: bytes, value: np.ndarray):
            self.key, self.value = key, value.tobytes()

        def lookup(self, key: bytes):
            return self.value if bytes(key) == self.key else None

    s = sensor()
    churn = np.zeros(1, dtype=lifecycle.CHURN_STATE)
    churn["win"]["total"], churn["win"]["window_start_ns"], churn["win"]["window_count"] = 90, 7 * NS, 55
    crash = np.zeros(1, dtype=lifecycle.CRASH_STATE)
    crash["win"]["total"], crash["win"]["window_start_ns"], crash["win"]["window_count"] = 25, 6 * NS, 14
    s._churn_state = OneKey(PARENT.to_bytes(4, "little"), churn)
    s._crash_state = OneKey(lifecycle.crash_key_bytes((PARENT, "/usr/bin/worker")), crash)
    state = s.current("exec_churn", PARENT)
    assert (state.total, state.window_start_ns, state.window_count) == (90, 7 * NS, 55)
    state = s.current("crash_loop", (PARENT, "/usr/bin/worker"))
    assert (state.total, state.window_start_ns, state.window_count) == (25, 6 * NS, 14)
    assert s.current("crash_loop", (PARENT, "/usr/bin/other")) is None
    assert s.current("exec_churn", PARENT + 1) is None
    assert s.current("fork_storm", PARENT) is None


def test_an_undecodable_record_is_counted_not_fatal(monkeypatch):
    s = sensor()

    def broken(task):
        raise ValueError("bad task")

    monkeypatch.setattr(records, "task_context", broken)
    batch = np.concatenate([churn_crossing(), crash_crossing(3 << 8)])
    decoded = s.decode(batch)
    assert decoded.failed == 2 and decoded.crossings == []
