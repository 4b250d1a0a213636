"""The API's OpenAPI document (GET /openapi.json), built once on first request.

Litestar generates the typed handlers' part (paths, path parameters). What it
cannot see is added here, in one place: the raw ASGI OpenAI routes (their
request bodies are the msgspec Structs in protocol.py), the admin request
bodies, the content types that are not JSON, and the one error envelope
(errors.py) that every error of every route uses.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from appliance.errors import ErrorEnvelope
from appliance.gateway.protocol import (
    MAX_COUNT,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)

REF = "#/components/schemas/"
ERROR = {"$ref": REF + "ErrorEnvelope"}
ANY_OBJECT = {"type": "object"}
# Each server-sent event: data is a JSON chunk, [DONE], or an error envelope.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}

# Limits protocol.decode_request enforces beyond the types (its _check_ranges).
_AT_LEAST_ONE = {"max_tokens", "max_completion_tokens", "n"}

_OPENAI_ROUTES = {
    "/v1/chat/completions": ("ChatCompletionRequest", "Create a chat completion (proxied to a replica)"),
    "/v1/completions": ("CompletionRequest", "Create a completion (proxied to a replica)"),
    "/v1/embeddings": ("EmbeddingRequest", "Create embeddings (models with embeddings = true)"),
}
_ACTIONS = {"/admin/models/{model}/{action}": ["load", "unload", "pin", "unpin"],
            "/admin/models/{model}/replicas/{index}/{action}": ["restart", "drain"]}


def _components() -> dict[str, Any]:
    _, defs = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ErrorEnvelope, ModelList, ModelCard],
        ref_template=REF + "{name}")
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = defs[name]["properties"]
        for field in _AT_LEAST_ONE & set(props):
            props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
                                      {"type": "null"}]}
        props["model"] = {"type": "string", "minLength": 1}
        props["n_predict"] = {"anyOf": [{"type": "integer", "minimum": -2, "maximum": MAX_COUNT},
                                        {"type": "null"}]}
        props["cache_salt"] = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}
    defs["ChatCompletionRequest"]["properties"]["messages"]["minItems"] = 1
    defs["EmbeddingRequest"]["properties"]["model"] = {"type": "string", "minLength": 1}
    defs["ActionBody"] = {"type": "object", "additionalProperties": False, "properties": {}}
    defs["ScaleBody"] = {"type": "object", "additionalProperties": False, "required": ["replicas"],
                         "properties": {"replicas": {"anyOf": [{"type": "integer", "minimum": 0},
                                                              {"type": "null"}]}}}
    return defs


def _errors(operation: dict, statuses: tuple[str, ...] = ("4XX", "5XX")) -> None:
    responses = operation.setdefault("responses", {})
    for status in list(responses):
        if status[0] in "45":
            del responses[status]
    for status in statuses:
        responses[status] = {"description": "An error, in the OpenAI error envelope",
                             "content": {"application/json": {"schema": ERROR}}}


def _json_body(ref: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF + ref}}}}


def _model_names(doc: dict, models: list[str]) -> None:
    """The configured model names are the only ones served: any other is a 404."""
    for item in doc["paths"].values():
        for op in item.values():
            for p in op.get("parameters", []):
                if p["name"] in ("model", "model_id"):
                    p["schema"] = {"type": "string", "enum": models}


def build(handlers: list, models: list[str], version: str) -> dict:
    """The document for the app's route handlers and the configured models."""
    probe = Litestar(route_handlers=handlers, openapi_config=OpenAPIConfig(title="appliance", version=version))
    doc = copy.deepcopy(probe.openapi_schema.to_schema())
    doc["info"]["description"] = ("OpenAI-compatible API and admin API of the appliance. Every error is "
                                  '{"error": {"message", "type", "param", "code"}}.')
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_components())
    for name in ("ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest"):
        schemas[name]["properties"]["model"]["enum"] = models
    paths = doc["paths"]
    for path, (body, summary) in _OPENAI_ROUTES.items():
        paths[path] = {"post": {
            "summary": summary, "operationId": body.removesuffix("Request"),
            "requestBody": _json_body(body),
            "responses": {"200": {"description": "The engine's answer, byte for byte (SSE when stream is true)",
                                  "content": {"application/json": {"schema": ANY_OBJECT},
                                              "text/event-stream": {"schema": SSE_EVENT}}}}}}
    for item in paths.values():
        for op in item.values():
            _errors(op)
    paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "$ref": REF + "ModelList"}
    paths["/v1/models/{model_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "$ref": REF + "ModelCard"}
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    # "models" only to a caller with a key or the admin credential once keys are required.
    readiness = {"type": "object", "required": ["status"],
                 "properties": {"status": {"enum": ["ready", "starting", "draining"]},
                                "models": {"type": "object", "additionalProperties": {"type": "boolean"}}}}
    ready = paths["/readyz"]["get"]["responses"]
    ready["200"]["content"]["application/json"]["schema"] = readiness
    ready["503"] = {"description": "Not ready (starting or draining): the same body, with Retry-After",
                    "content": {"application/json": {"schema": readiness}}}
    paths["/admin/models/{model}/scale"]["post"]["requestBody"] = _json_body("ScaleBody")
    for path, actions in _ACTIONS.items():
        # State-changing admin calls are JSON, even with nothing to say ({}): no
        # cross-site "simple" request can send that content type.
        paths[path]["post"]["requestBody"] = _json_body("ActionBody")
        for p in paths[path]["post"]["parameters"]:
            if p["name"] == "action":
                p["schema"] = {"type": "string", "enum": actions}
    _model_names(doc, models)
    return doc
