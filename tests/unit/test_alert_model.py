"""The one alert model: what build_alert emits, and what the docs, the OpenAPI schema and the store derive from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from agent_helpers import fork_storm_crossing, fork_storm_rules, plain_enricher
from alert_factory import make_alert

from ksift.alert_model import Alert, Subject, markdown_tables, openapi_schemas, with_tables
from ksift.alerts import Clocks, build_alert
from ksift.interfaces.openapi import build_spec
from ksift.rules.incidents import NS, IncidentEngine

DOC = Path(__file__).resolve().parents[2] / "docs" / "alerts.md"

# What users rely on (docs/alerts.md): exactly these keys, in this order.
ALERT_KEYS = ["id", "incident_id", "status", "ts", "rule", "severity", "summary", "count", "peak_window_count",
              "window_s", "threshold", "subject", "ancestry", "details", "stack", "suppressed", "degraded",
              "started_at", "resolved_at", "duration_s", "subject_exited"]
SUBJECT_KEYS = ["pid", "ppid", "comm", "exe", "cmdline", "uid", "start_boottime_ns", "cgroup_id", "cgroup",
                "container_id", "container_runtime", "pod_uid", "systemd_unit", "pod_name", "pod_namespace",
                "container_name", "cgroup_name", "exe_source", "cmdline_source", "cmdline_truncated"]


def built_alerts(records_lost: int = 0) -> tuple[dict, dict]:
    """The open and resolved alerts of a real fork_storm incident, through build_alert."""
    engine = IncidentEngine(fork_storm_rules().enabled())
    crossing = fork_storm_crossing(pid=2**22 + 7, count=80)  # no such pid: the kernel's context only
    clocks = Clocks(wall=lambda: 1_800_000_000.0, mono_ns=lambda: crossing.ktime_ns + 3 * NS)
    enricher = plain_enricher()
    [opened] = engine.observe(crossing)
    open_alert = build_alert(opened, enricher, clocks)  # as the agent does: when it opens
    engine.note_loss(crossing.ktime_ns, records_lost)
    [resolved] = engine.tick(crossing.ktime_ns + 3 * NS)
    return open_alert, build_alert(resolved, enricher, clocks)


def test_build_alert_emits_exactly_the_documented_keys():
    opened, resolved = built_alerts()
    for alert in (opened, resolved):
        assert list(alert) == ALERT_KEYS
        assert list(alert["subject"]) == SUBJECT_KEYS
        assert alert["ancestry"] == [{"pid": 1, "comm": "systemd"}]
    assert (opened["status"], resolved["status"]) == ("open", "resolved")
    assert opened["incident_id"] == resolved["incident_id"] and opened["id"] != resolved["id"]
    assert opened["degraded"] is None and opened["resolved_at"] is None and resolved["duration_s"] > 0


def test_a_degraded_incident_says_how_many_records_were_lost():
    _, resolved = built_alerts(records_lost=12)
    assert resolved["degraded"]["records_lost"] == 12 and resolved["degraded"]["reason"]


def test_the_factory_builds_what_build_alert_builds():
    assert list(make_alert()) == ALERT_KEYS and list(make_alert()["subject"]) == SUBJECT_KEYS
    assert [f.name for f in dataclasses.fields(Alert)] == [*ALERT_KEYS, "remediation"]


def test_the_enricher_fills_every_subject_field_and_no_other():
    subject = plain_enricher().subject(fork_storm_crossing(pid=2**22 + 7, count=80).task)
    assert list(subject) == [f.name for f in dataclasses.fields(Subject)]


def test_the_docs_tables_are_generated_from_the_model():
    text = DOC.read_text(encoding="utf-8")
    assert with_tables(text) == text, (
        "docs/alerts.md is out of date with src/ksift/alert_model.py: run "
        "`python -m ksift.alert_model docs/alerts.md`")
    assert markdown_tables() in text


def _conforms(value, schema: dict, schemas: dict, where: str) -> None:
    """Just enough JSON Schema to check an alert against the served OpenAPI components."""
    if "$ref" in schema:
        return _conforms(value, schemas[schema["$ref"].rsplit("/", 1)[1]], schemas, where)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return _conforms(value, option, schemas, where)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: matches no option: {errors}")
    python = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None),
              "object": dict, "array": list}
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    assert any(isinstance(value, python[k]) and not (k in ("integer", "number") and isinstance(value, bool))
               for k in kinds), f"{where}: {value!r} is not {kinds}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict) and "properties" in schema:
        assert set(schema.get("required", ())) <= set(value), f"{where}: missing {schema['required']}"
        for key, item in value.items():
            if key in schema["properties"]:
                _conforms(item, schema["properties"][key], schemas, f"{where}.{key}")
    if isinstance(value, list) and schema.get("items"):
        for i, item in enumerate(value):
            _conforms(item, schema["items"], schemas, f"{where}[{i}]")


@pytest.mark.parametrize("which", ["open", "resolved"])
def test_built_alerts_conform_to_the_served_openapi_schema(which):
    schemas = build_spec("test")["components"]["schemas"]
    assert {name: schemas[name] for name in openapi_schemas()} == openapi_schemas()
    alert = dict(zip(("open", "resolved"), built_alerts(records_lost=3)))[which]
    assert set(schemas["Alert"]["properties"]) >= set(alert)
    _conforms(alert, {"$ref": "#/components/schemas/Alert"}, schemas, "alert")


def test_the_schema_requires_what_every_stored_alert_has():
    assert openapi_schemas()["Alert"]["required"] == ["id", "incident_id", "status", "ts", "rule", "severity",
                                                      "summary"]
