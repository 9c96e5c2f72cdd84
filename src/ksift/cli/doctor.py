"""`ksift doctor`: what will and will not work on this host, and why.

Every check tries the real thing where it can (loading and attaching the real
BPF objects) rather than guessing from kernel versions, and every failure says
what the host must give and how to get it: an installed wheel needs nothing from
the host but libbpf.so.1, BTF and the privileges (docs/deploy.md).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
CAP_SYS_RESOURCE = 24
BPF_MAP_TYPE_RINGBUF = 27


@dataclass
class Check:
    status: str  # "ok" | "warn" | "FAIL"
    what: str
    detail: str = ""


def _status_field(name: str, status_path: str = "/proc/self/status") -> str:
    for line in Path(status_path).read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    return ""


def _effective_caps(status_path: str = "/proc/self/status") -> int:
    return int(_status_field("CapEff", status_path) or "0", 16)


def seccomp_filtered(status_path: str = "/proc/self/status") -> bool:
    """Whether a seccomp filter (mode 2) confines this process, as container runtimes' profiles do."""
    return _status_field("Seccomp", status_path) == "2"


LIBBPF_HOWTO = "install it: apt install libbpf1 (Debian 12, Ubuntu 22.04+), dnf install libbpf (Fedora, RHEL 9)"
SECCOMP_HOWTO = ("this process runs under a seccomp filter that refuses bpf(): in a container, run it with "
                 "ksift's profile, deploy/seccomp/ksift.json (docs/deploy.md, \"seccomp\")")


def check_privileges() -> Check:
    caps = _effective_caps()
    have = {name for name, bit in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON),
                                   ("CAP_SYS_ADMIN", CAP_SYS_ADMIN)) if caps >> bit & 1}
    if {"CAP_BPF", "CAP_PERFMON"} <= have or "CAP_SYS_ADMIN" in have:
        return Check("ok", "privileges", f"euid {os.geteuid()}, {', '.join(sorted(have))}")
    return Check("FAIL", "privileges", "loading and attaching BPF needs CAP_BPF and CAP_PERFMON (or root); "
                                       f"this process has {', '.join(sorted(have)) or 'none of them'}: run it "
                                       "as root (sudo), or with the capabilities docs/deploy.md lists")


def check_btf() -> Check:
    path = Path("/sys/kernel/btf/vmlinux")
    if path.exists():
        return Check("ok", "kernel BTF", f"{path} ({path.stat().st_size // 1024} KiB), kernel {platform.release()}")
    return Check("FAIL", "kernel BTF", f"{path} is missing: CO-RE programs cannot be relocated; "
                                       "a kernel built with CONFIG_DEBUG_INFO_BTF=y is required (Debian 11+, "
                                       "Ubuntu 20.10+, Fedora 31+ and RHEL 8.2+ kernels are); in a container, "
                                       "mount the host's /sys/kernel/btf")


def check_lockdown() -> Check:
    path = Path("/sys/kernel/security/lockdown")
    try:
        mode = next((w.strip("[]") for w in path.read_text().split() if w.startswith("[")), "unknown")
    except OSError:
        return Check("ok", "lockdown", "not reported (no securityfs lockdown file)")
    if mode == "confidentiality":
        return Check("FAIL", "lockdown", "confidentiality mode forbids reading kernel memory from BPF")
    return Check("ok", "lockdown", mode)


def check_cgroup2() -> Check:
    from ksift.enrich.cgroup import find_cgroup2_mount

    mount = find_cgroup2_mount()
    if mount:
        return Check("ok", "cgroup v2", f"mounted at {mount}: cgroup paths and container ids can be resolved")
    return Check("warn", "cgroup v2", "no cgroup2 mount: alerts will carry cgroup ids but no paths or containers")


def _try_trigger(path: str, text: bytes) -> OSError | None:
    """Set a PSI trigger and close it at once: None if the kernel took it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return exc
    try:
        os.write(fd, text)
        return None
    except OSError as exc:
        return exc
    finally:
        os.close(fd)


def check_pressure() -> Check:
    """The pressure rules' PSI triggers, and the windows this process may use (tried for real)."""
    path = "/proc/pressure/cpu"
    failed = _try_trigger(path, b"some 500000 2000000\0")
    if failed is not None:
        return Check("warn", "pressure (PSI)", f"no PSI trigger on {path} ({failed.strerror}): the cpu/memory/"
                                               "io_pressure rules cannot run (a kernel with CONFIG_PSI, booted "
                                               "without psi=0)")
    privileged = _effective_caps() >> CAP_SYS_RESOURCE & 1
    fine = _try_trigger(path, b"some 100000 1000000\0") is None
    windows = ("any window from 500ms to 10s" if fine else
               "only windows that are multiples of 2s (2s, 4s, 6s, 8s, 10s; the kernel refused a 1s one)")
    return Check("ok", "pressure (PSI)", f"triggers work; {'with' if privileged else 'without'} CAP_SYS_RESOURCE, "
                                         f"pressure rules may use {windows}")


def check_bpf_stats() -> Check:
    try:
        on = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
    except OSError:
        on = False
    return Check("ok", "BPF run-time stats", "enabled" if on else
                 "off (sysctl kernel.bpf_stats_enabled=1 to measure the programs' own run time)")


def check_unused_hooks() -> Check:
    kprobe_pmu = Path("/sys/bus/event_source/devices/kprobe").exists()
    return Check("ok", "kprobe/fentry/LSM", ("kprobe PMU present" if kprobe_pmu else "no kprobe PMU here")
                 + "; ksift uses none of them (tracepoints, tp_btf and perf events only)")


def check_bpf_side(soname: str = "libbpf.so.1") -> list[Check]:
    """libbpf, the built objects, the ring buffer, and every program attached for real."""
    from ksift.config import AgentConfig
    from ksift.errors import KsiftError
    from ksift.kernel_side import default_objects_dir
    from ksift.loader.bpf_object import BpfObject
    from ksift.loader.libbpf import Libbpf

    out = []
    try:
        lib = Libbpf(soname)
    except OSError as exc:
        return [Check("FAIL", "libbpf", f"{soname} cannot be loaded ({exc.__cause__ or exc}): {LIBBPF_HOWTO}")]
    version = f"{lib.so.libbpf_major_version()}.{lib.so.libbpf_minor_version()}"
    out.append(Check("ok", "libbpf", f"libbpf.so.1 (libbpf {version}) loaded from {_mapped_path('libbpf.so')}"))

    ringbuf = lib.so.libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, None)
    out.append(Check("ok", "ring buffer", "BPF_MAP_TYPE_RINGBUF supported") if ringbuf == 1 else
               Check("FAIL", "ring buffer", f"BPF_MAP_TYPE_RINGBUF not usable (probe said {ringbuf}); needs 5.8+"))

    objects = sorted(default_objects_dir().glob("*.bpf.o"))
    if not objects:
        out.append(Check("FAIL", "BPF objects", f"none in {default_objects_dir()}: in a checkout, run `make "
                                                "build`; the wheel carries them (reinstall it)"))
        return out
    config = AgentConfig()
    for path in objects:
        obj = BpfObject(path, lib)
        try:
            obj.open()
            obj.set_rodata(ksift_tgid=os.getpid())
            obj.resize_map("ks_events", config.ringbuf_bytes)
            obj.load()
            out.append(Check("ok", f"load {path.name}", "verifier accepted every program"))
            for prog in obj.program_names():
                section = obj.section_name(prog)
                try:
                    obj.attach(prog)
                    out.append(Check("ok", f"  {section}", f"{prog}: attached and detached"))
                except KsiftError as exc:
                    out.append(Check("FAIL", f"  {section}", f"{prog}: {str(exc).splitlines()[0]}"))
        except KsiftError as exc:
            log = getattr(exc, "log", "")
            tail = "\n".join(log.splitlines()[-8:]) if log else ""
            hint = f"\n{SECCOMP_HOWTO}" if "EPERM" in str(exc) and seccomp_filtered() else ""
            out.append(Check("FAIL", f"load {path.name}",
                             str(exc).splitlines()[0] + hint + (f"\n{tail}" if tail else "")))
        finally:
            obj.close()
    return out


def _mapped_path(fragment: str, maps_path: str = "/proc/self/maps") -> str:
    """The file this process has mapped whose path contains fragment (which libbpf the loader found)."""
    for line in Path(maps_path).read_text().splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode, path (anonymous: none)
        if len(fields) == 6 and fragment in fields[5]:
            return fields[5]
    return "an unknown path"


def run_doctor(stream: TextIO) -> int:
    checks = [check_privileges(), check_btf(), check_lockdown()]
    if checks[0].status == "ok":
        checks += check_bpf_side()
    else:
        checks.append(Check("FAIL", "BPF programs", "not tried without the privileges above"))
    checks += [check_cgroup2(), check_pressure(), check_bpf_stats(), check_unused_hooks()]
    for c in checks:
        print(f"[{c.status:^4}] {c.what}: {c.detail}", file=stream)
    failed = [c for c in checks if c.status == "FAIL"]
    if failed:
        print(f"\n{len(failed)} problem(s): ksift cannot watch this host until they are fixed.", file=stream)
        return 1
    print("\nall good: `ksift run` can watch this host.", file=stream)
    return 0
