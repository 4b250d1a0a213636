"""The engines' tool endpoints: tokenize and detokenize (llama.cpp, vLLM), infill
(llama.cpp's fill-in-the-middle, what editor plugins send), rerank and score
(retrieval). What the appliance reads from their requests; the rest passes
through. Every one names its model, which routes it like any request.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from appliance.gateway.protocol import MAX_COUNT, Count, Name, NPredict

# A token id: engines index their vocabulary with 32-bit integers.
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: Name
    # llama.cpp reads "content", vLLM "prompt" (or "messages").
    content: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Any], msgspec.Meta(min_length=1)] | None = None
    add_special: bool | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: Name
    tokens: list[TokenId]


class InfillRequest(msgspec.Struct, kw_only=True):
    model: Name
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[Any] | None = None
    prompt: str = ""
    stream: bool = False
    max_tokens: Count | None = None
    n_predict: NPredict | None = None
    temperature: float | None = None


class RerankRequest(msgspec.Struct, kw_only=True):
    model: Name
    query: str
    # Strings, or objects with a "text" (vLLM, Cohere's v2 shape).
    documents: list[str | dict[str, Any]]
    top_n: Count | None = None
    request_id: str | None = None  # vLLM's pooling requests' id: refused (capabilities.check_fields)


class ScoreRequest(msgspec.Struct, kw_only=True):
    model: Name
    text_1: str | list[str]
    text_2: str | list[str]
    request_id: str | None = None  # vLLM's pooling requests' id: refused (capabilities.check_fields)
