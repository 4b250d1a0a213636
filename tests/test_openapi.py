"""The OpenAPI document as an SDK generator reads it: every proxy endpoint, with the request
body its Struct decodes, the ranges the appliance enforces, and its API's error envelope;
built in process from the app's handlers (the daemon serves the same at /openapi.json)."""

from __future__ import annotations

import json

import msgspec
import pytest

from appliance.api.app import ROUTE_HANDLERS
from appliance.api.openapi import build
from appliance.errors import ApplianceError
from appliance.gateway.capabilities import ENDPOINTS
from appliance.gateway.dialects import ANTHROPIC
from appliance.gateway.protocol import MAX_COUNT, decode_request

MODELS = ["chat-a", "embed-b"]


@pytest.fixture(scope="module")
def doc() -> dict:
    return build(ROUTE_HANDLERS, MODELS, "test")


def _schema(doc: dict, ref: str) -> dict:
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_every_proxy_endpoint_is_documented_from_its_row(doc, path):
    endpoint = ENDPOINTS[path]
    op = doc["paths"][path]["post"]
    assert endpoint.summary and endpoint.summary in op["summary"]
    content = op["requestBody"]["content"]
    if endpoint.form:
        form = content["multipart/form-data"]["schema"]
        assert form["properties"]["model"]["enum"] == MODELS and {"model", "file"} <= set(form["required"])
    else:
        body = _schema(doc, content["application/json"]["schema"]["$ref"])
        assert body["title"] == endpoint.cls.__name__
        assert set(body["properties"]) == set(endpoint.cls.__struct_fields__)
        assert body["properties"]["model"]["enum"] == MODELS
    for status in ("4XX", "5XX"):
        ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/" + endpoint.dialect.error_envelope.__name__)


def test_operation_ids_are_unique_and_keep_the_ones_sdks_know(doc):
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert doc["paths"]["/v1/chat/completions"]["post"]["operationId"] == "ChatCompletion"
    assert doc["paths"]["/v2/rerank"]["post"]["summary"].startswith("Alias of /v1/rerank")


def test_the_anthropic_paths_document_anthropics_envelope_and_the_others_openais(doc):
    anthropic = _schema(doc, doc["paths"]["/v1/messages"]["post"]["responses"]["4XX"]["content"]
                        ["application/json"]["schema"]["$ref"])
    assert anthropic["properties"]["type"] == {"enum": ["error"]} and set(anthropic["required"]) == {"type", "error"}
    # What the document says is what an error on the path is.
    err = json.loads(ANTHROPIC.envelope(ApplianceError("boom")))
    assert err["type"] == "error" and set(err["error"]) == {"type", "message"}
    for path in ("/v1/chat/completions", "/admin/status", "/v1/models"):
        for op in doc["paths"][path].values():
            assert op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")


def _ranged_fields(doc: dict):
    """(Struct, field, lowest allowed, highest allowed) for every documented integer range."""
    for path, endpoint in ENDPOINTS.items():
        if endpoint.form:
            continue
        schema = doc["components"]["schemas"][endpoint.cls.__name__]
        for field, prop in schema["properties"].items():
            for option in prop.get("anyOf", [prop]):
                if option.get("type") == "integer" and "minimum" in option:
                    yield endpoint.cls, field, option["minimum"], option["maximum"]


def test_the_documented_ranges_are_the_ones_the_appliance_enforces(doc):
    ranged = {(cls.__name__, field): (low, high) for cls, field, low, high in _ranged_fields(doc)}
    assert ranged[("ChatCompletionRequest", "max_tokens")] == (1, MAX_COUNT)
    assert ranged[("ChatCompletionRequest", "n_predict")] == (-2, MAX_COUNT)
    assert ranged[("MessagesRequest", "max_tokens")] == (1, MAX_COUNT)
    assert ranged[("RerankRequest", "top_n")] == (1, MAX_COUNT)
    for cls, field, low, high in _ranged_fields(doc):
        required = _minimal(cls)
        for bad in (low - 1, high + 1):
            with pytest.raises(ApplianceError) as caught:
                decode_request(msgspec.json.encode({**required, field: bad}), cls)
            assert caught.value.status == 400 and caught.value.param == field
        decode_request(msgspec.json.encode({**required, field: low}), cls)


def _minimal(cls: type) -> dict:
    """A valid body of the endpoint's type with only its required fields."""
    values = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "p", "input": "i",
              "query": "q", "documents": ["d"], "tokens": [1], "text_1": "a", "text_2": "b", "max_tokens": 4}
    return {f.encode_name: values[f.encode_name] for f in msgspec.inspect.type_info(cls).fields if f.required}
