"""Engine errors an operator can fix, said in the config's words.

An engine's own 400 for a prompt longer than a request may be names its own numbers
(llama-server: "request (631 tokens) exceeds the available context size (256 tokens)"),
not the knobs that set them: context_length is shared by `parallel` slots, so a default
model gives each request a quarter of it. Such an answer becomes the API's own 400,
``context_length_exceeded`` (OpenAI's code for it), naming the model's fields and the
numbers. An image (audio, video) part sent to a model that cannot read it is the
request's 400, ``unsupported_input``, not llama-server's 500. Any other engine answer
is relayed as it is. Only an error answer is ever looked at, and only its bytes
searched before any parsing: the hot path pays nothing.
"""

from __future__ import annotations

import msgspec

from appliance.config import ModelConfig, request_context
from appliance.errors import BadRequest

LLAMACPP_TOO_LONG = b"exceed_context_size_error"
# llama-server's 500 for an image, audio or video part a model without a multimodal
# projector cannot read: the request's fault, so a 400 (a 502 the SDKs would retry).
LLAMACPP_NO_MEDIA = b"input is not supported - hint: if this is unexpected, you may need to provide the mmproj"


class _Detail(msgspec.Struct):
    n_prompt_tokens: int | None = None
    n_ctx: int | None = None


class _LlamaError(msgspec.Struct):
    error: _Detail


def explain(model: ModelConfig, status: int, body: bytes) -> BadRequest | None:
    """The API's error for an engine answer the operator can fix, else None (relay it)."""
    if status == 500 and LLAMACPP_NO_MEDIA in body:
        return _no_media(model, body)
    if status != 400 or LLAMACPP_TOO_LONG not in body:
        return None
    try:
        detail = msgspec.json.decode(body, type=_LlamaError).error
    except msgspec.MsgspecError:
        detail = _Detail()
    per_request = detail.n_ctx or request_context(model)
    asked = f"({detail.n_prompt_tokens} tokens) " if detail.n_prompt_tokens else ""
    return BadRequest(
        f"the request {asked}exceeds the context one request gets on model '{model.name}': "
        f"{per_request} tokens, prompt and answer together (context_length {model.context_length} shared "
        f"by parallel = {model.parallel} slots); shorten it, or raise the model's context_per_request "
        "(or context_length), or lower its parallel",
        param="messages",
        code="context_length_exceeded",
    )


def _no_media(model: ModelConfig, body: bytes) -> BadRequest:
    kind = next((k for k in ("image", "audio", "video") if f"{k} input".encode() in body), "media")
    return BadRequest(
        f"Model '{model.name}' cannot read {kind} input: it is served without a multimodal projector; "
        f"send text only, or use a model that reads {kind} (llama.cpp: its mmproj file in the model's args)",
        param="messages",
        code="unsupported_input",
    )
