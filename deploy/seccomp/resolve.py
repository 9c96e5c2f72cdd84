"""Write ksift's seccomp profile: a container runtime's default, resolved for ksift, plus bpf and perf_event_open.

    python3 deploy/seccomp/resolve.py /usr/share/containers/seccomp.json > deploy/seccomp/ksift.json

Runtimes' default profiles (containers-common's, which podman and CRI-O use; moby's) allow
bpf() and perf_event_open() only with CAP_SYS_ADMIN, which ksift does not need and must not
get. This takes such a profile (Debian 12's golang-github-containers-common, 0.50.1, made the
committed one), keeps exactly what it allows a container that has the DaemonSet's capabilities
on x86-64, and allows those two calls as well.

The result is flat (no "includes"/"excludes", no "archMap"): the OCI runtime-spec form, which
containerd reads for a Localhost profile as it is (it ignores those keys, so a conditional
entry would apply unconditionally there), and which CRI-O and podman read too.
"""

from __future__ import annotations

import json
import sys

# deploy/kubernetes/daemonset.yaml's capabilities (tests/unit/test_seccomp_profile.py checks they agree).
CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYSLOG"}
ARCH = "amd64"  # the wheel's objects and the loader are x86-64 only
ARCHITECTURES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
KSIFT_CALLS = ["bpf", "perf_event_open"]


def _applies(entry: dict, caps: set[str], arch: str) -> bool:
    """Whether a default-profile entry holds for a container with these capabilities on this arch,
    as the runtimes decide it: every capability in includes present, none of excludes."""
    includes, excludes = entry.get("includes") or {}, entry.get("excludes") or {}
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if arch in (excludes.get("arches") or []):
        return False
    if not set(includes.get("caps") or []) <= caps:
        return False
    if set(excludes.get("caps") or []) & caps:
        return False
    return not includes.get("minKernel")  # none here; a kernel-dependent entry would need the host's version


def resolve(default: dict, caps: set[str] = CAPS, arch: str = ARCH) -> dict:
    syscalls = []
    for entry in default["syscalls"]:
        if not _applies(entry, caps, arch):
            continue
        names = sorted(entry.get("names") or [entry["name"]])
        if entry["action"] != "SCMP_ACT_ALLOW":
            # A denial of a call ksift needs (the default refuses bpf and perf_event_open without
            # CAP_SYS_ADMIN) must not stay: seccomp's most restrictive matching action would win.
            names = [n for n in names if n not in KSIFT_CALLS]
            if not names:
                continue
        flat = {"names": names, "action": entry["action"]}
        if entry.get("args"):
            flat["args"] = entry["args"]
        if entry.get("errnoRet") is not None:
            flat["errnoRet"] = entry["errnoRet"]
        syscalls.append(flat)
    # containers-common 0.50.1 both allows setns and denies it without CAP_SYS_ADMIN; say the denial
    # only, so no runtime has to pick between two actions for one call (ksift needs no setns).
    denied = {n for e in syscalls if e["action"] != "SCMP_ACT_ALLOW" and "args" not in e for n in e["names"]}
    for entry in syscalls:
        if entry["action"] == "SCMP_ACT_ALLOW" and "args" not in entry:
            entry["names"] = [n for n in entry["names"] if n not in denied]
    syscalls.append({"names": KSIFT_CALLS, "action": "SCMP_ACT_ALLOW"})
    profile = {"defaultAction": default["defaultAction"]}
    if default.get("defaultErrnoRet") is not None:
        profile["defaultErrnoRet"] = default["defaultErrnoRet"]
    profile["architectures"] = ARCHITECTURES
    profile["syscalls"] = syscalls
    return profile


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        default = json.load(fh)
    json.dump(resolve(default), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
