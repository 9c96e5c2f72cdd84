"""deploy/seccomp/ksift.json: the runtime's default profile for the DaemonSet's capabilities, plus bpf and
perf_event_open, in the flat form every runtime reads (tests/kernel/test_container.py runs the image under it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROFILE = DEPLOY / "seccomp" / "ksift.json"
CONTAINERS_DEFAULT = Path("/usr/share/containers/seccomp.json")  # containers-common, installed with podman


def _resolver():
    spec = importlib.util.spec_from_file_location("resolve", DEPLOY / "seccomp" / "resolve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def daemonset_security() -> dict:
    daemonset = yaml.safe_load((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    return daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]


def test_the_daemonset_uses_the_profile_made_for_its_capabilities():
    security = daemonset_security()
    assert security["seccompProfile"] == {"type": "Localhost", "localhostProfile": PROFILE.name}
    assert {f"CAP_{cap}" for cap in security["capabilities"]["add"]} == _resolver().CAPS


def test_the_profile_is_flat_and_allows_what_ksift_calls():
    profile = json.loads(PROFILE.read_text())
    assert set(profile) == {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and "SCMP_ARCH_X86_64" in profile["architectures"]
    for entry in profile["syscalls"]:
        assert set(entry) <= {"names", "action", "args", "errnoRet"}, entry
    allowed = {n for e in profile["syscalls"] if e["action"] == "SCMP_ACT_ALLOW" and "args" not in e
               for n in e["names"]}
    denied = {n for e in profile["syscalls"] if e["action"] != "SCMP_ACT_ALLOW" for n in e["names"]}
    assert {"bpf", "perf_event_open"} <= allowed and not {"bpf", "perf_event_open"} & denied
    assert not allowed & denied  # one action per call
    # What the capabilities do not grant stays denied: module loading, kexec, clock setting.
    assert {"init_module", "finit_module", "kexec_load", "clock_settime"} <= denied


def test_the_committed_profile_is_the_installed_runtime_default_resolved():
    if not CONTAINERS_DEFAULT.exists():
        pytest.skip(f"{CONTAINERS_DEFAULT} is missing (containers-common, installed with podman by TEST_APT_PKGS)")
    resolved = _resolver().resolve(json.loads(CONTAINERS_DEFAULT.read_text()))
    assert json.loads(PROFILE.read_text()) == resolved, (
        "the runtime's default changed: python3 deploy/seccomp/resolve.py "
        f"{CONTAINERS_DEFAULT} > deploy/seccomp/ksift.json, and review the difference")


def test_resolving_follows_capabilities_and_arches():
    default = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["bpf", "quotactl"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["bpf", "quotactl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["kcmp"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_PTRACE"]}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["s390_runtime_instr"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
    ]}
    got = _resolver().resolve(default, caps={"CAP_BPF", "CAP_SYS_PTRACE"})
    assert got["syscalls"] == [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["quotactl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {"names": ["kcmp"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ALLOW"},
    ]
