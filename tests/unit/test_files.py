"""The file sensor's pure parts: decoding fd-burst records, directory top-k, summaries and details."""

from __future__ import annotations

from functools import partial

import numpy as np
from records_helpers import FakeBpfMap, crossing_head, task_record, tgid_key, unstarted_sensor

from ksift.events import TaskContext
from ksift.rules.incidents import NS, Incident
from ksift.rules.model import Rule, Severity
from ksift.sensors import files
from ksift.transport import records

fd_rule = partial(Rule, name="fd_burst", severity=Severity.WARNING, signal="file.open", key="tgid",
                  threshold=20000, window_s=2.0, cooldown_s=60.0)


def sensor(*rules: Rule) -> files.FileSensor:
    return unstarted_sensor(files.FileSensor, rules or (fd_rule(),))


def batch_of(*recs: tuple[int, int, np.ndarray]) -> np.ndarray:
    """Records as the ring buffer reader hands them over: (type, tgid, payload)."""
    return np.concatenate([task_record(rec_type, payload, tgid=tgid, ktime_ns=5 * NS + i, ppid=1, comm=b"indexer")
                           for i, (rec_type, tgid, payload) in enumerate(recs)])


def crossing(window_count=20001, sockets=0, total=25000, start=3 * NS) -> np.ndarray:
    p = np.zeros(1, dtype=files.FD_CROSSING)
    p["head"] = crossing_head(window_start_ns=start, total=total, window_count=window_count, threshold=20000)
    p["window_sockets"] = sockets
    return p


def dirs_value(slots: list[tuple[bytes, int, bool]], samples: int, unreadable: int = 0,
               lengths: dict[int, int] | None = None) -> np.ndarray:
    d = np.zeros(1, dtype=files.FD_DIRS)
    d["samples"], d["unreadable"] = samples, unreadable
    for i, (name, count, relative) in enumerate(slots):
        slot = d["slot"][0, i]
        slot["hash"] = 1000 + i
        slot["count"] = count
        slot["name"] = name[: records.PATH_LEN]
        slot["len"] = (lengths or {}).get(i, len(name))
        slot["relative"] = int(relative)
    return d


def dirs_map(entries: dict[int, np.ndarray]) -> FakeBpfMap:
    """A stand-in for the kernel's ks_fd_dirs map: tgid -> its directory samples."""
    return FakeBpfMap({tgid_key(tgid): value.tobytes() for tgid, value in entries.items()})


TASK = TaskContext(tgid=4321, pid=4321, ppid=1, uid=0, gid=0, cgroup_id=1, start_boottime_ns=5,
                   comm="indexer", exe="indexer")


def incident(details=None, peak=20113, first=3 * NS, resolved=None, count_total=None, exited=False) -> Incident:
    inc = Incident(id="i1", rule=fd_rule(), key=4321, task=TASK, opened_ns=first + NS, first_window_ns=first,
                   base_total=0, latest_total=count_total or peak, peak_window_count=peak, last_window_ns=first,
                   details=dict(details or {"files_at_crossing": 20001, "sockets_at_crossing": 0}))
    inc.resolved_ns = resolved
    inc.key_exited = exited
    return inc


# -- configuration -----------------------------------------------------------


def test_rule_thresholds_reach_rodata_and_only_needed_programs_attach():
    s = sensor(fd_rule(threshold=300, window_s=0.5))
    assert s.rodata() == {"fd_threshold": 300, "fd_window_ns": NS // 2}
    assert s.programs() == ["ks_fd_sys_exit", "ks_fd_proc_exit"]


def test_a_disabled_rule_attaches_nothing():
    s = sensor(fd_rule(enabled=False))
    assert s.programs() == [] and s.rodata() == {}
    assert s.decode(batch_of((files.REC_FD_CROSSING, 7, crossing()))).crossings == []


# -- decoding ----------------------------------------------------------------


def test_crossing_record_decodes_into_a_crossing_keyed_by_tgid():
    out = sensor().decode(batch_of((files.REC_FD_CROSSING, 4321, crossing(window_count=20113, sockets=13))))
    assert out.failed == 0 and len(out.crossings) == 1
    c = out.crossings[0]
    assert c.rule == "fd_burst" and c.key == 4321 and c.task.comm == "indexer"
    assert (c.window_count, c.total, c.window_start_ns) == (20113, 25000, 3 * NS)
    assert c.details == {"files_at_crossing": 20100, "sockets_at_crossing": 13}


def test_exit_record_decodes_into_final_totals_and_other_types_are_ignored():
    p = np.zeros(1, dtype=files.FD_EXIT)
    p["total"], p["exit_code"] = 61234, 256
    other = np.zeros(1, dtype=files.FD_EXIT)
    out = sensor().decode(batch_of((files.REC_FD_EXIT, 4321, p), (1, 55, other)))
    assert out.crossings == []
    assert [(e.rule, e.key, e.total, e.exit_code) for e in out.exits] == [("fd_burst", 4321, 61234, 256)]


def test_many_crossings_decode_in_one_batch():
    recs = [(files.REC_FD_CROSSING, 100 + i, crossing(window_count=20001 + i)) for i in range(50)]
    out = sensor().decode(batch_of(*recs))
    assert [c.key for c in out.crossings] == list(range(100, 150))
    assert [c.window_count for c in out.crossings] == list(range(20001, 20051))


# -- directories ---------------------------------------------------------------


def test_top_directories_sorted_with_their_share_of_readable_samples():
    d = dirs_value([(b"/srv/cold", 20, False), (b"/srv/hot", 70, False), (b"src", 8, True)],
                   samples=102, unreadable=2)[0]
    top = files.top_directories(d)
    assert top == [
        {"directory": "/srv/hot", "samples": 70, "share": 0.7},
        {"directory": "/srv/cold", "samples": 20, "share": 0.2},
        {"directory": "…/src", "samples": 8, "share": 0.08},
    ]
    assert files.top_directories(d, limit=1) == top[:1]


def test_a_directory_cut_by_the_kernel_is_marked():
    long_name = b"/" + b"d" * 200
    d = dirs_value([(long_name, 5, False)], samples=5, lengths={0: 201})[0]
    name = files.top_directories(d)[0]["directory"]
    assert name == long_name[: records.PATH_LEN].decode() + "…"


def test_the_kernel_keeps_the_rest_of_the_path_after_the_directory_but_it_is_cut():
    d = dirs_value([(b"/data/x/file-17", 3, False)], samples=3, lengths={0: len(b"/data/x")})[0]
    assert files.top_directories(d)[0]["directory"] == "/data/x"


def test_no_samples_means_no_directories():
    assert files.top_directories(np.zeros(1, dtype=files.FD_DIRS)[0]) == []
    # Every sample unreadable: directories without a share rather than a division by zero.
    d = dirs_value([(b"/x", 1, False)], samples=4, unreadable=4)[0]
    assert files.top_directories(d) == [{"directory": "/x", "samples": 1, "share": 0.0}]


def test_fd_noun_says_what_the_descriptors_were():
    assert files.fd_noun(100, 0) == "files"
    assert files.fd_noun(100, 100) == "sockets"
    assert files.fd_noun(100, 30) == "file descriptors"


# -- alerts ------------------------------------------------------------------


def test_open_summary_names_the_count_window_and_top_directory():
    s = sensor()
    s._dirs_map = dirs_map({4321: dirs_value([(b"/srv/hot", 62, False), (b"/srv/cold", 38, False)], 100)})
    inc = incident()
    assert s.summarize(inc, "open") == "PID 4321 (indexer) opened 20,113 files in the last 2s (62% in /srv/hot)"
    details = s.details(inc, "open")
    assert details["files_at_crossing"] == 20001 and details["sampled_opens"] == 100
    assert [d["directory"] for d in details["top_directories"]] == ["/srv/hot", "/srv/cold"]


def test_open_summary_without_samples_and_with_sockets():
    s = sensor()
    inc = incident(details={"files_at_crossing": 0, "sockets_at_crossing": 20001})
    assert s.summarize(inc, "open") == "PID 4321 (indexer) opened 20,113 sockets in the last 2s"
    assert s.details(inc, "open")["top_directories"] == []


def test_resolution_reports_directories_read_while_open_even_after_the_kernel_forgot_them():
    s = sensor()
    kernel = dirs_map({4321: dirs_value([(b"/srv/hot", 9, False)], 9)})
    s._dirs_map = kernel
    inc = incident(count_total=61234, resolved=3 * NS + int(6.2 * NS), exited=True)
    s.details(inc, "open")
    kernel.entries.clear()  # the process exited: the kernel dropped its entry
    assert s.summarize(inc, "resolved") == (
        "PID 4321 (indexer) fd burst is over and exited: 61,234 new files in 6.2s (peak 20,113 in 2s)")
    assert s.details(inc, "resolved")["top_directories"][0]["directory"] == "/srv/hot"
    # Resolved: the cache and the kernel entry are gone, so a later burst starts afresh.
    assert s._dirs == {} and kernel.deleted == [(4321).to_bytes(4, "little")]


def test_current_without_a_started_object_reads_nothing():
    assert sensor().current("fd_burst", 4321) is None
