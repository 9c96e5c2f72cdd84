"""The one way tests build alerts: through the model (ksift.alert_model), as build_alert does.

make_alert() is a complete fork_storm `open` alert, as every sink receives it;
keyword overrides replace top-level keys of its JSON dict as they are (so a
test can also hand a sink a partial subject, an unknown key or a bad value).
"""

from __future__ import annotations

from typing import Any

from ksift.alert_model import Alert, Ancestor, Subject

CONTAINER_ID = "0123456789abcdef" * 4


def make_subject(**overrides: Any) -> dict[str, Any]:
    """The subject of make_alert(): bash in a docker container, with keys overridden."""
    subject = Subject(
        pid=1234, ppid=1200, comm="bash", exe="/usr/bin/bash", cmdline=["bash", "-c", "f(){ f|f& };f"], uid=0,
        start_boottime_ns=1, cgroup_id=4242, cgroup=f"/system.slice/docker-{CONTAINER_ID}.scope",
        container_id=CONTAINER_ID, container_runtime="docker", pod_uid=None, systemd_unit=None, pod_name=None,
        pod_namespace=None, container_name=None,
    ).to_dict()
    subject.update(overrides)
    return subject


def make_alert(n: int = 1, **overrides: Any) -> dict[str, Any]:
    """Alert number n (id a{n}, incident inc-{n}) of a fork storm, with top-level keys overridden."""
    alert = Alert(
        id=f"a{n}", incident_id=f"inc-{n}", status="open", ts="2026-11-25T00:10:00.123Z", rule="fork_storm",
        severity="warning", summary="PID 1234 (bash) forked 57 times in the last 1s", count=57,
        peak_window_count=57, window_s=1.0, threshold=50, subject=Subject(**make_subject()),
        ancestry=[Ancestor(pid=1200, comm="sshd"), Ancestor(pid=1, comm="systemd")], details=None, stack=None,
        suppressed=0, degraded=None, started_at="2026-11-25T00:10:00.000Z", resolved_at=None, duration_s=None,
        subject_exited=False,
    ).to_dict()
    alert.update(overrides)
    return alert


def resolved(alert: dict[str, Any], after_s: float = 5.0) -> dict[str, Any]:
    """The `resolved` alert of the same incident, after_s after it started (at 00:10:00)."""
    return dict(alert, id=alert["id"] + "-r", status="resolved",
                resolved_at=f"2026-11-25T00:10:{after_s:06.3f}Z", duration_s=after_s)
