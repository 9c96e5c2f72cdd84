"""The Python mirrors of the BPF ABI against the built objects and the C sources.

Struct layouts are compared with the BTF of the built objects (bpftool, no
root needed). Every mirrored struct must be in the BTF of the object that uses
it: a struct the compiler left out fails here, it is never skipped. Record type
ids and counter enums are not in BTF (a #define never is, and an enum no type
refers to is dropped), so they are read from the text of bpf/*.h and
bpf/*.bpf.c. A field moved, resized or renamed, or a type id renumbered, on
either side fails here before it garbles a record.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ksift.remediation.guard import TreeGuard
from ksift.sensors.base import default_objects_dir
from ksift.sensors.registry import all_sensor_classes
from ksift.transport import records
from ksift.transport.core import CORE_COUNTER_NAMES, CoreObject

SENSORS = all_sensor_classes()
# Sensors with a BPF object: records and kernel counters (the pressure sensor has neither: PSI triggers).
BPF_SENSORS = [s for s in SENSORS if s.object_file]
BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

Mirrors = dict[str, tuple[np.dtype, dict[str, str]]]  # C struct -> (numpy dtype, {C member: numpy field})

# The layouts every object shares (bpf/ksift.h, transport/records.py); the core object must hold them all.
COMMON: Mirrors = {
    "ksift_record": (records.RECORD, {"u": "payload"}),
    "ksift_task": (records.TASK, {}),
    "ksift_ancestor": (records.ANCESTOR, {}),
    "ksift_counters": (records.COUNTERS, {}),
    "ksift_transport": (records.TRANSPORT, {}),
    "ksift_exec": (records.EXEC, {}),
}


def _required() -> dict[str, Mirrors]:
    """Object file -> the mirrored structs that must be in its BTF. A new object adds its owner here."""
    out: dict[str, Mirrors] = {CoreObject.object_file: dict(COMMON)}
    for sensor in SENSORS:
        if sensor.object_file:  # the pressure sensor has no BPF object (PSI triggers)
            out.setdefault(sensor.object_file, {}).update(sensor.abi)
    out[TreeGuard.object_file] = dict(TreeGuard.abi)  # remediation's fork-bomb guard: an object, not a sensor
    return out


REQUIRED = _required()


def _all_mirrors() -> Mirrors:
    """Every mirror by C name; a struct met in any object is checked there too."""
    out: Mirrors = {}
    for mirrors in REQUIRED.values():
        for cname, mirror in mirrors.items():
            assert out.setdefault(cname, mirror)[0] == mirror[0], f"{cname}: two different Python mirrors"
    return out


MIRRORS = _all_mirrors()


def btf_structs(obj: Path) -> dict[str, dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"] if t["kind"] in ("STRUCT", "UNION") and t.get("name")}


# -- struct layouts against BTF ----------------------------------------------------------------


def test_every_bpf_program_has_an_object_with_declared_mirrors():
    sources = {p.name.removesuffix(".c") + ".o" for p in BPF_DIR.glob("*.bpf.c")}
    built = {p.name for p in default_objects_dir().glob("*.bpf.o")}
    assert sources == set(REQUIRED), "each bpf/*.bpf.c needs its mirrors declared in REQUIRED (test_abi.py)"
    assert sources <= built, f"not built in {default_objects_dir()}: {sorted(sources - built)}: run `make build`"


@pytest.mark.parametrize("obj_name", sorted(REQUIRED))
def test_layouts_match_btf(obj_name):
    obj = default_objects_dir() / obj_name
    assert obj.is_file(), f"{obj} is not built: run `make build`"
    structs = btf_structs(obj)
    missing = sorted(set(REQUIRED[obj_name]) - set(structs))
    assert not missing, (f"{obj_name}: mirrored structs missing from its BTF: {missing} (a struct only reached "
                         "through casts needs an anchor: `const struct X *X_abi __attribute__((unused));`)")
    for cname in sorted(set(MIRRORS) & set(structs)):
        dtype, renames = MIRRORS[cname]
        struct = structs[cname]
        assert struct["size"] == dtype.itemsize, f"{cname}: C size {struct['size']} != numpy {dtype.itemsize}"
        c_members = {m["name"]: m["bits_offset"] // 8 for m in struct["members"]}
        py_members = {name: dtype.fields[name][1] for name in dtype.names}
        assert {renames.get(n, n) for n in c_members} == set(py_members), f"{cname}: member names differ"
        for name, offset in c_members.items():
            assert py_members[renames.get(name, name)] == offset, f"{cname}.{name}: C offset {offset}"


def test_record_stride_is_fixed():
    # Ring buffer header (8) + record must be a multiple of 8 so batches decode as one array.
    assert (records.RECORD_SIZE + records.RINGBUF_HDR_SIZE) % 8 == 0
    assert records.RECORD.itemsize == records.RECORD_SIZE


def test_every_payload_fits_a_record():
    # The C side asserts it per cast (KSIFT_PAYLOAD); the mirrors must agree, or a payload decodes
    # past the end of the record's bytes.
    for sensor in SENSORS:
        for cname, (dtype, _) in sensor.abi.items():
            if cname.endswith(("_crossing", "_exit", "_kill", "_request", "_step")):
                assert dtype.itemsize <= records.PAYLOAD_SIZE, f"{sensor.name}: {cname} does not fit a record"


# -- constants and enums from the C text ---------------------------------------------------------

_INT = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.LShift: operator.lshift,
        ast.BitOr: operator.or_}


class NotConstant(ValueError):
    """Not an integer constant expression (a string, a cast, a call...)."""


def _eval(expr: str, known: dict[str, int]) -> int | None:
    """A C integer constant expression (literals, names, + - * << |), or None while a name is unknown."""
    try:
        tree = ast.parse(_INT.sub(lambda m: str(int(m.group(1), 0)), expr.strip()), mode="eval")
    except SyntaxError:
        raise NotConstant(expr) from None

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            return known.get(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            return None if left is None or right is None else _OPS[type(node.op)](left, right)
        raise NotConstant(expr)

    return value(tree.body)


def _c_sources() -> list[str]:
    """bpf/ksift.h first (the others build on it), then every header and program, comments removed."""
    paths = [BPF_DIR / "ksift.h"]
    paths += sorted(p for p in BPF_DIR.glob("*.h") if p.name not in ("ksift.h", "vmlinux.h"))
    paths += sorted(BPF_DIR.glob("*.bpf.c"))
    return [re.sub(r"/\*.*?\*/|//[^\n]*", " ", p.read_text(), flags=re.S) for p in paths]


def c_constants() -> tuple[dict[str, int], dict[str, list[tuple[str, int]]]]:
    """Every integer #define and enumerator of bpf/ by name, and each named enum's members in order."""
    defines: list[tuple[str, str]] = []
    enums: list[tuple[str, list[tuple[str, str | None]]]] = []
    for text in _c_sources():
        # Object-like macros with a value; guards (#define KSIFT_H) and function-like macros have none.
        defines += re.findall(r"^[ \t]*#define[ \t]+(\w+)[ \t]+(\S[^\n]*)$", text, flags=re.M)
        for name, body in re.findall(r"\benum\s*(\w*)\s*\{(.*?)\}", text, flags=re.S):
            name = name or f"<anonymous enum {len(enums)}>"  # its constants count all the same
            entries = [e.split("=", 1) for e in (e.strip() for e in body.split(",")) if e]
            enums.append((name, [(e[0].strip(), e[1] if len(e) == 2 else None) for e in entries]))
    known: dict[str, int] = {}
    skipped: set[str] = set()
    members: dict[str, list[tuple[str, int]]] = {}
    for _ in range(len(defines) + len(enums) + 1):  # until nothing new resolves
        for name, expr in defines:
            if name not in known and name not in skipped:
                try:
                    value = _eval(expr, known)
                except NotConstant:
                    skipped.add(name)  # not an integer: nothing to mirror
                    continue
                if value is not None:
                    known[name] = value
        for enum, entries in enums:
            if enum in members:
                continue
            out, nxt = [], 0
            for name, expr in entries:
                value = nxt if expr is None else _eval(expr, {**known, **dict(out)})
                if value is None:
                    break
                out.append((name, value))
                nxt = value + 1
            else:
                members[enum] = out
                for name, value in out:
                    assert known.setdefault(name, value) == value, f"{name} defined twice, differently"
    unresolved = [enum for enum, _ in enums if enum not in members]
    assert not unresolved, f"enums whose values could not be evaluated: {unresolved}"
    return known, members


CONSTANTS, ENUMS = c_constants()
RECORD_TYPES = {name: value for name, value in CONSTANTS.items()
                if name.startswith("KSIFT_REC_") and not name.endswith("_BASE") and name != "KSIFT_REC_SENSOR_SPAN"}


def python_record_types(module_name: str) -> dict[str, int]:
    """A module's REC_* constants, under their C names."""
    module = sys.modules[module_name]
    return {f"KSIFT_{name}": value for name, value in vars(module).items()
            if name.startswith("REC_") and isinstance(value, int)}


@pytest.mark.parametrize("python, c_name", [
    (records.COMM_LEN, "KSIFT_COMM_LEN"),
    (records.PATH_LEN, "KSIFT_PATH_LEN"),
    (records.ARGS_LEN, "KSIFT_ARGS_LEN"),
    (records.TASK_CGROUP_LEN, "KSIFT_TASK_CGROUP_LEN"),
    (records.CTX_EXE_EXEC, "KSIFT_CTX_EXE_EXEC"),
    (records.CTX_ARGS_EXEC, "KSIFT_CTX_ARGS_EXEC"),
    (records.CTX_ARGS_EVENT, "KSIFT_CTX_ARGS_EVENT"),
    (records.CTX_EXE_EVENT, "KSIFT_CTX_EXE_EVENT"),
    (records.ANCESTRY_MAX, "KSIFT_ANCESTRY_MAX"),
    (records.AF_INET, "KSIFT_AF_INET"),
    (records.AF_INET6, "KSIFT_AF_INET6"),
    (records.RECORD_SIZE, "KSIFT_RECORD_SIZE"),
    (records.SENSOR_SPAN, "KSIFT_REC_SENSOR_SPAN"),
    (records.REC_FLOOD, "KSIFT_REC_FLOOD"),
    (records.SENSOR_COUNTER_BASE, "KSIFT_CNT_SENSOR_BASE"),
    (records.COUNTER_SLOTS, "KSIFT_CNT_MAX"),
    (records.TRANSPORT_SLOTS, "KSIFT_TR_MAX"),
])
def test_transport_constants_match_ksift_h(python, c_name):
    assert python == CONSTANTS[c_name], f"{c_name} is {CONSTANTS[c_name]} in bpf/, {python} in Python"


@pytest.mark.parametrize("sensor", BPF_SENSORS, ids=[s.name for s in BPF_SENSORS])
def test_record_type_ids_match_headers(sensor):
    base, span = sensor.record_base, records.SENSOR_SPAN
    assert base % span == 0, f"{sensor.name}: record_base {base} does not start a range"
    ours = {name: value for name, value in RECORD_TYPES.items() if base <= value < base + span}
    assert ours, f"{sensor.name}: no KSIFT_REC_* in [{base}, {base + span}) in bpf/"
    assert python_record_types(sensor.__module__) == ours


def test_each_sensor_owns_one_record_range_of_ksift_h():
    bases = {name: value for name, value in CONSTANTS.items() if re.fullmatch(r"KSIFT_REC_\w+_BASE", name)}
    assert sorted(s.record_base for s in BPF_SENSORS) == sorted(bases.values()), bases


def test_every_record_type_has_one_python_mirror():
    mirrored = python_record_types(records.__name__)
    for sensor in SENSORS:
        mirrored.update(python_record_types(sensor.__module__))
    assert mirrored == RECORD_TYPES
    assert len(set(RECORD_TYPES.values())) == len(RECORD_TYPES), "two record types share an id"


def enum_names(enum: str, prefix: str) -> list[str]:
    """A C enum's members in value order, lowercased without `prefix`, checked to be consecutive.

    The sentinels (*_MAX, KSIFT_CNT_SENSOR_BASE) are left out.
    """
    assert enum in ENUMS, f"enum {enum} not found in {BPF_DIR}"
    members = [(n, v) for n, v in ENUMS[enum] if not n.endswith(("_MAX", "_SENSOR_BASE"))]
    assert all(n.startswith(prefix) for n, _ in members), f"{enum}: a member without prefix {prefix}"
    assert [v for _, v in members] == list(range(members[0][1], members[0][1] + len(members))), \
        f"{enum}: slots are not consecutive"
    return [n.removeprefix(prefix).lower() for n, _ in members]


def test_common_counter_names_match_header():
    names = enum_names("ksift_counter", "KSIFT_CNT_")
    assert tuple(names) == records.COMMON_COUNTER_NAMES
    assert len(names) == records.SENSOR_COUNTER_BASE
    assert np.dtype(records.COUNTERS).itemsize == 8 * records.COUNTER_SLOTS


def test_transport_counter_names_match_header():
    assert tuple(enum_names("ksift_transport_counter", "KSIFT_TR_")) == records.TRANSPORT_COUNTER_NAMES
    assert len(records.TRANSPORT_COUNTER_NAMES) <= records.TRANSPORT_SLOTS


def test_context_flags_are_the_whole_enum():
    assert [n for n, _ in ENUMS["ksift_ctx_flag"]] == ["KSIFT_CTX_EXE_EXEC", "KSIFT_CTX_ARGS_EXEC",
                                                       "KSIFT_CTX_ARGS_EVENT", "KSIFT_CTX_EXE_EVENT"]


def test_core_counter_names_match_core_object():
    assert ENUMS["ksift_core_counter"][0][1] == records.SENSOR_COUNTER_BASE
    assert tuple(enum_names("ksift_core_counter", "KSIFT_CNT_CORE_")) == CORE_COUNTER_NAMES


@pytest.mark.parametrize("sensor", BPF_SENSORS, ids=[s.name for s in BPF_SENSORS])
def test_sensor_counter_names_match_header(sensor):
    assert ENUMS[sensor.counter_enum][0][1] == records.SENSOR_COUNTER_BASE
    assert tuple(enum_names(sensor.counter_enum, "KSIFT_CNT_")) == sensor.counter_names
    assert len(sensor.all_counter_names()) <= records.COUNTER_SLOTS


def test_guard_counter_names_match_header():
    assert ENUMS[TreeGuard.counter_enum][0][1] == records.SENSOR_COUNTER_BASE
    assert tuple(enum_names(TreeGuard.counter_enum, "KSIFT_CNT_")) == TreeGuard.counter_names
