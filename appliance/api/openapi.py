"""The API's OpenAPI document (GET /openapi.json), built once on first request.

Every part comes from a typed declaration; nothing here names a route:

- the typed handlers (admin API, /v1/models, /readyz, ...): Litestar, from their
  signatures and answer Structs (appliance/status.py, gateway/protocol.py);
- the proxy endpoints, which the front door serves raw: one entry per row of
  ``capabilities.ENDPOINTS``, its request body the row's msgspec Struct (with the
  ranges msgspec checks as it decodes), its summary and operation id the row's;
- the admin calls' bodies, which their handlers read themselves (a malformed or
  trickled body is refused before anything changes): the Struct each names in
  ``opt["body"]``;
- every route's errors: its dialect's envelope (``dialects.dialect_for_path``, the
  same choice ``http_errors.error_parts`` makes), OpenAI's except on the Anthropic paths;
- the configured model names, the only ones served (any other is a 404).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from appliance.gateway.capabilities import ENDPOINTS, Endpoint
from appliance.gateway.dialects import OPENAI, dialect_for_path

REF = "#/components/schemas/"
ANY_OBJECT = {"type": "object"}
# Each server-sent event: data is a JSON chunk, [DONE], or an error envelope.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}


def _admin_bodies(handlers: list) -> dict[str, type]:
    """Path -> the request body type of each admin call that reads its own body."""
    return {path: h.opt["body"] for h in handlers if "body" in h.opt for path in h.paths}


def _json_bodies() -> list[type]:
    return list(dict.fromkeys(e.cls for e in ENDPOINTS.values() if not e.form))


def _components(bodies: list[type], models: list[str]) -> dict[str, Any]:
    """The request bodies' and the error envelopes' schemas, as msgspec decodes and encodes them."""
    envelopes = {OPENAI.error_envelope, *(e.dialect.error_envelope for e in ENDPOINTS.values())}
    _, defs = msgspec.json.schema_components([*_json_bodies(), *envelopes, *bodies], ref_template=REF + "{name}")
    for cls in _json_bodies():
        defs[cls.__name__]["properties"]["model"]["enum"] = models
    return defs


def _proxy_operation(path: str, endpoint: Endpoint, first: str, models: list[str]) -> dict:
    """The entry of one proxy endpoint, from its row; first: the path its row is first served at."""
    answer: dict[str, dict] = {"application/json": {"schema": ANY_OBJECT}}
    if endpoint.form or "stream" in getattr(endpoint.cls, "__struct_fields__", ()):
        answer["text/event-stream"] = {"schema": SSE_EVENT}
    summary = endpoint.summary if path == first else f"Alias of {first}: {endpoint.summary}"
    body = _form_body(models) if endpoint.form else _json_body(endpoint.cls)
    return {
        "summary": summary,
        "operationId": (path == first and endpoint.operation_id) or path.strip("/").replace("/", "_"),
        "requestBody": body,
        "responses": {
            "200": {"description": "The engine's answer, byte for byte (SSE when stream is true)", "content": answer}
        },
    }


def _json_body(cls: type) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF + cls.__name__}}}}


def _form_body(models: list[str]) -> dict:
    """An audio upload: multipart/form-data, the model a form field; other fields pass through."""
    schema = {
        "type": "object",
        "required": ["model", "file"],
        "properties": {
            "model": {"type": "string", "enum": models},
            "file": {"type": "string", "format": "binary"},
            "stream": {"type": "boolean"},
        },
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def _errors(path: str, operation: dict) -> None:
    """The path's error answers: its dialect's envelope (Litestar's own error bodies are not ours)."""
    responses = operation.setdefault("responses", {})
    for status, answer in list(responses.items()):
        if status[0] in "45" and not _declared(answer):
            del responses[status]
    envelope = dialect_for_path(path).error_envelope
    for status in ("4XX", "5XX"):
        responses[status] = {
            "description": "An error, in the error envelope of the path's API",
            "content": {"application/json": {"schema": {"$ref": REF + envelope.__name__}}},
        }


def _declared(answer: dict) -> bool:
    """An error answer its handler declares with one of our Structs (/readyz's 503)."""
    schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
    return schema.get("$ref", "").startswith(REF)


def _openapi_path(path: str) -> str:
    """A Litestar route path ({model:str}) as the document writes it ({model})."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


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
    doc["info"]["description"] = (
        "OpenAI-compatible API and admin API of the appliance. Every error is "
        '{"error": {"message", "type", "param", "code"}}, except on the Anthropic Messages '
        'paths (/v1/messages...): {"type": "error", "error": {"type", "message"}}.'
    )
    bodies = _admin_bodies(handlers)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(_components(list(bodies.values()), models))
    paths = doc["paths"]
    first: dict[int, str] = {}  # an endpoint's row -> the first path it is served at
    for path, endpoint in ENDPOINTS.items():
        paths[path] = {"post": _proxy_operation(path, endpoint, first.setdefault(id(endpoint), path), models)}
    for path, item in paths.items():
        for op in item.values():
            _errors(path, op)
    for path, cls in bodies.items():
        # State-changing admin calls are JSON, even with nothing to say ({}): no
        # cross-site "simple" request can send that content type.
        paths[_openapi_path(path)]["post"]["requestBody"] = _json_body(cls)
    _model_names(doc, models)
    return doc
