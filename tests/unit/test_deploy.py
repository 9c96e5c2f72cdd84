"""The deployment files: the systemd unit and the Kubernetes manifests say what docs/deploy.md says.

PyYAML is not a dependency, so the manifests are read with a small, strict
reader of the YAML subset they use (block mappings and sequences, plain and
quoted scalars, flow lists of scalars, literal blocks); anything else in them
is an error here rather than a silent misread.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ksift.config import parse_config
from ksift.enrich.kubernetes import build_pod_resolver

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "ksift.service"
K8S = REPO / "deploy" / "kubernetes"
DOCS = REPO / "docs" / "deploy.md"
CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYSLOG"}
REMEDIATION_CAPS = {"CAP_KILL", "CAP_SYS_NICE"}
DROP_IN = REPO / "deploy" / "systemd" / "remediation.conf"


# -- a strict reader for the YAML subset the manifests use ------------------------------------


class YamlSubsetError(ValueError):
    pass


_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_UNSUPPORTED = ("&", "*", "!", "?", "%", "@", "`", "{", ">")


def load_yaml_documents(text: str) -> list:
    docs, current = [], []
    for line in text.splitlines():
        if line.rstrip() == "---":
            docs.append(current)
            current = []
        else:
            current.append(line)
    docs.append(current)
    parsed = []
    for lines in docs:
        reader = _Reader(lines)
        if reader.at_end():
            continue
        parsed.append(reader.document())
    return parsed


class _Reader:
    def __init__(self, lines: list[str]):
        if any("\t" in line[: len(line) - len(line.lstrip())] for line in lines):
            raise YamlSubsetError("tab in indentation")
        self.lines = lines
        self.i = 0

    def _skip(self) -> None:
        while self.i < len(self.lines) and (not self.lines[self.i].strip()
                                            or self.lines[self.i].lstrip().startswith("#")):
            self.i += 1

    def at_end(self) -> bool:
        self._skip()
        return self.i >= len(self.lines)

    def _indent(self) -> int:
        line = self.lines[self.i]
        return len(line) - len(line.lstrip(" "))

    def document(self):
        value = self._block(self._indent())
        if not self.at_end():
            raise YamlSubsetError(f"unexpected line {self.i + 1}: {self.lines[self.i]!r}")
        return value

    def _block(self, indent: int):
        self._skip()
        if self.lines[self.i].lstrip().startswith("-"):
            return self._sequence(indent)
        return self._mapping(indent)

    def _mapping(self, indent: int) -> dict:
        result: dict = {}
        while not self.at_end() and self._indent() == indent and not self._is_item():
            line = self.lines[self.i].strip()
            match = re.fullmatch(r"([A-Za-z0-9_.\-/]+):(?:\s+(.*))?", line)
            if not match:
                raise YamlSubsetError(f"line {self.i + 1}: not a 'key: value' line: {line!r}")
            key, rest = match.group(1), (match.group(2) or "").strip()
            if key in result:
                raise YamlSubsetError(f"line {self.i + 1}: duplicate key {key!r}")
            self.i += 1
            if rest in ("|", "|-"):
                result[key] = self._literal(indent, keep_newline=rest == "|")
            elif rest and not rest.startswith("#"):
                result[key] = _scalar(rest)
            elif self.at_end():
                result[key] = None
            elif self._indent() > indent:
                result[key] = self._block(self._indent())
            elif self._indent() == indent and self._is_item():
                result[key] = self._sequence(indent)  # a list may sit at its key's indentation
            else:
                result[key] = None
        if not self.at_end() and self._indent() > indent:
            raise YamlSubsetError(f"line {self.i + 1}: bad indentation")
        return result

    def _is_item(self) -> bool:
        stripped = self.lines[self.i].lstrip()
        return stripped == "-" or stripped.startswith("- ")

    def _sequence(self, indent: int) -> list:
        result = []
        while not self.at_end() and self._indent() == indent and self._is_item():
            line = self.lines[self.i]
            content = line.strip()[1:].strip()
            if not content:
                self.i += 1
                result.append(self._block(self._indent()))
            elif re.match(r"[A-Za-z0-9_.\-/]+:(\s|$)", content):
                # "- key: value" opens a mapping indented two past the dash.
                self.lines[self.i] = " " * (indent + 2) + content
                result.append(self._mapping(indent + 2))
            else:
                self.i += 1
                result.append(_scalar(content))
        return result

    def _literal(self, indent: int, keep_newline: bool) -> str:
        body: list[str] = []
        block_indent = None
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip():
                current = len(line) - len(line.lstrip(" "))
                if current <= indent:
                    break
                block_indent = current if block_indent is None else block_indent
                if current < block_indent:
                    raise YamlSubsetError(f"line {self.i + 1}: literal block dedented")
                body.append(line[block_indent:])
            else:
                body.append("")
            self.i += 1
        while body and not body[-1]:
            body.pop()
        return "\n".join(body) + ("\n" if keep_newline and body else "")


def _scalar(text: str):
    text = text.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        while end > 0 and text[end - 1] == "\\":
            end = text.find('"', end + 1)
        if end < 0 or text[end + 1:].strip() and not text[end + 1:].strip().startswith("#"):
            raise YamlSubsetError(f"bad double-quoted scalar {text!r}")
        return json.loads(text[: end + 1])
    if text.startswith("'"):
        match = re.match(r"'((?:[^']|'')*)'\s*(#.*)?$", text)
        if not match:
            raise YamlSubsetError(f"bad single-quoted scalar {text!r}")
        return match.group(1).replace("''", "'")
    text = re.split(r"\s+#", text, maxsplit=1)[0].strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_scalar(part) for part in inner.split(",")] if inner else []
    if text.startswith(_UNSUPPORTED) or ": " in text:
        raise YamlSubsetError(f"outside the supported subset: {text!r}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if _INT.fullmatch(text):
        return int(text)
    return text


def test_the_yaml_reader_is_strict_and_right():
    text = ('a:\n  b: "x # y"\n  c: [1, two]\n  d:\n  - e: 1\n    f: |\n      line 1\n\n      line 2\n'
            '  - plain # c\n---\nk: true\n')
    assert load_yaml_documents(text) == [
        {"a": {"b": "x # y", "c": [1, "two"], "d": [{"e": 1, "f": "line 1\n\nline 2\n"}, "plain"]}}, {"k": True}]
    for bad in ("a: &anchor 1\n", "a: {b: 1}\n", "a: 1\na: 2\n", "a:\n  b: 1\n c: 2\n", "a: b: c\n"):
        with pytest.raises(YamlSubsetError):
            load_yaml_documents(bad)


# -- the manifests ----------------------------------------------------------------------------


def manifests() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_documents(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_kustomization_applies_every_manifest():
    (kustomization,) = load_yaml_documents((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    return manifests()


def pod_spec(k8s) -> dict:
    return k8s[("DaemonSet", "ksift")]["spec"]["template"]["spec"]


def container(k8s) -> dict:
    (only,) = pod_spec(k8s)["containers"]
    return only


def test_daemonset_sees_the_host(k8s):
    spec = pod_spec(k8s)
    assert spec["hostPID"] is True
    assert "hostNetwork" not in spec and "privileged" not in json.dumps(spec).replace('"privileged": false', "")
    ds = k8s[("DaemonSet", "ksift")]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert {"operator": "Exists"} in spec["tolerations"]  # every node, tainted ones too


def test_daemonset_capabilities_match_the_unit_and_nothing_more(k8s):
    security = container(k8s)["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {f"CAP_{cap}" for cap in security["capabilities"]["add"]} == CAPS == unit_caps()
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True and security["runAsUser"] == 0


def test_daemonset_mounts(k8s):
    spec, c = pod_spec(k8s), container(k8s)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)  # every mount has its volume
    for path, read_only in (("/sys/kernel/btf", True), ("/sys/fs/cgroup", True), ("/var/lib/ksift", False),
                            ("/etc/machine-id", True)):
        volume = volumes[mounts[path]["name"]]
        assert volume["hostPath"]["path"] == path, path
        assert mounts[path].get("readOnly", False) is read_only, path
    # No host /proc mount: with hostPID the container's own /proc already shows the host's processes.
    assert not any(v.get("hostPath", {}).get("path") == "/proc" for v in volumes.values())
    assert volumes[mounts["/etc/ksift"]["name"]]["configMap"]["name"] == "ksift-config"


def test_daemonset_env_probe_and_args(k8s):
    c = container(k8s)
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["args"][0] == "run" and c["args"][1:] == ["--config", "/etc/ksift/config.toml"]
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"  # the one endpoint without a token
    assert probe["port"] in {p["name"] for p in c["ports"]}
    assert {p["containerPort"] for p in c["ports"]} == {9466}


def test_rbac_lets_the_service_account_read_pods_only(k8s):
    sa = k8s[("ServiceAccount", "ksift")]
    assert pod_spec(k8s)["serviceAccountName"] == sa["metadata"]["name"]
    role = k8s[("ClusterRole", "ksift-pod-reader")]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    binding = k8s[("ClusterRoleBinding", "ksift-pod-reader")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "ksift-pod-reader"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ksift",
                                    "namespace": sa["metadata"]["namespace"]}]
    namespaces = {doc["metadata"].get("namespace") for doc in k8s.values()} - {None}
    assert namespaces == {"ksift"} and ("Namespace", "ksift") in k8s


def test_configmap_rules_and_config_parse(k8s, monkeypatch):
    data = k8s[("ConfigMap", "ksift-config")]["data"]
    # No copy of the rules: the packaged ones apply, so they cannot drift from the version installed.
    assert set(data) == {"config.toml"}
    # The API token file comes from a Secret at run time; stand in for it while parsing.
    monkeypatch.setattr("ksift.interfaces.settings._read_file", lambda path: "t" * 32)
    config = parse_config(data["config.toml"], "configmap ksift-config: config.toml")
    mounts = {m["mountPath"]: m["name"] for m in container(k8s)["volumeMounts"]}
    assert config.rules_path is None and "/etc/ksift" in mounts
    assert config.db_path.startswith("/var/lib/ksift/")
    api = config.section("api")
    assert api.port == 9466 and api.token_file.startswith("/etc/ksift-api/") and "/etc/ksift-api" in mounts
    kube = config.section("kubernetes")
    assert kube.enabled and kube.source == "apiserver"
    resolver = build_pod_resolver(kube, env={"NODE_NAME": "node-1", "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                             "KUBERNETES_SERVICE_PORT": "443"})
    assert resolver._fetch.url == "https://10.96.0.1:443/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1"


# -- the systemd unit ---------------------------------------------------------------------------


def read_unit(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """[section] -> key -> every value (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None and not raw.endswith("\\"), f"{path}:{number}: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_caps() -> set[str]:
    return set(" ".join(read_unit()["Service"]["CapabilityBoundingSet"]).split())


def test_unit_runs_ksift_with_least_capabilities():
    service = read_unit()["Service"]
    (exec_start,) = service["ExecStart"]
    argv = exec_start.split()
    assert argv[0].endswith("/ksift") and argv[1] == "run"
    config_path = argv[argv.index("--config") + 1]
    assert config_path.startswith("/etc/" + service["ConfigurationDirectory"][0] + "/")
    assert unit_caps() == CAPS
    assert "AmbientCapabilities" not in service  # root within the bounding set needs no ambient caps
    assert service["NoNewPrivileges"] == ["yes"]


def test_unit_hardening():
    service = read_unit()["Service"]
    assert service["ProtectSystem"] == ["strict"]
    assert "/var/lib/ksift" in " ".join(service["ReadWritePaths"]).split()
    assert service["StateDirectory"] == ["ksift"]
    for key in ("PrivateTmp", "PrivateDevices", "ProtectControlGroups", "ProtectKernelModules",
                "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality"):
        assert service[key] == ["yes"], key
    # These would break a feature (docs/deploy.md says which): they must stay off.
    for key in ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectProc", "ProcSubset", "MemoryDenyWriteExecute",
                "PrivateNetwork", "User", "DynamicUser"):
        assert key not in service, key
    assert {"bpf", "perf_event_open"} <= set(" ".join(service["SystemCallFilter"]).split())
    assert read_unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_remediation_drop_in_adds_only_what_acting_needs():
    service = read_unit(DROP_IN)["Service"]
    assert set(" ".join(service["CapabilityBoundingSet"]).split()) == REMEDIATION_CAPS
    assert service["ProtectControlGroups"] == ["no"] and service["ReadWritePaths"] == ["/sys/fs/cgroup"]
    assert set(service) == {"CapabilityBoundingSet", "ProtectControlGroups", "ReadWritePaths"}


@pytest.mark.parametrize("with_drop_in", [False, True])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, with_drop_in: bool):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # A copy whose ExecStart exists here, so only the unit's own syntax and settings are judged.
    copy = tmp_path / "ksift.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true')}", UNIT.read_text(), flags=re.M))
    if with_drop_in:
        (tmp_path / "ksift.service.d").mkdir()
        (tmp_path / "ksift.service.d" / "remediation.conf").write_text(DROP_IN.read_text())
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


EXPOSURE = 3.2  # systemd-analyze security's overall exposure of the unit, as docs/deploy.md reports it


def test_unit_exposure_is_what_the_docs_say(tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / "ksift.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true')}", UNIT.read_text(), flags=re.M))
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--threshold={round(EXPOSURE * 10)}",
                           str(copy)], capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for ksift.service: ([0-9.]+)", done.stdout)
    assert score and float(score.group(1)) == EXPOSURE, done.stdout[-500:] + done.stderr
    assert done.returncode == 0  # at or under the threshold
    assert f"exposure level {EXPOSURE}" in DOCS.read_text()


def test_unit_restarts_on_failure_but_not_on_bad_input():
    service = read_unit()["Service"]
    assert service["Restart"] == ["on-failure"] and service["RestartPreventExitStatus"] == ["2"]
    assert int(service["LimitNOFILE"][0]) >= 4096  # the API's connections (docs/api.md)


def test_every_privilege_is_explained_in_the_docs(k8s):
    text = DOCS.read_text()
    for cap in CAPS | REMEDIATION_CAPS:
        assert f"`{cap}`" in text, cap
    for setting in ("ProtectKernelTunables", "ProtectKernelLogs", "MemoryDenyWriteExecute", "hostPID", "/sys/fs/cgroup",
                    "/sys/kernel/btf", "NODE_NAME", "ksift-api-token", "appArmorProfile", "seccompProfile",
                    "/etc/machine-id"):
        assert setting in text, setting
