"""The ctypes libbpf layer against the real kernel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ksift.config import AgentConfig
from ksift.errors import BpfError, BpfLoadError
from ksift.loader.bpf_object import BpfObject
from ksift.loader.libbpf import Libbpf
from ksift.rules.parse import parse_rules
from ksift.sensors.base import default_objects_dir
from ksift.sensors.process import ProcessSensor
from ksift.transport.core import CoreObject

REPO = Path(__file__).resolve().parents[2]
PROCESS_OBJ = default_objects_dir() / "process.bpf.o"


@pytest.fixture(scope="module")
def lib():
    return Libbpf()


def test_rejected_program_raises_with_verifier_log(tmp_path, lib):
    obj_path = tmp_path / "rejected.bpf.o"
    subprocess.run(["clang-14", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Werror",
                    f"-I{REPO / 'bpf'}", "-c", str(REPO / "tests/kernel/bpf/rejected.bpf.c"), "-o", str(obj_path)],
                   check=True)
    with BpfObject(obj_path, lib) as obj:
        with pytest.raises(BpfLoadError) as info:
            obj.load()
    assert "rejected.bpf.o" in str(info.value)
    assert "map_value_or_null" in info.value.log  # the verifier's own words reached us


def test_unknown_rodata_variable_is_named(lib):
    with BpfObject(PROCESS_OBJ, lib) as obj:
        with pytest.raises(BpfError, match="no rodata variable 'fork_treshold'"):
            obj.set_rodata(fork_treshold=5)


def test_missing_object_says_how_to_build(tmp_path, lib):
    with pytest.raises(BpfError, match="make build"):
        BpfObject(tmp_path / "nope.bpf.o", lib).open()


def test_rodata_threshold_and_batch_lookup_of_aggregates(lib):
    rules = parse_rules('[[rule]]\nname="f"\nseverity="info"\nsignal="process.fork"\nkey="tgid"\n'
                        'threshold=1000\nwindow="10s"\n', "<test>")
    core = CoreObject(lib, default_objects_dir(), AgentConfig(), os.getpid())
    core.start()
    sensor = ProcessSensor(lib, default_objects_dir(), AgentConfig(), os.getpid(), rules)
    sensor.start(core.shared_fds)
    try:
        assert sorted(sensor.obj.attached) == ["ks_exit", "ks_fork"]
        assert core.obj.attached == ["ks_exec"]
        # A long-lived parent that forks 5 children and then waits: its counter stays in the map.
        parent = subprocess.Popen(["/bin/sh", "-c", "for i in 1 2 3 4 5; do /bin/true; done; read x"],
                                  stdin=subprocess.PIPE)
        try:
            deadline = 50
            state = None
            while deadline and (state is None or state.total < 5):
                state = sensor.current("f", parent.pid)
                deadline -= 1
                subprocess.run(["sleep", "0.05"])
            assert state is not None and state.total == 5 and state.window_count == 5
            fork_map = sensor.obj.map("ks_fork_state")
            keys, values, n = fork_map.lookup_batch(chunk=2)  # several batch calls
            tgids = [int.from_bytes(keys[i * 4:(i + 1) * 4], "little") for i in range(n)]
            assert parent.pid in tgids and len(tgids) == len(set(tgids))
            assert os.getpid() not in tgids  # ksift's own forks are filtered in the kernel
            # update() writes what lookup() then reads, and honours its flags
            key = parent.pid.to_bytes(4, "little")
            raw = bytearray(fork_map.lookup(key))
            raw[16:24] = (12345).to_bytes(8, "little")  # ksift_fork_state.total
            assert fork_map.update(key, bytes(raw)) and sensor.current("f", parent.pid).total == 12345
            assert not fork_map.update(key, bytes(raw), flags=1)  # BPF_NOEXIST on an existing key
            _, _, deleted = fork_map.lookup_batch(delete=True)
            assert deleted >= 1 and sensor.current("f", parent.pid) is None
        finally:
            parent.communicate(b"\n", timeout=10)
        # Under the threshold: nothing crossed, nothing emitted.
        counters = sensor.counters()
        assert counters["fork_crossings"] == 0 or counters["rb_emitted"] >= counters["fork_crossings"]
        assert len(core.reader.read()) == counters["rb_emitted"] == core.transport_counters()["emitted"]
    finally:
        sensor.close()
        core.close()
    assert sensor.obj is None
