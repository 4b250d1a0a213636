"""What each proxy endpoint is, and who may serve it.

An endpoint (``ENDPOINTS``: the paths clients call) has a request type, a
dialect (appliance/gateway/dialects.py), the task a model must be for, and how the
appliance meters and routes it. A model serves an endpoint when both

- its engine's adapter declares the endpoint (``adapter.endpoints``,
  engines/*.py; llama.cpp's rerank needs ``--reranking``, which its adapter
  adds for a model with the "rerank" task), and
- the model is for the endpoint's task (``[[models]] tasks``; default
  ``["chat"]``, plus ``"embed"`` with ``embeddings = true``).

Anything else is a 400 naming the endpoint and the model, before a replica is
started or a request queued. A provider serves the endpoints its ``apis`` name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import ENDPOINT_NAMES, TASKS, request_context, tasks_of
from appliance.errors import BadRequest, quoted
from appliance.fleet.engine_traits import engine_of, serves_tools
from appliance.gateway import media_urls
from appliance.gateway.api_audio import AudioRequest
from appliance.gateway.api_messages import CountTokensRequest, MessagesRequest, tool_choice_fields
from appliance.gateway.api_responses import ResponsesRequest, chat_format_fields
from appliance.gateway.api_tools import DetokenizeRequest, InfillRequest, RerankRequest, ScoreRequest, TokenizeRequest
from appliance.gateway.dialects import ANTHROPIC, AUDIO, LLAMACPP, OPENAI, RESPONSES, Dialect
from appliance.gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

if TYPE_CHECKING:
    from appliance.config import Config, ModelConfig

# What a model can be for: config.TASKS; "" (an endpoint's task): any model (tokenize, detokenize).


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # in metrics, audit rows, adapters' and providers' lists
    cls: type  # the request body's type (protocol.decode_request)
    task: str  # what the model must be for ("": any)
    dialect: Dialect = OPENAI
    generates: bool = True  # a key's budget reserves completion tokens for it
    view: bool | str = ""  # the prefix index's view of the body (fleet/prefix.engine_view); "": none
    length_field: str = "max_tokens"  # where a budget's completion cap is written ("": nowhere)
    engine_path: str = ""  # the engine's path for it ("": the path the client called)
    # Runs no inference (a tokenizer's work): audited and rate-limited, charged no tokens.
    free: bool = False
    # A multipart/form-data upload (appliance/gateway/api_audio.py), not a JSON body.
    form: bool = False
    # What it does, in the OpenAPI document (appliance/api/openapi.py builds its entry from
    # this row: the request body from cls, the errors from the dialect).
    summary: str = ""
    # Its operationId there ("": made from the path); set only where SDKs know another.
    operation_id: str = ""


_RERANK = Endpoint(
    "rerank",
    RerankRequest,
    "rerank",
    generates=False,
    engine_path="/v1/rerank",
    summary="Rerank documents against a query (models with the rerank task)",
)
_AUDIO = "(multipart; models with the transcribe task)"

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(
        "chat",
        ChatCompletionRequest,
        "chat",
        view=True,
        summary="Create a chat completion (proxied to a replica)",
        operation_id="ChatCompletion",
    ),
    "/v1/completions": Endpoint(
        "completions",
        CompletionRequest,
        "chat",
        view=False,
        summary="Create a completion (proxied to a replica)",
        operation_id="Completion",
    ),
    "/v1/embeddings": Endpoint(
        "embeddings",
        EmbeddingRequest,
        "embed",
        generates=False,
        summary="Create embeddings (models with embeddings = true)",
        operation_id="Embedding",
    ),
    "/v1/responses": Endpoint(
        "responses",
        ResponsesRequest,
        "chat",
        RESPONSES,
        view="responses",
        length_field="max_output_tokens",
        summary="Create a response (OpenAI Responses API)",
    ),
    "/v1/messages": Endpoint(
        "messages",
        MessagesRequest,
        "chat",
        ANTHROPIC,
        view="messages",
        summary="Create a message (Anthropic Messages API; x-api-key accepted)",
    ),
    "/v1/messages/count_tokens": Endpoint(
        "count_tokens",
        CountTokensRequest,
        "chat",
        ANTHROPIC,
        generates=False,
        free=True,
        summary="Count a message's input tokens (Anthropic Messages API)",
    ),
    "/tokenize": Endpoint(
        "tokenize", TokenizeRequest, "", generates=False, free=True, summary="Tokenize text with a model's tokenizer"
    ),
    "/detokenize": Endpoint(
        "detokenize", DetokenizeRequest, "", generates=False, free=True, summary="Turn token ids back into text"
    ),
    "/infill": Endpoint(
        "infill",
        InfillRequest,
        "chat",
        LLAMACPP,
        summary="Fill in the middle of code (llama.cpp's infill; models with FIM tokens)",
    ),
    "/v1/rerank": _RERANK,
    "/rerank": _RERANK,
    "/v2/rerank": _RERANK,
    "/v1/score": Endpoint(
        "score", ScoreRequest, "rerank", generates=False, summary="Score text pairs (models with the rerank task)"
    ),
    "/v1/audio/transcriptions": Endpoint(
        "transcriptions",
        AudioRequest,
        "transcribe",
        AUDIO,
        length_field="",
        form=True,
        summary=f"Transcribe audio {_AUDIO}",
    ),
    "/v1/audio/translations": Endpoint(
        "translations",
        AudioRequest,
        "transcribe",
        AUDIO,
        length_field="",
        form=True,
        summary=f"Translate audio into English text {_AUDIO}",
    ),
}

BY_NAME = {e.name: e for e in ENDPOINTS.values()}
# Every endpoint's name (what adapters and providers declare; config validates providers' lists).
ALL = frozenset(BY_NAME)
assert ALL == ENDPOINT_NAMES, "config.ENDPOINT_NAMES must name every endpoint of ENDPOINTS"


def check(path: str, endpoint: Endpoint, model: ModelConfig, stateful: bool = False) -> None:
    """A 400 naming the endpoint and the model, unless the model serves it (and,
    for a Responses request that needs state, its engine keeps responses)."""
    adapter = engine_of(model)
    code = "embeddings_not_supported" if endpoint.name == "embeddings" else "endpoint_not_supported"
    if endpoint.name not in adapter.endpoints:
        raise BadRequest(
            f"Model '{model.name}' runs on the {adapter.name} engine, which does not serve {path}",
            param="model",
            code=code,
        )
    tasks = tasks_of(model)
    if endpoint.task and endpoint.task not in tasks:
        raise BadRequest(
            f"Model '{model.name}' does not serve {path}: it is for {', '.join(tasks)} "
            f"(its tasks), not {endpoint.task}",
            param="model",
            code=code,
        )
    if stateful and not adapter.responses_store:
        raise BadRequest(
            f"Model '{model.name}' runs on the {adapter.name} engine, which keeps no responses: "
            "send store: false (and no previous_response_id or background), and the "
            "conversation's items in 'input'",
            param="store",
            code="responses_store_not_supported",
        )


def check_fields(cfg: Config, endpoint: Endpoint, model: ModelConfig, request: object) -> None:
    """A 400 naming the field, for what a request asks that the model's engine would not
    honour and answer as if it had: a forced tool call, an embedding's dimensions, a
    completion's echo, suffix or best_of; a background Response (never served); media
    by URL (an engine would fetch it: gateway/media_urls.py).
    (request: the endpoint's Struct, or its Facts: gateway/facts.py.)"""
    media = getattr(request, "media", ())
    if media:
        media_urls.check(media, cfg.server.media_url_prefixes)
    tool_choice = getattr(request, "tool_choice", None)
    if tool_choice is not None and forces_tool(endpoint, tool_choice):
        check_tools(cfg, model, tool_choice)
    if getattr(request, "dimensions", None) is not None:
        check_dimensions(model)
    if getattr(request, "echo", False):
        check_completion_field(model, "echo", "leave 'echo' out and prepend the prompt yourself")
    if getattr(request, "suffix", None):
        check_completion_field(model, "suffix", "leave 'suffix' out, or use llama.cpp's /infill for fill-in-the-middle")
    best_of = getattr(request, "best_of", None)
    if best_of is not None and best_of > 1:
        check_completion_field(model, "best_of", "leave 'best_of' out, or ask 'n' answers and pick one yourself")
    if getattr(request, "background", False):
        # vLLM answers a background Response at once, queued and without usage, and
        # generates it afterwards: out of the replica's slots, and with no answer left
        # to charge its tokens from (a retrieve is free), so a key's budget would not hold.
        raise BadRequest(
            "'background' Responses are not served: their tokens could not be charged nor their "
            "engine time counted; leave 'background' out (stream the answer instead)",
            param="background",
            code="background_not_supported",
        )
    if getattr(request, "names_its_id", False):
        # vLLM takes a body's request_id as its own id for the request, shared by every
        # key: a Response is stored under it (one key could overwrite another's), and two
        # requests naming the same id at once break each other (before vLLM PR #27987).
        raise BadRequest(
            "'request_id' is not accepted: it would name the engine's own id for the request, "
            "shared by every key; leave it out (send X-Request-Id to correlate logs)",
            param="request_id",
            code="request_id_not_allowed",
        )
    if blocks := getattr(request, "blocks", ()):
        check_blocks(model, blocks)
    length = getattr(request, "length", None)
    if length is not None and length[1] > request_context(model) and model.server != "openai":
        raise_too_long(model, *length)


def raise_too_long(model: ModelConfig, field: str, asked: int) -> None:
    """A completion length no answer can reach: prompt and answer share one request's
    context, so the engine would cut it anyway (llama.cpp) or refuse it (vLLM). Said
    before any engine, as OpenAI and Anthropic refuse a max_tokens over the model's
    own bound. (A commercial provider's model: its own bound, which the config does not know.)"""
    per_request = request_context(model)
    shared = f" (context_length {model.context_length} shared by parallel = {model.parallel} slots)"
    raise BadRequest(
        f"{field} is too large: {asked}; model '{model.name}' gives one request at most {per_request} tokens, "
        f"prompt and answer together{shared if per_request != model.context_length else ''}; "
        f"ask at most {per_request} less the prompt's tokens",
        param=field,
        code="context_length_exceeded",
    )


# The content blocks llama-server's Messages API reads (its Anthropic-to-chat
# conversion): it drops any other without a word (a document, a search result), and the
# model answers, and count_tokens counts, as if it had not been sent. (redacted_thinking
# is dropped too, but it is the model's own hidden reasoning: its answer does not need it.)
LLAMACPP_BLOCKS = frozenset({"text", "image", "thinking", "redacted_thinking", "tool_use", "tool_result"})


def check_blocks(model: ModelConfig, blocks: tuple[tuple[str, str], ...]) -> None:
    """A 400 naming a Messages content block (its type and where it is) that the model's
    engine would drop: llama.cpp reads only LLAMACPP_BLOCKS. vLLM, SGLang and an
    operator's server answer for themselves."""
    if engine_of(model).name != "llamacpp":
        return
    for kind, where in blocks:
        if kind not in LLAMACPP_BLOCKS:
            raise BadRequest(
                f"Model '{model.name}' runs on the llamacpp engine, which does not read "
                f"{quoted(kind)} content blocks ({where}): it would answer without them. Send "
                "the text in a text block (a document's or search result's text), or serve the "
                "model on vllm or sglang",
                param=where,
                code="content_block_not_supported",
            )


def forces_tool(endpoint: Endpoint, tool_choice: object) -> bool:
    """Whether tool_choice obliges the model to call a tool, in the endpoint's API: chat's
    "required" or a named function (any object), Responses' "required" or a named tool
    (an object other than allowed_tools in auto mode), Anthropic's {"type": "any"|"tool"}."""
    if endpoint.dialect is ANTHROPIC:
        return isinstance(tool_choice, dict) and tool_choice.get("type") in ("any", "tool")
    if endpoint.dialect is RESPONSES and isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        return tool_choice.get("mode") == "required"
    return tool_choice == "required" or isinstance(tool_choice, dict)


def check_tools(cfg: Config, model: ModelConfig, tool_choice: object) -> None:
    """A request that must call a tool (tool_choice "required" or a named function, or
    their forms in another API: ``forces_tool``) on a model whose chat template has no
    tools gets a 400: the engine would drop the tools and answer in words, which the
    client reads as the model refusing its tool."""
    if tool_choice != "required" and not isinstance(tool_choice, dict):
        return
    if serves_tools(cfg, model) is False:
        raise BadRequest(
            f"Model '{model.name}' cannot call tools: its chat template has no tool support, so "
            "a tool_choice that forces a tool call ('required', a named function or tool, or "
            "Anthropic's 'any') cannot be honoured; use a model whose template supports tools "
            "(or give llama.cpp one with --chat-template-file in its args)",
            param="tool_choice",
            code="tools_not_supported",
        )


# The engines that honour an embeddings request's `dimensions` (a matryoshka model's
# shorter vector): vLLM and SGLang; an operator's OpenAI-compatible server decides
# itself. llama.cpp ignores it and answers the model's whole width (576 where 8 were asked).
DIMENSIONS_HONOURED = frozenset({"vllm", "sglang", "openai"})


def check_dimensions(model: ModelConfig) -> None:
    """A 400 naming `dimensions` unless the model's engine honours it."""
    adapter = engine_of(model)
    if adapter.name not in DIMENSIONS_HONOURED:
        raise BadRequest(
            f"Model '{model.name}' runs on the {adapter.name} engine, which cannot shorten its "
            "embeddings: leave 'dimensions' out (and truncate the vectors yourself if the model "
            "was trained for it), or serve the model on vllm or sglang",
            param="dimensions",
            code="dimensions_not_supported",
        )


def check_completion_field(model: ModelConfig, field: str, instead: str) -> None:
    """A 400 naming a legacy completions field llama.cpp ignores: it answers without the
    prompt echoed, without the suffix, or with one sample where best_of asked the best of
    several, as if it had honoured them. vLLM, SGLang and an operator's server answer for
    themselves."""
    adapter = engine_of(model)
    if adapter.name == "llamacpp":
        raise BadRequest(
            f"Model '{model.name}' runs on the llamacpp engine, which ignores '{field}' on "
            f"/v1/completions: {instead}, or serve the model on vllm or sglang",
            param=field,
            code=f"{field}_not_supported",
        )


def engine_fields(endpoint: Endpoint, model: ModelConfig, body: bytes) -> dict[str, Any]:
    """Fields the model's engine needs in a request's body to honour what the API asks:
    a Responses request's structured output, told to llama-server in chat's words; a
    Messages request's tool_choice "none" or a named tool, in the tools llama-server
    is given."""
    if not body or engine_of(model).name != "llamacpp":
        return {}
    if endpoint.dialect is RESPONSES:
        return chat_format_fields(body)
    if endpoint.name == "messages":
        return tool_choice_fields(body)
    return {}


def keeps_responses(model: ModelConfig) -> bool:
    """Whether the model's engine stores Responses (store, previous_response_id)."""
    return engine_of(model).responses_store


def serves(model: ModelConfig, name: str) -> bool:
    """Whether the model serves the endpoint of this name (a fallback's check)."""
    endpoint = BY_NAME[name]
    return endpoint.name in engine_of(model).endpoints and (not endpoint.task or endpoint.task in tasks_of(model))


__all__ = [
    "ALL",
    "BY_NAME",
    "ENDPOINTS",
    "TASKS",
    "Endpoint",
    "check",
    "check_blocks",
    "check_completion_field",
    "check_dimensions",
    "check_fields",
    "check_tools",
    "engine_fields",
    "forces_tool",
    "keeps_responses",
    "serves",
    "tasks_of",
]
