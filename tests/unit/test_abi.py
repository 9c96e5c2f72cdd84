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
from ksift.transport import records

OBJECTS = sorted(default_objects_dir().glob("*.bpf.o"))

# C struct name -> (numpy dtype, {C member name: numpy field name} where they differ)
MIRRORS = {
    "ksift_record": (records.RECORD, {"u": "payload"}),
    "ksift_task": (records.TASK, {}),
    "ksift_ancestor": (records.ANCESTOR, {}),
    "ksift_fork_crossing": (records.FORK_CROSSING, {}),
    "ksift_fork_exit": (records.FORK_EXIT, {}),
    "ksift_fork_state": (records.FORK_STATE, {}),
    "ksift_counters": (records.COUNTERS, {}),
}


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


def test_counter_names_match_header():
    header = (Path(__file__).resolve().parents[2] / "bpf" / "ksift.h").read_text()
    body = header.split("enum ksift_counter {", 1)[1].split("};", 1)[0]
    names = [line.split("KSIFT_CNT_", 1)[1].split()[0].rstrip(",").split("=")[0].lower()
             for line in body.splitlines() if "KSIFT_CNT_" in line]
    names = [n for n in names if n != "max"]
    assert tuple(names) == records.COUNTER_NAMES
    assert np.dtype(records.COUNTERS).itemsize == 8 * records.COUNTER_SLOTS
