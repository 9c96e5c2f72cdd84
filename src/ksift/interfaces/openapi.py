"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

Kept next to the routes (api.py registers exactly these paths; a unit test
checks that every route is described). Parts that add routes later (for
example remediation) add their own path items through api.OPENAPI_PATHS.
"""

from __future__ import annotations

import copy
from typing import Any

from ksift.alert_model import openapi_schemas

_JSON = "application/json"


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, {"$ref": "#/components/schemas/Error"})


def _text(description: str, media: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _get(summary: str, responses: dict[str, Any], *, public: bool = False, parameters: list | None = None,
         operation_id: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "operationId": operation_id, "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if public:
        op["security"] = []  # reachable without the token
    else:
        op["responses"].setdefault("401", _error("a token is configured and the request did not carry it"))
    return {"get": op}


_OBJECT = {"type": "object", "additionalProperties": True}

_PATHS: dict[str, Any] = {
    "/healthz": _get("Liveness: the HTTP server answers", {"200": _json("alive", _OBJECT)},
                     public=True, operation_id="healthz"),
    "/readyz": _get("Readiness: the loop runs and every sensor is attached",
                    {"200": _json("ready", _OBJECT), "503": _json("not ready, with the reason", _OBJECT)},
                    public=True, operation_id="readyz"),
    "/api/v1/alerts": _get(
        "Stored alerts, newest `limit` of them, oldest first",
        {"200": _json("matching alerts", {
            "type": "object",
            "properties": {"alerts": {"type": "array", "items": {"$ref": "#/components/schemas/Alert"}},
                           "count": {"type": "integer"}}}),
         "400": _error("a parameter is invalid; the message names it"),
         "503": _error("the alert store cannot be read")},
        parameters=[
            _query("rule", "only this rule", {"type": "string"}),
            _query("severity", "at least this severity", {"type": "string", "enum": ["info", "warning", "critical"]}),
            _query("status", "only open or resolved alerts", {"type": "string", "enum": ["open", "resolved"]}),
            _query("since", "RFC 3339 time, or a duration back from now: 30s, 10m, 2h, 1d, 1w", {"type": "string"}),
            _query("limit", "at most this many (1-10000, default 100)",
                   {"type": "integer", "minimum": 1, "maximum": 10000}),
        ],
        operation_id="listAlerts"),
    "/api/v1/alerts/{id}": {
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
        **_get("One stored alert", {"200": _json("the alert", {"$ref": "#/components/schemas/Alert"}),
                                    "404": _error("no alert has this id")}, operation_id="getAlert"),
    },
    "/api/v1/incidents": _get(
        "Incidents open now, with the context captured when they opened",
        {"200": _json("open incidents", {"type": "object", "properties": {
            "incidents": {"type": "array", "items": _OBJECT}, "count": {"type": "integer"}}})},
        operation_id="listIncidents"),
    "/api/v1/events": _get(
        "Server-sent events: `alert` as incidents open and resolve, `action` from remediation, "
        "`lost` when this client was too slow and missed events; a comment line every heartbeat",
        {"200": _text("an endless text/event-stream; each data line is one JSON object", "text/event-stream")},
        parameters=[{"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
                     "description": "resume after this event id (recent events are replayed)"}],
        operation_id="streamEvents"),
    "/api/v1/funnel": _get(
        "The funnel's counters: kernel, transport, rules, alerts, sinks (poll it for rates)",
        {"200": _json("counters since the agent started", _OBJECT)}, operation_id="funnel"),
    "/api/v1/status": _get(
        "Version, rules, sensors with their attached programs, uptime",
        {"200": _json("agent status", _OBJECT)}, operation_id="status"),
    "/openapi.json": _get("This description", {"200": _json("OpenAPI 3.1 document", _OBJECT)},
                          operation_id="openapi"),
    "/metrics": _get("Prometheus metrics, read from the agent at scrape time (no token needed from this host: "
                     "loopback or the unix socket)",
                     {"200": _text("Prometheus text format 0.0.4", "text/plain")}, operation_id="metrics"),
    "/": _get("The dashboard (with a token set, open /?token=TOKEN once, or log in with the form served "
              "here: it sets a session cookie)",
              {"200": _text("HTML page", "text/html"), "303": {"description": "token accepted, cookie set"}},
              parameters=[_query("token", "the API token, traded once for a session cookie", {"type": "string"})],
              operation_id="dashboard"),
    "/login": {"post": {
        "summary": "The dashboard's login form: the token (form field `token`) traded for a session cookie",
        "operationId": "login", "security": [],
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "properties": {"token": {"type": "string"}}, "required": ["token"]}}}},
        "responses": {"303": {"description": "token accepted: session cookie set, redirect to /"},
                      "401": _error("wrong token"), "404": _error("no token is configured")}}},
    "/dashboard/app.js": _get("Dashboard script", {"200": _text("JavaScript", "text/javascript")},
                              operation_id="dashboardScript"),
    "/dashboard/style.css": _get("Dashboard style sheet", {"200": _text("CSS", "text/css")},
                                 operation_id="dashboardStyle"),
}

_COMPONENTS: dict[str, Any] = {
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                   "description": "[api] token; also accepted as the dashboard's session cookie"}},
    "schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string", "description": "what was wrong, naming the parameter"},
            "parameter": {"type": "string", "description": "the query parameter at fault, for 400"}}},
        # Alert and its parts, from the one alert model (ksift.alert_model).
        **openapi_schemas(),
    },
}


def build_spec(version: str, extra_paths: dict[str, Any] | None = None, token_required: bool = False) -> dict:
    """The document for this server: the built-in paths plus those other parts registered."""
    paths = copy.deepcopy(_PATHS)
    for path, item in (extra_paths or {}).items():
        paths.setdefault(path, {}).update(copy.deepcopy(item))
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "ksift agent API", "version": version,
                 "description": "Alerts, open incidents, the event funnel and a live event stream of one "
                                "ksift agent. Read-only unless a part such as remediation adds actions."},
        "paths": paths,
        "components": copy.deepcopy(_COMPONENTS),
    }
    if token_required:
        spec["security"] = [{"bearer": []}]
    return spec
