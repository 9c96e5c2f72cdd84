"""The alert every sink receives, declared once: each field with its type and meaning.

Everything that shows an alert's shape derives from these classes: the JSON
(`Alert.to_dict()`, what sinks get), the store's indexed columns
(`STORE_COLUMNS`, `store_row`), the OpenAPI schema (`openapi_schemas`) and the
field tables of docs/alerts.md (`markdown_tables`; a unit test checks the
document holds exactly what this module generates:
`python -m ksift.alert_model docs/alerts.md` rewrites it).

Sinks receive the dict, not the object: it is the documented JSON, and stored
alerts read back from SQLite (possibly written by an older ksift, or annotated
since) are dicts too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from ksift.rules.model import SEVERITIES
from ksift.timeparse import parse_timestamp

STATUSES = ("open", "resolved")


def _field(doc: str, *, column: bool = False, omit_if_none: bool = False, default: Any = dataclasses.MISSING,
           **schema: Any) -> Any:
    """A model field: `doc` is its one-line meaning (docs table, OpenAPI description).

    column: also an indexed column of the store's alerts table (and so present in
    every stored alert, older ones included: the schema's `required`).
    omit_if_none: left out of the JSON while None (an annotation added later).
    schema: JSON-schema keywords beyond what the type says (format, enum).
    """
    return dataclasses.field(default=default, metadata={"doc": doc, "column": column,
                                                        "omit_if_none": omit_if_none, "schema": schema})


class _Model:
    """JSON conversion shared by the alert and its parts."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in declaration order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, _Model):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class Ancestor(_Model):
    """One parent of the subject."""

    pid: int = _field("process id")
    comm: str = _field("command name, as the kernel keeps it (15 characters at most)")


@dataclass(frozen=True)
class Subject(_Model):
    """The process an alert is about, as captured at its incident's first crossing."""

    pid: int = _field("process id (the thread group id)")
    ppid: int = _field("parent's process id")
    comm: str = _field("command name, captured in the kernel")
    exe: str | None = _field("executable, as of the incident's first crossing: its full path (`exe_source` says "
                             "where it came from)")
    cmdline: list[str] | None = _field("arguments, as of the incident's first crossing, even if the process "
                                       "exited a moment later (`cmdline_source`, `cmdline_truncated`); null "
                                       "when none could be captured")
    uid: int = _field("user id")
    start_boottime_ns: int = _field("start time (CLOCK_BOOTTIME ns); with pid, the process's identity")
    cgroup_id: int = _field("cgroup v2 id (inode of the cgroup directory)")
    cgroup: str | None = _field("cgroup v2 path")
    container_id: str | None = _field("container id parsed from the cgroup path")
    container_runtime: str | None = _field("docker, containerd, cri-o or podman")
    pod_uid: str | None = _field("Kubernetes pod uid parsed from the cgroup path")
    systemd_unit: str | None = _field("systemd unit parsed from the cgroup path")
    pod_name: str | None = _field("Kubernetes pod name ([kubernetes] enabled only)")
    pod_namespace: str | None = _field("Kubernetes namespace ([kubernetes] enabled only)")
    container_name: str | None = _field("container name in the pod ([kubernetes] enabled only)")
    cgroup_name: str | None = _field(
        "the cgroup's own name (the last part of its path), kept by the kernel at the event: names the cgroup "
        "(and its container or unit) when it was gone before its path could be read", default=None)
    exe_source: str | None = _field(
        "where `exe` came from: `proc` (/proc/PID/exe at the first crossing), `event` (its executable file's "
        "full path, resolved in the kernel at the event), `exec` (the path it was exec'd with, kept by the kernel "
        "since: its memory was gone at the event), `exe_name` (only the file name: neither was at hand)",
        default=None, enum=["proc", "event", "exec", "exe_name", None])
    cmdline_source: str | None = _field(
        "where `cmdline` came from: `proc` (/proc/PID/cmdline at the first crossing), `exec` (copied by the "
        "kernel at its exec), `event` (read by the kernel from the process's memory at the event: ksift did not "
        "see its exec)", default=None, enum=["proc", "exec", "event", None])
    cmdline_truncated: bool = _field(
        "the kernel's copy of the arguments was cut at 376 bytes: the last argument is partial",
        default=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Subject:
        """From the enricher's dict; TypeError names a key the model does not declare."""
        return cls(**data)


@dataclass(frozen=True)
class Degraded(_Model):
    """Why the alert may miss part of the story."""

    records_lost: int = _field("records the kernel could not hand over while the incident was open")
    reason: str = _field("what was lost, in words")


@dataclass(frozen=True)
class Alert(_Model):
    """One alert, as every sink receives it: an incident produces two, `open` and `resolved`."""

    id: str = _field("unique id of this alert", column=True)
    incident_id: str = _field("the incident both alerts belong to", column=True)
    status: str = _field("`open` or `resolved`", column=True, enum=list(STATUSES))
    ts: str = _field("RFC 3339 UTC time of the alert (the kernel's timestamp of the crossing for `open`)",
                     column=True, format="date-time")
    rule: str = _field("the rule that fired", column=True)
    severity: str = _field("the rule's severity (or `critical`, when a pressure rule's critical level was "
                           "reached): `info`, `warning` or `critical`", column=True, enum=list(SEVERITIES))
    summary: str = _field("one sentence: `PID 1234 (bash) forked 57 times in the last 1s`", column=True)
    count: int = _field("events by the key since the incident's first hot window began (for `resolved`: the total)")
    peak_window_count: int = _field("the most events seen in one window")
    window_s: float = _field("the rule's window, in seconds")
    threshold: int = _field("the rule's threshold")
    subject: Subject = _field("the process the alert is about")
    ancestry: list[Ancestor] = _field("its parents, nearest first, up to pid 1")
    details: dict[str, Any] | None = _field("the signal's own figures (request path, exit status, address...)")
    stack: list[Any] | None = _field("symbolized stacks when the rule captures them: frames, or the hottest "
                                     "stacks as `{samples, user, kernel}`")
    suppressed: int = _field("repeats folded into this incident (later hot windows, and crossings during the "
                             "previous cooldown)")
    degraded: Degraded | None = _field("set when records were lost while the incident was open (`null` "
                                       "otherwise)")
    started_at: str = _field("when the incident's first hot window began", format="date-time")
    resolved_at: str | None = _field("when the incident ended (`null` while open)", format="date-time")
    duration_s: float | None = _field("the incident's span, in seconds (`null` while open)")
    subject_exited: bool = _field("the process had exited when the incident resolved")
    remediation: dict[str, Any] | None = _field(
        "remediation's decision on the incident, once one exists (absent before): `{decision_id, action, mode, "
        "status, guard, reason, summary, outcome}` (docs/safety.md); when the decision changes, the incident's "
        "last alert is sent again to every sink, same `id`, with the new value", omit_if_none=True, default=None)


# -- the store's alerts table (store/sqlite.py, migration 1) ----------------------------------

# Model fields copied into columns, then the columns the store derives: the
# timestamp as a number to sort by, the subject's pid, and the whole alert as JSON.
STORE_COLUMNS: tuple[str, ...] = (
    *(f.name for f in dataclasses.fields(Alert) if f.metadata["column"]), "ts_unix", "pid", "body")


def store_row(alert: Mapping[str, Any]) -> tuple[Any, ...]:
    """The alerts table's values for one alert dict, in STORE_COLUMNS order.

    KeyError names a missing column field; TypeError or ValueError a value the
    table cannot hold (a bad timestamp, something not JSON).
    """
    pid = (alert.get("subject") or {}).get("pid")
    derived = {
        "ts_unix": parse_timestamp(alert["ts"]).timestamp(),
        "pid": pid if isinstance(pid, int) else None,
        "body": json.dumps(alert, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
    }
    return tuple(derived[c] if c in derived else str(alert[c]) for c in STORE_COLUMNS)


# -- JSON schema (OpenAPI 3.1) -------------------------------------------------------------------

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_MODELS: tuple[type, ...] = (Alert, Subject, Ancestor, Degraded)
_SCHEMA_NAMES = {Alert: "Alert", Subject: "AlertSubject", Ancestor: "AlertAncestor", Degraded: "AlertDegraded"}


def _type_schema(tp: Any) -> dict[str, Any]:
    """The JSON schema of a field's annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        schema = _type_schema(inner[0]) if len(inner) == 1 else {"anyOf": [_type_schema(a) for a in inner]}
        if "$ref" in schema:
            return {"anyOf": [schema, {"type": "null"}]}
        return {**schema, "type": [schema["type"], "null"]}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0]) if args and args[0] is not Any else {}}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if tp in _SCHEMA_NAMES:
        return {"$ref": f"#/components/schemas/{_SCHEMA_NAMES[tp]}"}
    raise TypeError(f"no JSON schema for {tp!r}")


def _object_schema(model: type) -> dict[str, Any]:
    hints = typing.get_type_hints(model)
    properties = {f.name: {**_type_schema(hints[f.name]), **f.metadata["schema"], "description": f.metadata["doc"]}
                  for f in dataclasses.fields(model)}
    schema: dict[str, Any] = {"type": "object", "description": model.__doc__.strip().splitlines()[0],
                              "properties": properties}
    required = [f.name for f in dataclasses.fields(model) if f.metadata["column"]]
    if required:
        schema["required"] = required
    # Stored alerts may carry keys a later ksift added: readers must ignore what they do not know.
    schema["additionalProperties"] = True
    return schema


def openapi_schemas() -> dict[str, dict[str, Any]]:
    """components.schemas entries: Alert and the parts it refers to."""
    return {_SCHEMA_NAMES[m]: _object_schema(m) for m in _MODELS}


# -- docs/alerts.md ------------------------------------------------------------------------------

DOC_BEGIN = "<!-- generated from src/ksift/alert_model.py: python -m ksift.alert_model docs/alerts.md -->"
DOC_END = "<!-- end of generated tables -->"


def _type_text(schema: dict[str, Any]) -> str:
    """The type column: JSON types, a part's keys, `date-time` for timestamps."""
    if "$ref" in schema:
        model = next(m for m, name in _SCHEMA_NAMES.items() if schema["$ref"].endswith("/" + name))
        if model is Subject:
            return "object (below)"
        return "{" + ", ".join(f.name for f in dataclasses.fields(model)) + "}"
    if "anyOf" in schema:
        return " or ".join(_type_text(s) for s in schema["anyOf"])
    texts = []
    for kind in schema["type"] if isinstance(schema["type"], list) else [schema["type"]]:
        if kind == "array" and schema.get("items"):
            texts.append(f"array of {_type_text(schema['items'])}")
        elif kind == "string" and "format" in schema:
            texts.append(f"string ({schema['format']})")
        else:
            texts.append(kind)
    return " or ".join(texts)


def _table(model: type) -> list[str]:
    hints = typing.get_type_hints(model)
    lines = ["| field | type | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(model):
        schema = {**_type_schema(hints[f.name]), **f.metadata["schema"]}
        lines.append(f"| `{f.name}` | {_type_text(schema)} | {f.metadata['doc']} |")
    return lines


def markdown_tables() -> str:
    """The field tables of docs/alerts.md, between their markers."""
    parts = [(Subject, "subject"), (Ancestor, "ancestry[]"), (Degraded, "degraded")]
    lines = [DOC_BEGIN, "", *_table(Alert)]
    for model, name in parts:
        lines += ["", f"`{name}`: {model.__doc__.strip().splitlines()[0]}", "", *_table(model)]
    lines += ["", DOC_END]
    return "\n".join(lines)


def with_tables(document: str) -> str:
    """`document` with the text between the markers replaced by markdown_tables()."""
    if DOC_BEGIN not in document or DOC_END not in document:
        raise ValueError(f"the document has no generated-tables markers ({DOC_BEGIN!r} ... {DOC_END!r})")
    head, rest = document.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    return head + markdown_tables() + tail


def main(argv: list[str]) -> int:
    """Rewrite the tables of each document named (docs/alerts.md)."""
    for path in argv:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(with_tables(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
