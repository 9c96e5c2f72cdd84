"""Kubernetes pod names: config, PodList parsing, the background cache, and real HTTP(S) sources on loopback."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ksift.config import parse_config
from ksift.enrich.kubernetes import (
    HttpPodSource,
    KubernetesSettings,
    PodContext,
    PodMetadataResolver,
    build_pod_resolver,
    parse_kubernetes,
    parse_pod_list,
    pod_list_url,
)
from ksift.errors import ConfigError

SOURCE = "agent.toml"
CID = "0123456789abcdef" * 4
CID2 = "fedcba9876543210" * 4
POD = "1a2b3c4d-5e6f-7a8b-9c0d-112233445566"
POD2 = "99999999-5e6f-7a8b-9c0d-112233445566"
TOKEN = "sa-token-0123456789abcdef"


def pod(uid: str, name: str, namespace: str = "shop", containers: tuple = ()) -> dict:
    return {"metadata": {"uid": uid, "name": name, "namespace": namespace},
            "status": {"containerStatuses": [{"name": n, "containerID": cid} for n, cid in containers]}}


POD_LIST = {"kind": "PodList", "items": [
    pod(POD, "web-0", containers=(("nginx", f"containerd://{CID}"),)),
    pod(POD2, "db-0", "data", containers=(("pg", f"cri-o://{CID2}"),)),
]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- config ---------------------------------------------------------------------------------


def test_defaults_and_values():
    assert parse_kubernetes({}, SOURCE) == KubernetesSettings()
    assert parse_kubernetes({}, SOURCE).enabled is False
    s = parse_kubernetes({"enabled": True, "source": "kubelet", "kubelet_url": "http://127.0.0.1:10255/",
                          "refresh": "10s", "timeout": "500ms", "retain": "0s", "node_name": " n1 "}, SOURCE)
    assert (s.enabled, s.source, s.kubelet_url, s.refresh_s, s.timeout_s, s.retain_s, s.node_name) == (
        True, "kubelet", "http://127.0.0.1:10255", 10.0, 0.5, 0.0, "n1")
    assert parse_config('[kubernetes]\nenabled = true\n', SOURCE).section("kubernetes").enabled


@pytest.mark.parametrize(
    ("table", "field", "detail"),
    [
        ({"enable": True}, "kubernetes.enable", "unknown field (allowed: enabled, source"),
        ({"enabled": "yes"}, "kubernetes.enabled", "must be true or false"),
        ({"source": "etcd"}, "kubernetes.source", "'etcd' (expected one of: apiserver, kubelet)"),
        ({"kubelet_url": "127.0.0.1:10250"}, "kubernetes.kubelet_url", "must be an http:// or https:// URL"),
        ({"kubelet_url": ""}, "kubernetes.kubelet_url", "must be an http"),
        ({"api_url": 5}, "kubernetes.api_url", "5"),
        ({"refresh": "10ms"}, "kubernetes.refresh", "must be between 1s and 1h"),
        ({"timeout": "1m"}, "kubernetes.timeout", "must be between 100ms and 30s"),
        ({"token_file": 1}, "kubernetes.token_file", "must be a string"),
    ],
)
def test_config_errors_name_the_field(table, field, detail):
    with pytest.raises(ConfigError) as err:
        parse_kubernetes(table, SOURCE)
    assert err.value.field == field and detail in err.value.message


def test_pod_list_url_for_each_source():
    api = KubernetesSettings(enabled=True)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "NODE_NAME": "node-1"}
    assert pod_list_url(api, env) == "https://10.96.0.1:443/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1"
    v6 = dict(env, KUBERNETES_SERVICE_HOST="fd00::1")
    assert pod_list_url(api, v6).startswith("https://[fd00::1]:443/api/v1/pods?")
    explicit = KubernetesSettings(enabled=True, api_url="https://k8s:6443", node_name="n2")
    assert pod_list_url(explicit, {}) == "https://k8s:6443/api/v1/pods?fieldSelector=spec.nodeName%3Dn2"
    assert pod_list_url(KubernetesSettings(source="kubelet"), {}) == "https://127.0.0.1:10250/pods"
    with pytest.raises(ConfigError) as err:
        pod_list_url(api, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert err.value.field == "kubernetes.node_name"
    with pytest.raises(ConfigError) as err:
        pod_list_url(api, {"NODE_NAME": "n"})
    assert err.value.field == "kubernetes.api_url"
    assert build_pod_resolver(KubernetesSettings()) is None  # off by default: nothing is built


# -- PodList ------------------------------------------------------------------------------------


def test_parse_pod_list_indexes_pods_and_every_kind_of_container():
    doc = {"items": [
        {"metadata": {"uid": POD.upper(), "name": "web-0", "namespace": "shop"},
         "status": {"containerStatuses": [{"name": "nginx", "containerID": f"containerd://{CID}"},
                                          {"name": "waiting"}],  # not started: no id yet
                    "initContainerStatuses": [{"name": "init", "containerID": f"docker://{CID2}"}],
                    "ephemeralContainerStatuses": [{"name": "debug", "containerID": "cri-o://abc"}]}},
        {"metadata": {"name": "no-uid", "namespace": "x"}},
        "garbage",
        {"metadata": {"uid": POD2, "name": "pending", "namespace": "x"}, "status": {}},
    ]}
    index = parse_pod_list(doc)
    assert dict(index.pods) == {POD: ("web-0", "shop"), POD2: ("pending", "x")}
    assert dict(index.containers) == {CID: (POD, "nginx"), CID2: (POD, "init"), "abc": (POD, "debug")}
    assert index.malformed == 2
    with pytest.raises(ValueError):
        parse_pod_list({"kind": "Status", "message": "forbidden"})


# -- the cache ------------------------------------------------------------------------------------


def test_lookup_reads_only_the_cache_and_refresh_fills_it():
    calls = []
    clock = FakeClock()

    def fetch() -> bytes:
        calls.append(clock.now)
        return json.dumps(POD_LIST).encode()

    r = PodMetadataResolver(fetch, clock=clock)
    assert r.lookup(POD, CID) is None and calls == []  # cold: no network on the caller's path
    assert r.refresh()
    assert r.lookup(POD, CID) == PodContext("web-0", "shop", "nginx")
    assert r.lookup(None, CID2) == PodContext("db-0", "data", "pg")  # the container id alone is enough
    assert r.lookup(POD2, None) == PodContext("db-0", "data", None)
    assert r.lookup("nope", None) is None
    assert r.stats()["hits"] == 3 and r.stats()["misses"] == 2 and r.size == 2


def test_gone_pods_are_kept_for_retain_then_dropped():
    clock = FakeClock()
    lists = [POD_LIST, {"items": [POD_LIST["items"][1]]}, {"items": [POD_LIST["items"][1]]}]
    r = PodMetadataResolver(lambda: json.dumps(lists.pop(0)).encode(), retain_s=60, clock=clock)
    r.refresh()
    clock.now += 30
    r.refresh()  # web-0 is gone from the list but was seen 30 s ago
    assert r.lookup(POD, CID) == PodContext("web-0", "shop", "nginx")
    clock.now += 31
    r.refresh()
    assert r.lookup(POD, CID) is None and r.lookup(POD2, None).pod_name == "db-0"


def test_a_failed_refresh_keeps_the_cache_and_counts():
    answers = [json.dumps(POD_LIST).encode(), b"<html>proxy error</html>", OSError("connection refused")]

    def fetch() -> bytes:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    r = PodMetadataResolver(fetch, clock=FakeClock())
    assert r.refresh() and not r.refresh() and not r.refresh()
    assert r.refresh_errors == 2 and "connection refused" in r.last_error
    assert r.lookup(POD, None).pod_name == "web-0"


def test_a_miss_wakes_the_background_thread():
    fetched = threading.Semaphore(0)
    lists = [{"items": []}, POD_LIST]

    def fetch() -> bytes:
        try:
            return json.dumps(lists.pop(0) if lists else POD_LIST).encode()
        finally:
            fetched.release()

    r = PodMetadataResolver(fetch, refresh_s=3600, min_refresh_s=0)
    r.start()
    try:
        assert fetched.acquire(timeout=20)  # the first list: empty
        deadline = time.monotonic() + 20
        while r.lookup(POD, CID) is None:  # each miss nudges the thread; refresh_s alone would take an hour
            assert time.monotonic() < deadline, r.stats()
            time.sleep(0.01)
        assert r.lookup(POD, CID).container_name == "nginx"
    finally:
        r.close()


# -- real HTTP(S) sources -------------------------------------------------------------------------


class PodServer:
    """A kubelet/API server stand-in on 127.0.0.1: serves POD_LIST and records the requests."""

    def __init__(self, tls: tuple[Path, Path] | None = None, hang: bool = False):
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the name http.server calls
                outer.requests.append((self.path, self.headers.get("Authorization")))
                if hang:
                    time.sleep(30)
                    return
                body = json.dumps(POD_LIST).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "PodServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_read_only_kubelet_port_over_http_gets_no_token(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    with PodServer() as server:
        source = HttpPodSource(server.url + "/pods", str(token), None, insecure=False, timeout_s=5)
        assert json.loads(source()) == POD_LIST
    assert server.requests == [("/pods", None)]  # a token never goes over plain HTTP


def test_api_server_over_tls_with_ca_and_token(tmp_path: Path, tls_files):
    cert, _ = tls_files
    token = tmp_path / "token"
    token.write_text(TOKEN)
    settings = KubernetesSettings(enabled=True, node_name="node-1", token_file=str(token), ca_file=str(cert))
    with PodServer(tls=tls_files) as server:
        resolver = build_pod_resolver(KubernetesSettings(**{**settings.__dict__, "api_url": server.url}))
        assert resolver.refresh(), resolver.last_error
        assert resolver.lookup(POD, CID) == PodContext("web-0", "shop", "nginx")
        token.write_text("rotated-token-0123456789")  # projected tokens rotate: read on every fetch
        assert resolver.refresh()
        # The wrong CA is refused, unless verification is explicitly off (self-signed kubelets).
        wrong = HttpPodSource(server.url + "/pods", None, str(tmp_path / "missing.pem"), False, 5)
        with pytest.raises(OSError):
            wrong()
        assert json.loads(HttpPodSource(server.url + "/pods", None, None, True, 5)()) == POD_LIST
    assert server.requests[:2] == [("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1", f"Bearer {TOKEN}"),
                                   ("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1",
                                    "Bearer rotated-token-0123456789")]


@pytest.mark.parametrize("kind", ["never answers", "nothing listens"])
def test_unreachable_source_leaves_fields_null_without_waiting(kind):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = PodServer(hang=True) if kind == "never answers" else None
    url = server.url if server else f"http://127.0.0.1:{port}"
    if server:
        server.__enter__()
    settings = KubernetesSettings(enabled=True, source="kubelet", kubelet_url=url, timeout_s=0.5)
    resolver = build_pod_resolver(settings)
    resolver.start()
    try:
        started = time.monotonic()
        results = [resolver.lookup(POD, CID) for _ in range(100)]
        # Had lookups waited on the fetch, a hundred would take 100 x 0.5 s; they are dict reads.
        assert time.monotonic() - started < 5.0
        assert results == [None] * 100
        deadline = time.monotonic() + 20
        while resolver.refresh_errors == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert resolver.lookup(POD, CID) is None
    finally:
        resolver.close()
        if server:
            server.__exit__()
