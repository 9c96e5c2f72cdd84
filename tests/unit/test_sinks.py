import io
import json

import pytest
from alert_factory import make_alert, make_subject

from ksift.sinks.base import Sink
from ksift.sinks.console import ConsoleSink, format_alert_text
from ksift.sinks.store import StoreSink
from ksift.store.sqlite import AlertStore


class BrokenPipeStream:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


# -- protocol --------------------------------------------------------------


def test_sinks_satisfy_the_protocol(tmp_path):
    with AlertStore(tmp_path / "a.db") as store:
        for sink in (ConsoleSink(io.StringIO(), json_lines=True), StoreSink(store)):
            assert isinstance(sink, Sink)
            assert sink.name
            assert (sink.delivered, sink.failed) == (0, 0)


# -- console: JSON lines ---------------------------------------------------


def test_json_lines_parse_back():
    stream = io.StringIO()
    sink = ConsoleSink(stream, json_lines=True)
    first, second = make_alert(extra_key="kept"), make_alert(2, summary="naïve ✓")
    sink.emit(first)
    sink.emit(second)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert [json.loads(line) for line in lines] == [first, second]
    assert sink.delivered == 2 and sink.failed == 0


def test_json_lines_are_compact_and_flushed():
    class Recorder(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1
            super().flush()

    stream = Recorder()
    ConsoleSink(stream, json_lines=True).emit(make_alert())
    assert stream.flushes >= 1
    assert ", " not in stream.getvalue().split('"summary"')[0]  # compact separators


# -- console: text -----------------------------------------------------------


def test_text_format_contains_the_essentials():
    subject = make_subject(container_id="abc123def4567890abcdef", pod_uid="pod-uid-1")
    text = format_alert_text(make_alert(incident_id="inc-7f3a", suppressed=3, subject=subject))
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[0] == (
        "2026-11-25T00:10:00.123Z WARNING fork_storm OPEN  PID 1234 (bash) forked 57 times in the last 1s"
    )
    assert "  process: /usr/bin/bash bash -c 'f(){ f|f& };f' (uid 0)" in lines
    assert "  parent:  1200 (sshd) <- 1 (systemd)" in lines
    cgroup_line = next(line for line in lines if line.startswith("  cgroup:"))
    assert "container: abc123def456 (docker)" in cgroup_line
    assert "container: abc123def4567" not in cgroup_line  # short container id
    assert "pod: pod-uid-1" in cgroup_line
    assert "  incident: inc-7f3a  count 57 in 1s (threshold 50)  suppressed 3" in lines
    assert "DEGRADED" not in text and "RESOLVED" not in text


def test_text_format_omits_lines_whose_fields_are_all_null():
    subject = dict.fromkeys(make_alert()["subject"])
    text = format_alert_text(make_alert(subject=subject, ancestry=[], suppressed=0))
    assert "process:" not in text
    assert "parent:" not in text
    assert "cgroup:" not in text
    assert "suppressed" not in text
    assert "incident:" in text


def test_text_format_falls_back_to_ppid_and_comm():
    subject = dict.fromkeys(make_alert()["subject"])
    subject.update(ppid=77, comm="curl", cgroup_id=9)
    text = format_alert_text(make_alert(subject=subject, ancestry=[]))
    assert "  process: curl\n" in text
    assert "  parent:  77\n" in text
    assert "  cgroup:  id 9\n" in text


def test_text_format_degraded_and_resolved():
    alert = make_alert(
        status="resolved",
        degraded={"records_lost": 12, "reason": "ring buffer full"},
        resolved_at="2026-11-25T00:10:03.323Z",
        duration_s=3.2,
    )
    text = format_alert_text(alert)
    assert " RESOLVED " in text.splitlines()[0]
    assert "  DEGRADED: 12 records lost (ring buffer full)\n" in text
    assert "  RESOLVED after 3.2s\n" in text


def test_text_format_marks_a_cmdline_the_kernel_cut_short():
    def text(**cut):
        return format_alert_text(make_alert(subject=make_subject(cmdline=["python3", "-c", "xx"], **cut)))

    assert "python3 -c xx..." in text(cmdline_truncated=True)
    assert "python3 -c xx..." not in text()


def test_text_format_truncates_long_cmdlines():
    subject = make_subject(cmdline=["python3", "-c", "x" * 5000])
    text = format_alert_text(make_alert(subject=subject))
    process_line = next(line for line in text.splitlines() if "process:" in line)
    assert len(process_line) < 300
    assert "..." in process_line


def test_text_format_escapes_control_characters():
    # comm and argv are chosen by the traced process: they must not forge lines.
    subject = make_subject(comm="evil\nFAKE", cmdline=["sh", "a\nCRITICAL fake"])
    text = format_alert_text(make_alert(subject=subject, summary="PID 1 (evil\nFAKE) forked"))
    assert not any(line.startswith(("FAKE", "CRITICAL")) for line in text.splitlines())
    assert "\\n" in text


def test_text_format_survives_a_sparse_alert():
    text = format_alert_text({"summary": "something happened"})
    assert "something happened" in text


def test_text_sink_writes_blocks():
    stream = io.StringIO()
    sink = ConsoleSink(stream, json_lines=False)
    sink.emit(make_alert())
    assert stream.getvalue() == format_alert_text(make_alert())
    assert sink.delivered == 1


# -- console: failures -------------------------------------------------------


@pytest.mark.parametrize("json_lines", [True, False])
def test_closed_stream_counts_failed_and_does_not_raise(json_lines):
    stream = io.StringIO()
    stream.close()
    sink = ConsoleSink(stream, json_lines=json_lines)
    sink.emit(make_alert())
    sink.emit(make_alert())
    assert (sink.delivered, sink.failed) == (0, 2)
    sink.close()


def test_broken_pipe_counts_failed_and_does_not_raise():
    sink = ConsoleSink(BrokenPipeStream(), json_lines=True)
    sink.emit(make_alert())
    assert (sink.delivered, sink.failed) == (0, 1)
    sink.close()


def test_unencodable_text_counts_failed():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    sink = ConsoleSink(stream, json_lines=False)
    sink.emit(make_alert(summary="snowman ☃"))
    assert sink.failed == 1


def test_console_close_does_not_close_the_stream():
    stream = io.StringIO()
    ConsoleSink(stream, json_lines=True).close()
    assert not stream.closed


# -- store sink ----------------------------------------------------------------


def test_store_sink_saves_alerts(tmp_path):
    store = AlertStore(tmp_path / "alerts.db")
    sink = StoreSink(store)
    sink.emit(make_alert(extra_key="kept"))
    assert store.get("a1") == make_alert(extra_key="kept")
    assert (sink.delivered, sink.failed) == (1, 0)
    sink.close()
    sink.close()


def test_store_sink_counts_errors_and_does_not_raise(tmp_path, caplog):
    store = AlertStore(tmp_path / "alerts.db")
    sink = StoreSink(store)
    sink.emit({"id": "broken"})  # missing required fields
    store.close()
    sink.emit(make_alert())  # store closed underneath
    sink.emit("not a dict")  # type: ignore[arg-type]
    assert sink.flush(5)  # the writer thread has tried them all
    assert (sink.delivered, sink.failed) == (0, 3)
    assert "broken" in caplog.text


def test_text_shows_the_hottest_stacks_and_scalar_details():
    alert = make_alert(
        stack=[{"samples": 40, "user": ["handle_batch", "main"], "kernel": []},
               {"samples": 9, "user": ["memcpy"], "kernel": ["do_syscall_64"]},
               {"samples": 1, "user": ["other"], "kernel": []}],
        details={"method": "GET", "path": "/api/orders", "duration_ms": 812, "histogram": [1, 2, 3]},
    )
    text = format_alert_text(alert)
    assert "  stack (40 samples):\n    user:\n      handle_batch\n      main\n" in text
    assert "    kernel:\n      do_syscall_64" in text
    assert "other" not in text and "1 more stacks in the JSON" in text
    assert "details: method=GET path=/api/orders duration_ms=812" in text
    assert "histogram" not in text  # lists stay in the JSON


def test_text_escapes_details_from_the_traced_process():
    text = format_alert_text(make_alert(details={"path": "/x\nFAKE ALERT"}, stack=["a\nb"]))
    assert "\nFAKE ALERT" not in text and "\nb" not in text


def test_text_and_slack_show_the_remediation_decision():
    from ksift.sinks.slack import slack_message

    decision = {"decision_id": "d1", "action": "kill_tree", "mode": "enforce", "status": "done", "guard": None,
                "reason": None, "summary": "done: kill_tree pid 1234 (bash) and its tree (1 process)", "outcome": None}
    text = format_alert_text(make_alert(remediation=decision))
    assert "  action:  done: kill_tree pid 1234 (bash) and its tree (1 process)\n" in text
    assert "action:" not in format_alert_text(make_alert())
    blocks = slack_message(make_alert(remediation=decision))["blocks"]
    assert any("*Remediation*\ndone: kill_tree" in (b.get("text") or {}).get("text", "") for b in blocks)
