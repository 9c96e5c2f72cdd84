"""The CPU sensor's pure parts: thresholds, decoding, stack draining, the alert's words."""

from __future__ import annotations

import numpy as np
import pytest
from records_helpers import FakeBpfMap, crossing_head, task_record, tgid_key, unstarted_sensor

from ksift.errors import ConfigError
from ksift.events import TaskContext
from ksift.loader.bpf_object import parse_cpu_list
from ksift.rules.incidents import NS, Incident
from ksift.rules.model import cpu_samples_threshold as samples_threshold
from ksift.rules.parse import load_rules, parse_rules
from ksift.sensors.cpu import (
    CPU_CROSSING,
    CPU_EXIT,
    CPU_STATE,
    LOST_FRAME,
    REC_CPU_CROSSING,
    REC_CPU_EXIT,
    STACK_DEPTH,
    STACK_ID_TTL_NS,
    STACK_KEY,
    CpuSensor,
    StackBook,
    hot_frame,
    share_percent,
)

RULE = """
[[rule]]
name = "cpu_hog"
severity = "warning"
signal = "cpu.usage"
key = "tgid"
threshold = {threshold}
window = "{window}"
sustain = "5s"
enabled = {enabled}
params = {{ sample_hz = {hz} }}
"""


def rules(threshold=90, window="1s", hz=49, enabled="true"):
    return parse_rules(RULE.format(threshold=threshold, window=window, hz=hz, enabled=enabled), "test.toml")


class FakeSymbolizer:
    def __init__(self):
        self.user_calls: list[tuple[int, list[int], int | None]] = []

    def user_frames(self, pid, addresses, start_boottime_ns=None):
        self.user_calls.append((pid, list(addresses), start_boottime_ns))
        return [f"u{a:x}" for a in addresses]

    def kernel_frames(self, addresses):
        return [f"k{a:x}" for a in addresses]

    def prepare_kernel(self, stacks):  # the real one looks every kernel frame of a batch up at once
        self.prepared = [list(stack) for stack in stacks]


def sensor(ruleset=None, clock=None):
    sym = FakeSymbolizer()
    s = unstarted_sensor(CpuSensor, ruleset or rules(), symbolizer=sym, clock_ns=clock or (lambda: 0))
    s._stacks, s._stack_counts, s._state = FakeBpfMap(), FakeBpfMap(), FakeBpfMap()
    return s, sym


def stack_key(tgid, uid, kid) -> bytes:
    return np.array([(tgid, uid, kid, 0)], dtype=STACK_KEY).tobytes()


def stack_value(*addresses) -> bytes:
    return np.array(list(addresses) + [0] * (STACK_DEPTH - len(addresses)), dtype="<u8").tobytes()


def record(rec_type, payload: np.ndarray, tgid=4242, ktime=0, comm=b"worker", start=777) -> np.ndarray:
    return task_record(rec_type, payload, tgid=tgid, ktime_ns=ktime, ppid=42, comm=comm, start_boottime_ns=start)


def crossing_payload(window_start, run_start, run_samples, total=1000, count=45, threshold=44):
    p = np.zeros(1, dtype=CPU_CROSSING)
    p["head"] = crossing_head(window_start_ns=window_start, total=total, window_count=count, threshold=threshold)
    p["run_start_ns"], p["run_samples"] = run_start, run_samples
    return p


# -- thresholds ---------------------------------------------------------------


@pytest.mark.parametrize("percent,hz,window_s,expected", [
    (90, 49, 1.0, 44),     # 44.1 rounded down: more than 44 samples of 49 means over 90%
    (100, 49, 1.0, 49),
    (150, 49, 2.0, 147),   # a multi-threaded process can use more than one core
    (90, 99, 0.5, 44),     # 44.55
    (0, 49, 1.0, 0),       # threshold 0: any sample at all
    (90, 49, 0.3, 13),     # 13.23: nanosecond arithmetic, no float drift
])
def test_samples_threshold(percent, hz, window_s, expected):
    assert samples_threshold(percent, hz, window_s) == expected


def test_share_of_a_core_from_samples():
    assert share_percent(49, int(0.98 * NS), 49) == pytest.approx(100, abs=0.5)  # 49 samples at 0, 20.4 ms, ...
    assert share_percent(25, 2 * NS, 49) == pytest.approx(25 / 99 * 100)
    assert share_percent(198, 2 * NS, 49) > 199  # two busy threads: two cores' worth


def test_rodata_and_programs_follow_the_packaged_rule():
    s = unstarted_sensor(CpuSensor, load_rules())
    assert s.rodata() == {"cpu_threshold": 44, "cpu_window_ns": NS}
    assert s.programs() == ["ks_cpu_sample", "ks_cpu_exit"]
    assert s.sample_hz == 49


def test_disabled_rule_loads_and_attaches_nothing():
    ruleset = rules(enabled="false")
    assert not CpuSensor.wanted(ruleset)
    s = unstarted_sensor(CpuSensor, ruleset)
    assert s.programs() == [] and s.rodata() == {}


def test_window_too_short_for_the_rate_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as info:
        unstarted_sensor(CpuSensor, rules(window="100ms"))
    msg = str(info.value)
    assert msg.startswith("test.toml: rule[0] (cpu_hog).window:")
    assert "sample_hz 49" in msg and "4.9 samples" in msg
    unstarted_sensor(CpuSensor, rules(window="100ms", hz=200))  # 20: fine


@pytest.mark.parametrize("text,cpus", [("0-1\n", [0, 1]), ("0,2-3", [0, 2, 3]), ("5", [5]), ("0-0,1", [0, 1])])
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "-2", "0-1,x"])
def test_parse_cpu_list_refuses_garbage(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


# -- decoding and stacks ------------------------------------------------------


def test_crossing_carries_share_and_the_hottest_stacks():
    s, sym = sensor()
    s._stacks.entries = {
        (1).to_bytes(4, "little"): stack_value(0x1000, 0x2000),       # user: handle_batch <- main
        (2).to_bytes(4, "little"): stack_value(0xFFFF0001),            # kernel
        (3).to_bytes(4, "little"): stack_value(0x3000),
    }
    s._stack_counts.entries = {
        stack_key(4242, 1, -1): np.array([120], "<u8").tobytes(),
        stack_key(4242, 1, 2): np.array([7], "<u8").tobytes(),
        stack_key(4242, 3, -1): np.array([30], "<u8").tobytes(),
        stack_key(4242, 9, -1): np.array([2], "<u8").tobytes(),  # its stack id is gone
    }
    run_start, ktime = 10 * NS, 16 * NS
    batch = record(REC_CPU_CROSSING, crossing_payload(15 * NS, run_start, 290), ktime=ktime)
    out = s.decode(batch)

    assert out.failed == 0 and len(out.crossings) == 1
    c = out.crossings[0]
    assert c.rule == "cpu_hog" and c.key == 4242 and c.task.comm == "worker" and c.window_count == 45
    assert c.details["cpu_share_percent"] == round(290 / (6 * 49 + 1) * 100, 1)
    assert c.details["hot_for_s"] == 6.0 and c.details["samples"] == 290
    assert c.details["threshold_percent"] == 90 and c.details["window_samples_threshold"] == 44
    assert c.stack == [
        {"samples": 120, "user": ["u1000", "u2000"], "kernel": []},
        {"samples": 30, "user": ["u3000"], "kernel": []},
        {"samples": 7, "user": ["u1000", "u2000"], "kernel": ["kffff0001"]},
        {"samples": 2, "user": [LOST_FRAME], "kernel": []},
    ]
    assert (4242, [0x1000, 0x2000], 777) in sym.user_calls  # symbolized as the process the kernel saw
    assert s._stack_counts.entries == {}  # drained
    assert s.stack_stats == {"drained": 4, "lost": 1}


def test_stack_ids_are_kept_while_sampled_and_deleted_once_stale():
    now = [0]
    s, _ = sensor(clock=lambda: now[0])
    sid = (1).to_bytes(4, "little")
    s._stacks.entries = {sid: stack_value(0x1000)}
    s._stack_counts.entries = {stack_key(4242, 1, -1): np.array([5], "<u8").tobytes()}
    s.drain_stacks()
    assert sid in s._stacks.entries  # a count drained a moment later must still find it

    # A later count names the id again: it stays readable even if the kernel entry were re-read later.
    now[0] = STACK_ID_TTL_NS
    s._stack_counts.entries = {stack_key(4242, 1, -1): np.array([5], "<u8").tobytes()}
    s.drain_stacks()
    assert sid in s._stacks.entries

    now[0] = 2 * STACK_ID_TTL_NS + 1  # nobody sampled it for longer than the TTL
    s.drain_stacks()
    assert sid not in s._stacks.entries and s._stack_addresses_by_id == {}


def test_exit_record_gives_the_final_total():
    s, _ = sensor()
    payload = np.array([(5 * NS, 1234, 20, 9)], dtype=CPU_EXIT)
    out = s.decode(record(REC_CPU_EXIT, payload))
    assert [(e.rule, e.key, e.total, e.exit_code) for e in out.exits] == [("cpu_hog", 4242, 1234, 9)]
    assert out.crossings == []


def test_current_reads_the_live_counters():
    s, _ = sensor()
    state = np.zeros(1, dtype=CPU_STATE)
    state["win"]["total"], state["win"]["window_start_ns"], state["win"]["window_count"] = 500, 7 * NS, 31
    s._state.entries = {tgid_key(4242): state.tobytes()}
    cur = s.current("cpu_hog", 4242)
    assert (cur.total, cur.window_start_ns, cur.window_count) == (500, 7 * NS, 31)
    assert s.current("cpu_hog", 1) is None


def test_stack_book_restarts_for_a_new_run_or_another_process():
    book = StackBook()
    book.track(1, start_boottime_ns=5, window_start_ns=0, window_ns=NS)
    book.add(1, ("a",), (), 10)
    book.track(1, 5, NS, NS)  # the next window: same run
    assert book.top(1)[0]["samples"] == 10
    book.track(1, 5, 4 * NS, NS)  # a whole quiet window since: a new run
    assert book.top(1) == []
    book.add(1, ("b",), (), 3)
    book.track(1, 6, 5 * NS, NS)  # the pid now names another process
    assert book.top(1) == []


def test_stack_book_is_bounded():
    book = StackBook(max_processes=2, max_stacks=2)
    for tgid in (1, 2, 3):
        book.track(tgid, 0, 0, NS)
    assert len(book) == 2 and book.top(1) == []
    for frame, n in (("a", 5), ("b", 9), ("c", 100)):
        book.add(3, (frame,), (), n)
    assert [t["user"] for t in book.top(3)] == [["b"], ["a"]]  # the third distinct stack is only counted
    assert book._books[3].other == 100


# -- the alert's words ---------------------------------------------------------

TASK = TaskContext(tgid=4242, pid=4242, ppid=42, uid=0, gid=0, cgroup_id=1, start_boottime_ns=5, comm="worker",
                   exe="/usr/bin/worker")


def incident(stack=None, container=None, exited=False):
    rule = rules().rules[0]
    return Incident(id="i", rule=rule, key=4242, task=TASK, opened_ns=6 * NS, first_window_ns=0, base_total=0,
                    latest_total=290, peak_window_count=49, last_window_ns=5 * NS, key_exited=exited,
                    details={"cpu_share_percent": 98.4, "hot_for_s": 5.9}, stack=stack,
                    context={"subject": {"container_id": container}})


def test_open_summary_names_share_time_function_and_parent():
    stack = [{"samples": 90, "user": ["handle_batch", "run", "main"], "kernel": []}]
    s, _ = sensor()
    assert s.summarize(incident(stack), "open") == \
        "CPU high: PID 4242 (worker) used 98% of a core for 6s in handle_batch(), parent PID 42"
    assert s.summarize(incident(stack, container="3f2a1b0c9d8e7f6a5b4c"), "open").endswith(
        "parent PID 42, in container 3f2a1b0c9d8e")
    assert s.summarize(incident(), "open") == "CPU high: PID 4242 (worker) used 98% of a core for 6s, parent PID 42"
    raw = [{"samples": 9, "user": ["worker+0x1a2"], "kernel": []}]
    assert " in worker+0x1a2," in s.summarize(incident(raw), "open")


def test_resolved_summary():
    s, _ = sensor()
    assert s.summarize(incident(), "resolved") == \
        "CPU high is over: PID 4242 (worker) is back under 90% of a core (it used 98% of a core for 6s)"
    assert s.summarize(incident(exited=True), "resolved") == \
        "CPU high is over: PID 4242 (worker) exited after using 98% of a core for 6s"


def test_hot_frame_prefers_user_code_then_kernel():
    assert hot_frame(None) is None and hot_frame([]) is None
    assert hot_frame([{"samples": 1, "user": [], "kernel": ["clear_page_erms", "do_fault"]}]) == "clear_page_erms"
    assert hot_frame([{"samples": 1, "user": [LOST_FRAME], "kernel": ["vfs_read"]}]) == "vfs_read"
