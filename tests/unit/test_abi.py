"""The Python record layouts against the BTF of the built BPF objects.

Reads BTF from the object file with bpftool (no root needed). A field moved,
resized or renamed on either side fails here before it garbles a record.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ksift.sensors.base import default_objects_dir
from ksift.sensors.registry import all_sensor_classes
from ksift.transport import records

OBJECTS = sorted(default_objects_dir().glob("*.bpf.o"))
SENSORS = all_sensor_classes()
BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

# C struct name -> (numpy dtype, {C member name: numpy field name} where they differ)
MIRRORS = {
    "ksift_record": (records.RECORD, {"u": "payload"}),
    "ksift_task": (records.TASK, {}),
    "ksift_ancestor": (records.ANCESTOR, {}),
    "ksift_counters": (records.COUNTERS, {}),
}
for _sensor in SENSORS:
    MIRRORS.update(_sensor.abi)


def btf_structs(obj: Path) -> dict[str, dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"] if t["kind"] in ("STRUCT", "UNION") and t.get("name")}


def test_objects_are_built():
    assert OBJECTS, f"no BPF objects in {default_objects_dir()}: run `make build`"


@pytest.mark.parametrize("obj", OBJECTS, ids=[o.name for o in OBJECTS])
def test_layouts_match_btf(obj):
    structs = btf_structs(obj)
    checked = 0
    for cname, (dtype, renames) in MIRRORS.items():
        if cname not in structs:
            continue  # this object does not use that record
        struct = structs[cname]
        assert struct["size"] == dtype.itemsize, f"{cname}: C size {struct['size']} != numpy {dtype.itemsize}"
        c_members = {m["name"]: m["bits_offset"] // 8 for m in struct["members"]}
        py_members = {name: dtype.fields[name][1] for name in dtype.names}
        assert {renames.get(n, n) for n in c_members} == set(py_members), f"{cname}: member names differ"
        for name, offset in c_members.items():
            assert py_members[renames.get(name, name)] == offset, f"{cname}.{name}: C offset {offset}"
        checked += 1
    assert "ksift_record" in structs and checked >= 3


def test_record_stride_is_fixed():
    # Ring buffer header (8) + record must be a multiple of 8 so batches decode as one array.
    assert (records.RECORD_SIZE + records.RINGBUF_HDR_SIZE) % 8 == 0
    assert records.RECORD.itemsize == records.RECORD_SIZE


def enum_names(enum: str) -> list[str]:
    """Member names of a C enum in bpf/*.h, lowercased, without the KSIFT_CNT_ prefix."""
    for header in sorted(BPF_DIR.glob("*.h")):
        text = header.read_text()
        if f"enum {enum} {{" in text:
            body = text.split(f"enum {enum} {{", 1)[1].split("};", 1)[0]
            return [line.split("KSIFT_CNT_", 1)[1].split()[0].rstrip(",").split("=")[0].lower()
                    for line in body.splitlines() if line.strip().startswith("KSIFT_CNT_")]
    raise AssertionError(f"enum {enum} not found in {BPF_DIR}/*.h")


def test_common_counter_names_match_header():
    names = [n for n in enum_names("ksift_counter") if n not in ("max", "sensor_base")]
    assert tuple(names) == records.COMMON_COUNTER_NAMES
    assert len(names) == records.SENSOR_COUNTER_BASE
    assert np.dtype(records.COUNTERS).itemsize == 8 * records.COUNTER_SLOTS


@pytest.mark.parametrize("sensor", SENSORS, ids=[s.name for s in SENSORS])
def test_sensor_counter_names_match_header(sensor):
    assert tuple(enum_names(sensor.counter_enum)) == sensor.counter_names
    assert len(sensor.all_counter_names()) <= records.COUNTER_SLOTS


@pytest.mark.parametrize("sensor", SENSORS, ids=[s.name for s in SENSORS])
def test_every_sensor_object_is_built(sensor):
    assert (default_objects_dir() / sensor.object_file).exists(), f"{sensor.object_file}: run `make build`"
