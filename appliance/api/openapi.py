"""The API's OpenAPI document (GET /openapi.json), built once on first request.

Litestar generates the typed handlers' part: paths, parameters and answers, from
their Structs (the admin API's in appliance/status.py, /v1/models' in protocol.py).
What it cannot see is added here, in one place: the raw ASGI OpenAI routes (their
request bodies are the msgspec Structs in protocol.py, with the ranges
``decode_request`` checks), the admin calls' bodies (read by the handlers
themselves, named in their ``opt["body"]``), the configured model names, and the
one error envelope (errors.py) that every error of every route uses.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from appliance.errors import ErrorEnvelope
from appliance.gateway.capabilities import ENDPOINTS
from appliance.gateway.protocol import AT_LEAST_ONE, MAX_COUNT

REF = "#/components/schemas/"
ERROR = {"$ref": REF + "ErrorEnvelope"}
ANY_OBJECT = {"type": "object"}
# Each server-sent event: data is a JSON chunk, [DONE], or an error envelope.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}

# What each proxy endpoint does (appliance/capabilities.py: ENDPOINTS says which
# models serve it; any other gets a 400).
_SUMMARIES = {
    "/v1/chat/completions": "Create a chat completion (proxied to a replica)",
    "/v1/completions": "Create a completion (proxied to a replica)",
    "/v1/embeddings": "Create embeddings (models with embeddings = true)",
    "/v1/responses": "Create a response (OpenAI Responses API; stateless: store false)",
    "/v1/messages": "Create a message (Anthropic Messages API; x-api-key accepted)",
    "/v1/messages/count_tokens": "Count a message's input tokens (Anthropic Messages API)",
    "/tokenize": "Tokenize text with a model's tokenizer",
    "/detokenize": "Turn token ids back into text",
    "/infill": "Fill in the middle of code (llama.cpp's infill; models with FIM tokens)",
    "/v1/rerank": "Rerank documents against a query (models with the rerank task)",
    "/rerank": "Rerank documents against a query (alias of /v1/rerank)",
    "/v2/rerank": "Rerank documents against a query (alias of /v1/rerank)",
    "/v1/score": "Score text pairs (models with the rerank task)",
    "/v1/audio/transcriptions": "Transcribe audio (multipart; models with the transcribe task)",
    "/v1/audio/translations": "Translate audio into English text (multipart; models with the transcribe task)",
}
# Anthropic's envelope, what every error on the /v1/messages paths is.
ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
# The operation ids the first endpoints always had.
_OPERATION_IDS = {
    "/v1/chat/completions": "ChatCompletion",
    "/v1/completions": "Completion",
    "/v1/embeddings": "Embedding",
}


def _requests() -> list[type]:
    return list(dict.fromkeys(e.cls for e in ENDPOINTS.values() if not e.form))


def _admin_bodies(handlers: list) -> dict[str, type]:
    """Path -> the request body type of each admin call that reads its own body."""
    return {path: h.opt["body"] for h in handlers if "body" in h.opt for path in h.paths}


def _components(bodies: list[type]) -> dict[str, Any]:
    _, defs = msgspec.json.schema_components([*_requests(), ErrorEnvelope, *bodies], ref_template=REF + "{name}")
    for cls in _requests():
        props = defs[cls.__name__]["properties"]
        for field in set(AT_LEAST_ONE) & set(props):
            count = {"type": "integer", "minimum": 1, "maximum": MAX_COUNT}
            required = field in defs[cls.__name__].get("required", ())
            props[field] = count if required else {"anyOf": [count, {"type": "null"}]}
        props["model"] = {"type": "string", "minLength": 1}
        if "n_predict" in props:
            props["n_predict"] = {"anyOf": [{"type": "integer", "minimum": -2, "maximum": MAX_COUNT}, {"type": "null"}]}
        if "cache_salt" in props:
            props["cache_salt"] = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}
        if "messages" in props and "messages" in defs[cls.__name__].get("required", ()):
            props["messages"]["minItems"] = 1
    return defs


def _errors(operation: dict, statuses: tuple[str, ...] = ("4XX", "5XX"), anthropic: bool = False) -> None:
    responses = operation.setdefault("responses", {})
    for status, answer in list(responses.items()):
        if status[0] in "45" and not _declared(answer):
            del responses[status]  # Litestar's own error bodies: ours is the envelope
    for status in statuses:
        responses[status] = {
            "description": f"An error, in the {'Anthropic' if anthropic else 'OpenAI'} error envelope",
            "content": {"application/json": {"schema": ANTHROPIC_ERROR if anthropic else ERROR}},
        }


def _declared(answer: dict) -> bool:
    """An error answer its handler declares with one of our Structs (/readyz's 503)."""
    schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
    return schema.get("$ref", "").startswith(REF)


def _json_body(ref: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF + ref}}}}


def _openapi_path(path: str) -> str:
    """A Litestar route path ({model:str}) as the document writes it ({model})."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


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
        '{"error": {"message", "type", "param", "code"}}.'
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    bodies = _admin_bodies(handlers)
    schemas.update(_components(list(bodies.values())))
    for cls in _requests():
        schemas[cls.__name__]["properties"]["model"]["enum"] = models
    paths = doc["paths"]
    for path, endpoint in ENDPOINTS.items():
        body = endpoint.cls.__name__
        answer: dict[str, dict] = {"application/json": {"schema": ANY_OBJECT}}
        if endpoint.form or "stream" in getattr(endpoint.cls, "__struct_fields__", ()):
            answer["text/event-stream"] = {"schema": SSE_EVENT}
        operation = path.strip("/").replace("/", "_") if path not in _OPERATION_IDS else _OPERATION_IDS[path]
        paths[path] = {
            "post": {
                "summary": _SUMMARIES[path],
                "operationId": operation,
                "requestBody": _form_body(models) if endpoint.form else _json_body(body),
                "responses": {
                    "200": {
                        "description": "The engine's answer, byte for byte (SSE when stream is true)",
                        "content": answer,
                    }
                },
            }
        }
    for path, item in paths.items():
        for op in item.values():
            _errors(op, anthropic=path.startswith("/v1/messages"))
    for path, cls in bodies.items():
        # State-changing admin calls are JSON, even with nothing to say ({}): no
        # cross-site "simple" request can send that content type.
        paths[_openapi_path(path)]["post"]["requestBody"] = _json_body(cls.__name__)
    _model_names(doc, models)
    return doc
