"""The memory sensor's pure parts: the growth window logic, record decoding, cgroup paths, summaries."""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
from records_helpers import task_record, unstarted_sensor

from ksift.enrich.memlimit import MemoryLimit
from ksift.events import TaskContext
from ksift.rules.incidents import NS, Incident
from ksift.rules.model import Rule, Severity
from ksift.sensors import memory

MIB = memory.MIB
PAGE = 4096
WINDOW = 30 * NS


growth_rule = partial(Rule, name="memory_growth", severity=Severity.WARNING, signal="memory.rss_growth", key="tgid",
                      threshold=200, window_s=30.0, params={"min_growth_percent": 50.0, "step": 32 * MIB})
oom_rule = partial(Rule, name="oom_kill", severity=Severity.CRITICAL, signal="memory.oom_kill", key="victim",
                   threshold=0, window_s=60.0)


class FakePaths:
    """MemcgPaths stand-in: a fixed id -> path table per hierarchy kind."""

    def __init__(self, table: dict[tuple[bool, int], str] | None = None):
        self.table = table or {}
        self.asked: list[tuple[int, int]] = []

    def path(self, hierarchy_id: int, cgroup_id: int) -> str | None:
        self.asked.append((hierarchy_id, cgroup_id))
        return self.table.get((hierarchy_id == 0, cgroup_id))


class FakeLimits:
    """MemoryLimits stand-in: the same limits for every process (none by default: no projection)."""

    def __init__(self, *limits: MemoryLimit):
        self.limits = list(limits)
        self.asked: list[int] = []

    def of(self, pid: int) -> list[MemoryLimit]:
        self.asked.append(pid)
        return self.limits


def sensor(*rules: Rule, paths=None, limits=None) -> memory.MemorySensor:
    return unstarted_sensor(memory.MemorySensor, rules or (oom_rule(), growth_rule()), page_size=PAGE,
                            memcg_paths=paths or FakePaths(), memory_limits=limits or FakeLimits())


def series(*points: tuple[float, float]) -> list[tuple[int, int]]:
    """(seconds, MiB) points as (ktime_ns, bytes) samples."""
    return [(int(t * NS), int(m * MIB)) for t, m in points]


def judge(samples, threshold_mib=200, percent=50.0, window=WINDOW):
    return memory.rising_growth(samples, window, threshold_mib * MIB, percent)


# -- the growth condition ----------------------------------------------------------


def test_steady_growth_over_the_window_is_found_with_its_figures():
    # 120 MiB growing 32 MiB every 2 s: 120 -> 376 over 16 s.
    samples = series(*[(100 + 2 * i, 120 + 32 * i) for i in range(9)])
    g = judge(samples)
    assert g is not None
    assert (g.from_bytes, g.to_bytes) == (120 * MIB, 376 * MIB)
    assert g.growth_bytes == 256 * MIB and g.seconds == 16.0 and g.samples == 9
    assert g.percent == pytest.approx(213.3, abs=0.1)


def test_growth_must_exceed_the_threshold():
    samples = series(*[(100 + 2 * i, 100 + 25 * i) for i in range(9)])  # +200 MiB exactly
    assert judge(samples) is None
    assert judge(samples, threshold_mib=199) is not None


def test_growth_must_reach_the_minimum_share_of_where_it_started():
    samples = series(*[(100 + 2 * i, 1000 + 40 * i) for i in range(9)])  # +320 MiB on 1000 MiB: 32%
    assert judge(samples) is None
    assert judge(samples, percent=30.0) is not None


def test_one_allocation_then_holding_is_not_growth():
    # 300 MiB touched within a fraction of a second: reports in a burst, then nothing.
    samples = series(*[(100 + 0.02 * i, 32 + 32 * i) for i in range(10)])
    assert judge(samples) is None


def test_a_burst_then_one_late_step_is_not_growth():
    # 32 -> 320 in a burst, 15 s of holding, then one more step: the rise is all in its first half.
    samples = series(*[(100 + 0.02 * i, 32 + 32 * i) for i in range(10)], (115, 352))
    assert judge(samples) is None


def test_two_bursts_far_apart_within_the_window_count_as_growth():
    samples = series(*[(100 + 0.02 * i, 32 + 32 * i) for i in range(5)],
                     *[(116 + 0.02 * i, 192 + 32 * i) for i in range(5)])
    g = judge(samples)
    assert g is not None and g.from_bytes == 32 * MIB and g.to_bytes == 320 * MIB


def test_not_still_rising_when_the_latest_report_is_below_the_peak():
    samples = series(*[(100 + 2 * i, 120 + 32 * i) for i in range(9)], (118, 344))
    assert judge(samples) is None


def test_only_the_window_counts():
    # Slow growth: 32 MiB every 10 s. Over 30 s it adds 96 MiB only.
    samples = series(*[(100 + 10 * i, 100 + 32 * i) for i in range(20)])
    assert judge(samples) is None
    assert judge(samples, window=200 * NS) is not None


def test_the_rise_starts_at_the_latest_low():
    # Up, down, then up again: measured from the trough.
    samples = series((100, 400), (102, 200), (104, 100), (106, 164), (108, 228), (110, 292), (112, 356),
                     (114, 420))
    g = judge(samples, window=16 * NS)
    assert g is not None and g.from_bytes == 100 * MIB and g.from_ns == 104 * NS


def test_fewer_than_two_samples_decide_nothing():
    assert judge([]) is None
    assert judge(series((1, 500))) is None


# -- the tracker: chains of kernel reports ----------------------------------------------


def feed(tracker, key, points, identity=1):
    """Kernel-style reports (each carries the previous one's time and level); returns the last verdict."""
    out = None
    prev = points[0]
    for point in points[1:]:
        out = tracker.add(key, identity, int(prev[0] * NS), int(prev[1] * MIB), int(point[0] * NS),
                          int(point[1] * MIB))
        prev = point
    return out


def tracker(**kw) -> memory.GrowthTracker:
    base = dict(window_ns=WINDOW, threshold_bytes=200 * MIB, min_percent=50.0)
    base.update(kw)
    return memory.GrowthTracker(**base)


def test_tracker_chains_reports_and_finds_growth():
    t = tracker()
    g = feed(t, 7, [(100 + 2 * i, 40 + 32 * i) for i in range(10)])
    assert g is not None and g.from_bytes == 40 * MIB and g.to_bytes == (40 + 9 * 32) * MIB
    assert t.restarted == 0 and len(t) == 1


def test_a_report_that_does_not_chain_starts_the_series_over():
    t = tracker()
    feed(t, 7, [(100 + 2 * i, 40 + 32 * i) for i in range(4)])
    # A lost record: this report's previous point is not the one we hold.
    assert t.add(7, 1, 120 * NS, 300 * MIB, 122 * NS, 332 * MIB) is None
    assert t.restarted == 1


def test_a_recycled_pid_starts_a_new_series():
    t = tracker()
    feed(t, 7, [(100 + 2 * i, 40 + 32 * i) for i in range(6)])
    # Same pid, another process (start time differs), chaining by accident on the same timestamp.
    assert t.add(7, 2, 110 * NS, 200 * MIB, 111 * NS, 500 * MIB) is None
    assert t.restarted == 1


def test_tracker_is_bounded_and_forgets_quiet_processes():
    t = tracker(max_keys=3)
    for key in range(10):
        feed(t, key, [(100, 40), (101, 72)])
    assert len(t) == 3
    feed(t, 99, [(200, 40), (201, 72)])  # the others' last reports are out of the window now
    assert len(t) == 1


def test_tracker_drops_samples_older_than_the_window_but_keeps_the_chain():
    t = tracker(window_ns=10 * NS)
    feed(t, 5, [(100 + 5 * i, 40 + 32 * i) for i in range(8)])
    samples = t._series[5].samples
    assert samples[0][0] >= 125 * NS and samples[-1][0] == 135 * NS


def test_tracker_rejects_a_zero_window():
    with pytest.raises(ValueError):
        memory.GrowthTracker(0, 1, 1.0)


# -- decoding records ---------------------------------------------------------------------


def record_batch(rec_type: int, payloads: list[np.ndarray], ktimes: list[int], tgid=4242, comm=b"leaker",
                 start=777) -> np.ndarray:
    return np.concatenate([task_record(rec_type, payload, tgid=tgid, ktime_ns=ktime, comm=comm, start_boottime_ns=start)
                           for payload, ktime in zip(payloads, ktimes, strict=True)])


def oom_payload(**kw) -> np.ndarray:
    p = np.zeros(1, dtype=memory.OOM_KILL)
    values = dict(total_vm_pages=36859, anon_rss_pages=16128, file_rss_pages=1637, shmem_rss_pages=0,
                  pgtables_bytes=200704, memcg_id=501, limit_memcg_id=501, limit_pages=16384, usage_pages=16384,
                  oom_score_adj=-100, uid=1000, trigger_tgid=4242, limit_kind=1, limit_depth=0, hierarchy_id=4,
                  memcg_name=b"ksift-test-x", limit_name=b"ksift-test-x")
    values.update(kw)
    for name, value in values.items():
        p[name] = value
    return p


def test_oom_record_decodes_to_one_crossing_with_figures_and_the_limit():
    paths = FakePaths({(False, 501): "/ksift-test-x"})
    out = sensor(oom_rule(), paths=paths).decode(record_batch(memory.REC_OOM_KILL, [oom_payload()], [5 * NS]))
    assert out.failed == 0 and len(out.crossings) == 1
    c = out.crossings[0]
    assert (c.rule, c.key, c.window_count, c.ktime_ns) == ("oom_kill", 4242, 1, 5 * NS)
    d = c.details
    assert d["anon_rss_bytes"] == 16128 * PAGE and d["total_vm_bytes"] == 36859 * PAGE
    assert d["file_rss_bytes"] == 1637 * PAGE and d["pgtables_bytes"] == 200704
    assert d["oom_score_adj"] == -100 and d["uid"] == 1000 and d["trigger_pid"] == 4242
    assert d["memory_cgroup"] == "/ksift-test-x" and d["memory_cgroup_version"] == 1
    assert d["limit_cgroup"] == "/ksift-test-x" and d["limit_bytes"] == 64 * MIB
    assert d["limit_kind"] == "memory" and d["limit_levels_up"] == 0
    assert paths.asked == [(4, 501), (4, 501)]


def test_oom_of_a_parent_limit_and_a_removed_cgroup():
    paths = FakePaths({(True, 600): "/team"})
    p = oom_payload(memcg_id=601, limit_memcg_id=600, limit_depth=1, hierarchy_id=0, limit_kind=2,
                    memcg_name=b"job-1", limit_name=b"team")
    d = sensor(oom_rule(), paths=paths).decode(record_batch(memory.REC_OOM_KILL, [p], [NS])).crossings[0].details
    assert d["memory_cgroup"] == ".../job-1"  # gone already: the name the kernel captured
    assert d["limit_cgroup"] == "/team" and d["limit_kind"] == "memory+swap" and d["memory_cgroup_version"] == 2
    assert memory.oom_cause(d) == "memory+swap limit 64 MiB of parent cgroup /team reached"


def test_system_wide_oom_names_no_limit():
    p = oom_payload(limit_kind=0, limit_memcg_id=0, limit_pages=0, usage_pages=0, limit_name=b"")
    d = sensor(oom_rule()).decode(record_batch(memory.REC_OOM_KILL, [p], [NS])).crossings[0].details
    assert d["limit_cgroup"] is None and d["limit_bytes"] is None and d["limit_kind"] is None
    assert memory.oom_cause(d) == "no memory cgroup was at its limit (system-wide OOM)"


def test_a_failing_cgroup_lookup_costs_the_path_not_the_alert():
    class Broken:
        def path(self, hierarchy_id, cgroup_id):
            raise OSError("boom")

    out = sensor(oom_rule(), paths=Broken()).decode(record_batch(memory.REC_OOM_KILL, [oom_payload()], [NS]))
    assert out.failed == 0 and out.crossings[0].details["memory_cgroup"] == ".../ksift-test-x"


def step_payload(prev_ns: int, prev_mib: int, rss_mib: int) -> np.ndarray:
    p = np.zeros(1, dtype=memory.RSS_STEP)
    pages = rss_mib * MIB // PAGE
    p["rss_pages"], p["anon_pages"], p["file_pages"] = pages, pages - 256, 256
    p["prev_pages"], p["prev_ns"], p["reports"] = prev_mib * MIB // PAGE, prev_ns, 1
    return p


def growth_batch(points: list[tuple[float, int]], shuffle: bool = False) -> np.ndarray:
    payloads, ktimes = [], []
    for (t0, m0), (t1, m1) in zip(points, points[1:]):
        payloads.append(step_payload(int(t0 * NS), m0, m1))
        ktimes.append(int(t1 * NS))
    batch = record_batch(memory.REC_RSS_STEP, payloads, ktimes)
    return batch[::-1].copy() if shuffle else batch


def test_rss_steps_decode_into_a_growth_crossing():
    points = [(100 + 2 * i, 32 + 40 * i) for i in range(9)]  # 32 -> 352 MiB in 16 s
    out = sensor(growth_rule()).decode(growth_batch(points, shuffle=True))  # ring order may differ from time
    assert out.failed == 0 and out.crossings
    c = out.crossings[-1]
    assert c.rule == "memory_growth" and c.key == 4242
    assert c.window_start_ns == 100 * NS and c.ktime_ns == 116 * NS
    assert c.window_count == 320 and c.total == 352  # MiB grown, MiB now
    d = c.details
    assert d["from_bytes"] == 32 * MIB and d["to_bytes"] == 352 * MIB and d["seconds"] == 16.0
    assert d["growth_percent"] == 1000.0 and d["file_rss_bytes"] == 256 * PAGE


def test_quiet_rss_steps_give_no_crossing():
    points = [(100 + 0.01 * i, 32 + 32 * i) for i in range(10)]  # all at once
    assert sensor(growth_rule()).decode(growth_batch(points)).crossings == []


def test_records_of_a_disabled_rule_are_ignored():
    s = sensor(oom_rule())
    assert s.decode(growth_batch([(100 + 2 * i, 32 + 40 * i) for i in range(9)])).crossings == []
    assert sensor(growth_rule()).decode(record_batch(memory.REC_OOM_KILL, [oom_payload()], [NS])).crossings == []


def test_only_the_enabled_rules_hooks_are_attached():
    assert sensor(oom_rule()).programs() == ["ks_mark_victim"]
    assert sensor(growth_rule()).programs() == ["ks_rss_iter"]
    assert sensor().programs() == ["ks_mark_victim", "ks_rss_iter"]
    assert sensor(growth_rule(enabled=False), oom_rule(enabled=False)).programs() == []


def test_the_iterator_runs_once_a_second_only_for_memory_growth():
    assert sensor(growth_rule()).poll_interval_s == 1.0
    assert sensor().poll_interval_s == 1.0
    assert sensor(oom_rule()).poll_interval_s is None  # the tracepoint alone: nothing to poll
    # Short windows get at least 10 passes each, down to 4 a second.
    assert sensor(growth_rule(window_s=5.0)).poll_interval_s == 0.5
    assert sensor(growth_rule(window_s=1.0)).poll_interval_s == 0.25
    assert sensor(growth_rule(window_s=600.0)).poll_interval_s == 1.0


class FakeObject:
    """A loaded BpfObject stand-in that records the iterator passes it was asked for."""

    def __init__(self):
        self.runs: list[str] = []

    def run_iter(self, program: str) -> bytes:
        self.runs.append(program)
        return b""


def test_poll_runs_one_pass_of_the_iterator():
    s = sensor(growth_rule())
    s.poll()  # not started: nothing to run
    s.obj = FakeObject()
    s.poll()
    s.poll()
    assert s.obj.runs == ["ks_rss_iter", "ks_rss_iter"] and s.passes == 2
    oom_only = sensor(oom_rule())
    oom_only.obj = FakeObject()
    oom_only.poll()
    assert oom_only.obj.runs == []


def test_reports_sampled_once_a_second_several_steps_apart_are_growth():
    # A pass a second sees a 45 MiB/s grower: each report jumps more than one 32 MiB step.
    points = [(100 + i, 40 + 45 * i) for i in range(9)]  # 40 -> 400 MiB in 8 s
    out = sensor(growth_rule(window_s=15.0)).decode(growth_batch(points))
    assert out.failed == 0 and out.crossings
    first = out.crossings[0]
    assert first.window_start_ns == 100 * NS and first.ktime_ns == 108 * NS  # span >= half the window first here
    assert first.details["from_bytes"] == 40 * MIB and first.details["to_bytes"] == 400 * MIB


def test_one_allocation_seen_by_two_passes_is_not_growth():
    # 300 MiB touched in a fraction of a second: one pass saw it half way, the next at the top.
    assert sensor(growth_rule()).decode(growth_batch([(100, 120), (101, 300)])).crossings == []


def test_rodata_carries_the_step_in_pages():
    assert sensor(growth_rule()).rodata() == {"rss_step_pages": 8192}
    assert sensor(growth_rule(params={"min_growth_percent": 50.0, "step": 64 * MIB})).rodata() == {
        "rss_step_pages": 16384}
    assert sensor(oom_rule()).rodata() == {}


# -- summaries -----------------------------------------------------------------------------


def incident(rule: Rule, details: dict) -> Incident:
    task = TaskContext(tgid=991, pid=991, ppid=1, uid=0, gid=0, cgroup_id=1, start_boottime_ns=1, comm="leaker",
                       exe="/usr/bin/python3")
    return Incident(id="i", rule=rule, key=991, task=task, opened_ns=NS, first_window_ns=NS, base_total=0,
                    latest_total=1, peak_window_count=1, last_window_ns=NS, details=details)


def test_oom_summary_names_victim_cgroup_limit_and_rss():
    d = {"memory_cgroup": "/ksift-test-x", "limit_cgroup": "/ksift-test-x", "limit_kind": "memory",
         "limit_bytes": 64 * MIB, "anon_rss_bytes": 63 * MIB}
    s = sensor()
    assert s.summarize(incident(oom_rule(), d), "open") == (
        "OOM killer killed PID 991 (leaker) in cgroup /ksift-test-x: cgroup limit 64 MiB reached (anon RSS 63 MiB)")
    assert s.summarize(incident(oom_rule(), d), "resolved").startswith("OOM kill of PID 991 (leaker)")


def test_growth_summary_says_from_and_to():
    d = {"from_bytes": 120 * MIB, "to_bytes": 610 * MIB, "growth_bytes": 490 * MIB, "growth_percent": 408.3,
         "seconds": 30.0}
    s = sensor()
    assert s.summarize(incident(growth_rule(), d), "open") == (
        "PID 991 (leaker) RSS grew from 120 MiB to 610 MiB in 30s (+490 MiB, +408%), still rising")
    assert "stopped growing" in s.summarize(incident(growth_rule(), d), "resolved")


def test_mib_formatting():
    assert memory.mib(64 * MIB) == "64 MiB"
    assert memory.mib(3.5 * MIB) == "3.5 MiB"
    assert memory.mib(0) == "0 MiB"


# -- where the memory controller is mounted ------------------------------------------------

MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
28 25 0:25 / {memory} rw,relatime shared:12 - cgroup cgroup rw,memory
"""


def test_finds_the_v1_memory_mount():
    assert memory.find_memory_v1_mount(MOUNTINFO.format(memory="/sys/fs/cgroup/memory")) == "/sys/fs/cgroup/memory"
    assert memory.find_memory_v1_mount(MOUNTINFO.splitlines()[1]) is None
    assert memory.find_memory_v1_mount("garbage line\n") is None


def test_memcg_paths_resolve_ids_from_the_v1_tree(tmp_path):
    root = tmp_path / "memory"
    (root / "team" / "job").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO.format(memory=root))
    paths = memory.MemcgPaths(str(mountinfo))
    assert paths.path(4, os.stat(root / "team" / "job").st_ino) == "/team/job"
    assert paths.path(4, os.stat(root / "team").st_ino) == "/team"
    assert paths.path(4, 0) is None


def test_memcg_paths_without_a_mount_give_none(tmp_path):
    paths = memory.MemcgPaths(str(tmp_path / "missing"))
    assert paths.path(4, 12345) is None
    assert paths.path(0, 12345) is None


# -- projection toward a limit (params.eta) ---------------------------------------------


def cgroup_limit(limit_mib: int, available_mib: int, path: str = "/ksift-test-x") -> MemoryLimit:
    return MemoryLimit("cgroup", limit_mib * MIB, available_mib * MIB, cgroup=path, version=1,
                       usage_bytes=(limit_mib - available_mib) * MIB)


def host_limit(available_mib: int) -> MemoryLimit:
    return MemoryLimit("host", 8192 * MIB, available_mib * MIB)


def test_recent_rate_reads_the_latest_rising_reports():
    rise = memory.recent_rate(series((0, 40), (1, 80), (2, 120), (3, 160), (4, 200)))
    assert rise is not None and rise.samples == 4  # at most four: the latest few
    assert (rise.from_bytes, rise.to_bytes, rise.seconds) == (80 * MIB, 200 * MIB, 3.0)
    assert memory.rate_bytes_per_s(rise) == 40 * MIB


def test_recent_rate_needs_three_rising_reports_over_enough_time():
    assert memory.recent_rate(series((0, 40), (1, 300))) is None  # one allocation seen by two passes
    assert memory.recent_rate(series((0, 300), (1, 200), (2, 240), (3, 280))) is not None
    assert memory.recent_rate(series((0, 300), (1, 200), (2, 280))) is None  # only two since it fell
    assert memory.recent_rate(series((0, 40), (0.1, 80), (0.2, 120)), min_ns=int(1.5 * NS)) is None
    assert memory.recent_rate(series((0, 40), (1, 80), (2, 120)), min_ns=int(1.5 * NS)) is not None
    assert memory.recent_rate([]) is None


def test_time_to_limit_takes_the_nearest_limit():
    cg, host = cgroup_limit(512, 360), host_limit(4000)
    limit, eta = memory.time_to_limit(40 * MIB, [cg, host])
    assert limit is cg and eta == 9.0
    limit, eta = memory.time_to_limit(40 * MIB, [cgroup_limit(8192, 8000), host])
    assert limit is host and eta == 100.0
    assert memory.time_to_limit(0.0, [cg]) is None and memory.time_to_limit(40 * MIB, []) is None


def fast_points(n: int = 4) -> list[tuple[float, int]]:
    return [(100 + i, 40 + 40 * i) for i in range(n)]  # 40 MiB/s, a pass a second


def test_a_fast_grower_near_its_cgroup_limit_crosses_before_the_window_says_so():
    limits = FakeLimits(cgroup_limit(512, 392), host_limit(20000))
    out = sensor(growth_rule(), limits=limits).decode(growth_batch(fast_points()))
    assert out.failed == 0 and len(out.crossings) == 2  # the second and the third report: three samples
    c = out.crossings[0]
    assert c.ktime_ns == 102 * NS and c.window_start_ns == 100 * NS
    d = c.details
    assert d["rate_bytes_per_s"] == 40 * MIB and d["eta_s"] == 9.8
    assert d["limit"] == {"kind": "cgroup", "cgroup": "/ksift-test-x", "cgroup_version": 1,
                          "limit_bytes": 512 * MIB, "usage_bytes": 120 * MIB, "available_bytes": 392 * MIB}
    assert d["from_bytes"] == 40 * MIB and d["to_bytes"] == 120 * MIB and d["seconds"] == 2.0
    assert c.window_count == 80 and c.total == 120
    assert limits.asked == [4242, 4242]  # once per report that gave a rate (not the first: two samples)


def test_the_same_grower_far_from_any_limit_is_quiet():
    limits = FakeLimits(cgroup_limit(8192, 8000), host_limit(20000))  # 200 s away
    assert sensor(growth_rule(), limits=limits).decode(growth_batch(fast_points())).crossings == []


def test_eta_zero_turns_the_projection_off():
    rule = growth_rule(params={"min_growth_percent": 50.0, "step": 32 * MIB, "eta": 0.0})
    limits = FakeLimits(cgroup_limit(512, 100))
    assert sensor(rule, limits=limits).decode(growth_batch(fast_points())).crossings == []
    assert limits.asked == []


def test_one_big_allocation_near_the_limit_is_no_projection():
    limits = FakeLimits(cgroup_limit(512, 50))
    assert sensor(growth_rule(), limits=limits).decode(growth_batch([(100, 40), (101, 400)])).crossings == []
    # ten steps reported within a tenth of a second: no rate either (three passes span two poll intervals)
    points = [(100 + 0.01 * i, 32 + 32 * i) for i in range(10)]
    assert sensor(growth_rule(), limits=limits).decode(growth_batch(points)).crossings == []


def test_a_failing_limit_lookup_costs_the_projection_not_the_sensor():
    class Broken:
        def of(self, pid):
            raise OSError("gone")

    out = sensor(growth_rule(), limits=Broken()).decode(growth_batch(fast_points()))
    assert out.failed == 0 and out.crossings == []


def test_growth_summary_with_a_projection_names_rate_limit_and_eta():
    d = {"from_bytes": 40 * MIB, "to_bytes": 120 * MIB, "growth_bytes": 80 * MIB, "growth_percent": 200.0,
         "seconds": 2.0, **memory.projection_details(memory.Growth(40 * MIB, 0, 120 * MIB, 2 * NS, 3), 40 * MIB,
                                                       cgroup_limit(512, 360), 9.0)}
    s = sensor()
    assert s.summarize(incident(growth_rule(), d), "open") == (
        "PID 991 (leaker) RSS grows 40 MiB/s (now 120 MiB); its cgroup limit of 512 MiB (/ksift-test-x) "
        "is reached in about 9 s")
    d.update(memory.projection_details(memory.Growth(40 * MIB, 0, 120 * MIB, 2 * NS, 3), 40 * MIB,
                                       host_limit(1000), 25.0))
    assert s.summarize(incident(growth_rule(), d), "open").endswith(
        "; the host's available memory (1000 MiB) is reached in about 25 s")
    assert "stopped growing" in s.summarize(incident(growth_rule(), d), "resolved")


def test_an_oom_kill_names_the_growth_incident_of_the_same_process():
    s = sensor()
    growth = incident(growth_rule(), {"from_bytes": 0, "to_bytes": MIB, "growth_bytes": MIB, "seconds": 1.0})
    growth.id = "g-1"
    s.summarize(growth, "open")
    kill = incident(oom_rule(), {"memory_cgroup": "/x", "limit_kind": None, "anon_rss_bytes": MIB})
    s.summarize(kill, "open")
    assert kill.details["growth_incident"] == "g-1"
    # Another process, or the same pid recycled (another start time): no growth incident.
    other = incident(oom_rule(), {"memory_cgroup": "/x", "limit_kind": None, "anon_rss_bytes": MIB})
    other.task = TaskContext(tgid=991, pid=991, ppid=1, uid=0, gid=0, cgroup_id=1, start_boottime_ns=2,
                             comm="leaker", exe=None)
    s.summarize(other, "open")
    assert other.details["growth_incident"] is None


def test_growth_incidents_remembered_are_bounded():
    s = sensor()
    for tgid in range(memory.GROWTH_INCIDENTS + 10):
        inc = incident(growth_rule(), {"from_bytes": 0, "to_bytes": MIB, "growth_bytes": MIB, "seconds": 1.0})
        inc.task = TaskContext(tgid=tgid, pid=tgid, ppid=1, uid=0, gid=0, cgroup_id=1, start_boottime_ns=1,
                               comm="x", exe=None)
        s.summarize(inc, "open")
    assert len(s.growth_incidents) == memory.GROWTH_INCIDENTS and 0 not in s.growth_incidents
