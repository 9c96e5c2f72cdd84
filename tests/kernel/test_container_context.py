"""Container and pod context from real cgroups: docker, containerd (CRI), cri-o and kubepods layouts.

The test makes real cgroup v2 directories shaped like each runtime's (under a
scratch root of its own, so nothing of the host's is touched), runs a real
fork storm inside each, and checks the alert's container id, runtime, pod uid
and, through a kubelet stand-in serving /pods on loopback, the pod and
container names. The cgroups are removed afterwards.
"""

from __future__ import annotations

import json
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import (
    CGROUP2_ROOT,
    LoopbackHttpServer,
    QuietHandler,
    packaged_rule,
    remove_cgroup,
    run_forker,
    start_agent,
    wait_for,
    write_rules,
)


class NestedCgroups:
    """Real cgroup v2 directories under one scratch root; removed deepest first, stragglers moved out."""

    def __init__(self, relative_paths: list[str]):
        self.root = CGROUP2_ROOT / f"ksift-ctx-{uuid.uuid4().hex[:8]}"
        self.leaves = [self.root / rel for rel in relative_paths]

    def __enter__(self) -> "NestedCgroups":
        for leaf in self.leaves:
            leaf.mkdir(parents=True)
        return self

    def rel(self, leaf: Path) -> str:
        return "/" + str(leaf.relative_to(CGROUP2_ROOT))

    def __exit__(self, *exc) -> None:
        dirs = sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, self.root]:
            remove_cgroup(d, CGROUP2_ROOT)
        assert not self.root.exists(), f"could not remove {self.root}"


class FakeKubelet(LoopbackHttpServer):
    """Serves a PodList on /pods, like the kubelet's read-only port."""

    def __init__(self, pod_list: dict):
        body = json.dumps(pod_list).encode()
        self.requests = 0
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802 - the name http.server calls
                outer.requests += 1
                self.send_response(200 if self.path == "/pods" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
        self.url = self.base_url


def test_container_and_pod_context_for_each_runtime_layout(tmp_path: Path):
    ids = {name: secrets.token_hex(32) for name in ("docker", "containerd", "crio", "kubepods")}
    pods = {name: str(uuid.uuid4()) for name in ("containerd", "crio", "kubepods")}
    esc = {name: uid.replace("-", "_") for name, uid in pods.items()}  # the systemd driver's escaping
    layouts = {
        # name: (cgroup path under the scratch root, runtime, pod uid)
        "docker": (f"system.slice/docker-{ids['docker']}.scope", "docker", None),
        "containerd": (f"kubepods/besteffort/pod{pods['containerd']}/{ids['containerd']}", "containerd",
                       pods["containerd"]),
        "crio": (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{esc['crio']}.slice/"
                 f"crio-{ids['crio']}.scope", "cri-o", pods["crio"]),
        "kubepods": (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{esc['kubepods']}.slice/"
                     f"cri-containerd-{ids['kubepods']}.scope", "containerd", pods["kubepods"]),
    }
    runtime_scheme = {"containerd": "containerd", "crio": "cri-o", "kubepods": "containerd"}
    kubelet = FakeKubelet({"kind": "PodList", "items": [
        {"metadata": {"uid": pods[name], "name": f"{name}-pod-0", "namespace": f"ns-{name}"},
         "status": {"containerStatuses": [{"name": f"{name}-app",
                                           "containerID": f"{runtime_scheme[name]}://{ids[name]}"}]}}
        for name in pods]})
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
    config = tmp_path / "agent.toml"
    config.write_text(f'[kubernetes]\nenabled = true\nsource = "kubelet"\nkubelet_url = "{kubelet.url}"\n'
                      'refresh = "2s"\n')
    try:
        with NestedCgroups([layout[0] for layout in layouts.values()]) as cgroups:
            agent = start_agent(tmp_path / "agent", "--rules", str(rules), "--config", str(config))
            agent.wait_ready()
            # The pod list was fetched in the background.
            wait_for("the pod list fetched", lambda: kubelet.requests > 0, timeout=30, proc=agent.proc,
                     log=agent.stderr_path, interval=0.05)
            leaves = dict(zip(layouts, cgroups.leaves))
            with ThreadPoolExecutor(len(layouts)) as pool:
                futures = {name: pool.submit(run_forker, rate=150, seconds=3, comm=f"ks-{name}"[:15],
                                             cgroup=leaves[name]) for name in layouts}
                work = {name: f.result() for name, f in futures.items()}
            rels = {name: cgroups.rel(leaf) for name, leaf in leaves.items()}
            pids = {w["pid"] for w in work.values()}
            wait_for("an alert for each workload",
                     lambda: {a["subject"]["pid"] for a in agent.alerts() if a["rule"] == "fork_storm"} >= pids,
                     timeout=30, proc=agent.proc, log=agent.stderr_path, interval=0.1)
            assert agent.terminate() == 0, agent.stderr()
    finally:
        kubelet.close()

    alerts = agent.alerts()
    for name, (_, runtime, pod_uid) in layouts.items():
        opened = [a for a in alerts if a["rule"] == "fork_storm" and a["status"] == "open"
                  and a["subject"]["pid"] == work[name]["pid"]]
        assert len(opened) == 1, (name, opened)
        subject = opened[0]["subject"]
        assert subject["cgroup"] == rels[name], name
        assert (subject["container_id"], subject["container_runtime"], subject["pod_uid"]) == (
            ids[name], runtime, pod_uid), name
        if pod_uid is None:
            assert (subject["pod_name"], subject["pod_namespace"], subject["container_name"]) == (None,) * 3
        else:
            assert (subject["pod_name"], subject["pod_namespace"], subject["container_name"]) == (
                f"{name}-pod-0", f"ns-{name}", f"{name}-app"), name
    assert not cgroups.root.exists()
