"""HTTP routes of remediation, added to the agent's API as a route provider.

    GET  /api/v1/actions               decisions, newest `limit`, oldest first (?status=pending&limit=100)
    GET  /api/v1/actions/{id}          one decision
    POST /api/v1/actions/{id}/approve  approve a pending decision (ask mode)
    POST /api/v1/actions/{id}/reject   reject it

Approving or rejecting needs the API token (`[api] token`, or the one the
agent makes next to its store, root only): a process on the host that can
reach a loopback port cannot approve an action by itself. With no token at all
(`[api] auth = "none"`) the POST routes answer 403. The API's own middleware checks the token
on every route when one is set. Decision changes are streamed by the API as
SSE `action` events (the engine's listeners).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ksift.errors import StoreError
from ksift.interfaces.http import HttpError, Request, Response, Router, error_response, json_response
from ksift.remediation.decisions import STATUSES, DecisionError

if TYPE_CHECKING:
    from ksift.remediation.engine import RemediationEngine

MAX_LIMIT = 10_000
_OBJECT = {"type": "object", "additionalProperties": True}


def _view(decision) -> dict[str, Any]:
    data = decision.as_dict()
    data["summary"] = decision.summary()
    return data


def route_provider(engine: RemediationEngine, token_configured: bool) -> Callable[[Router], None]:
    """The provider the API calls with its router."""

    async def list_actions(request: Request) -> Response:
        status = request.single("status")
        if status is not None and status not in STATUSES:
            raise HttpError(400, f"invalid status {status!r} (expected one of: {', '.join(STATUSES)})",
                            parameter="status")
        raw = request.single("limit") or "100"
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise HttpError(400, f"invalid limit {raw!r}: must be an integer between 1 and {MAX_LIMIT}",
                            parameter="limit")
        try:
            decisions = await engine.read(lambda store: store.list(status=status, limit=int(raw)))
        except StoreError as exc:
            return error_response(503, str(exc))
        return json_response({"actions": [_view(d) for d in decisions], "count": len(decisions)})

    async def get_action(request: Request) -> Response:
        decision_id = request.params["id"]
        try:
            decision = await engine.read(lambda store: store.get(decision_id))
        except StoreError as exc:
            return error_response(503, str(exc))
        if decision is None:
            return error_response(404, f"no decision with id {decision_id!r}")
        return json_response(_view(decision))

    async def answer(request: Request, approve: bool) -> Response:
        if not token_configured:
            return error_response(403, "approving or rejecting actions over HTTP needs an API token: set [api] token "
                               "(or use `ksift actions approve|reject ID` on the host)")
        decision_id = request.params["id"]
        try:
            decision = await engine.answer(decision_id, approve, by=f"api ({request.peer or 'unix socket'})")
        except DecisionError as exc:
            return error_response(404 if exc.unknown else 409, str(exc))
        except StoreError as exc:
            return error_response(503, str(exc))
        return json_response(_view(decision))

    async def approve(request: Request) -> Response:
        return await answer(request, True)

    async def reject(request: Request) -> Response:
        return await answer(request, False)

    def provide(router: Router) -> None:
        router.get("/api/v1/actions", list_actions, params=("status", "limit"))
        router.get("/api/v1/actions/{id}", get_action)
        router.post("/api/v1/actions/{id}/approve", approve)
        router.post("/api/v1/actions/{id}/reject", reject)
        router.openapi_paths.update(openapi_paths())

    return provide


def openapi_paths() -> dict[str, Any]:
    """OpenAPI path items of these routes."""
    id_param = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    decision = {"description": "the decision", "content": {"application/json": {"schema": _OBJECT}}}

    def err(text: str) -> dict[str, Any]:
        schema = {"$ref": "#/components/schemas/Error"}
        return {"description": text, "content": {"application/json": {"schema": schema}}}

    def post(summary: str, op: str) -> dict[str, Any]:
        return {"parameters": id_param, "post": {
            "summary": summary, "operationId": op,
            "responses": {"200": decision, "401": err("the request did not carry the token"),
                          "403": err("no API token is configured: answers over HTTP are refused"),
                          "404": err("no decision has this id"),
                          "409": err("the decision is not pending (answered, expired, or never asked)")}}}

    return {
        "/api/v1/actions": {"get": {
            "summary": "Remediation decisions, newest `limit`, oldest first", "operationId": "listActions",
            "parameters": [
                {"name": "status", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": list(STATUSES)}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}}],
            "responses": {"200": {"description": "decisions", "content": {"application/json": {"schema": _OBJECT}}},
                          "400": err("a parameter is invalid"), "401": err("the request did not carry the token")}}},
        "/api/v1/actions/{id}": {"parameters": id_param, "get": {
            "summary": "One remediation decision", "operationId": "getAction",
            "responses": {"200": decision, "404": err("no decision has this id"),
                          "401": err("the request did not carry the token")}}},
        "/api/v1/actions/{id}/approve": post("Approve a pending action (ask mode); the token is required",
                                             "approveAction"),
        "/api/v1/actions/{id}/reject": post("Reject a pending action (ask mode); the token is required",
                                            "rejectAction"),
    }
