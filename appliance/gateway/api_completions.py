"""The legacy Completions API (POST /v1/completions) as the openai SDK reads it,
whatever the engine answered: an id ``cmpl-...`` and, when ``logprobs`` was
asked, the legacy logprobs object (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``).

llama-server answers a completion with a chat completion's id (``chatcmpl-...``)
and its logprobs in chat's shape (``{"content": [{"token", "logprob",
"top_logprobs": [...]}]}``), leaving the legacy fields null: the SDK's
``choice.logprobs.tokens`` was None. A whole answer is rewritten here (this
process's relay and a worker's alike: relay.charged); a stream with logprobs on
llama.cpp is refused before it starts (capabilities.check_fields), as its events
would need the same rewrite one by one.
"""

from __future__ import annotations

from typing import Any

from appliance.gateway.sse import decode_object, encode

_CHAT_ID = b'"chatcmpl-'
_COMPLETION = b'"text_completion"'


def needs_fix(data: bytes) -> bool:
    """Whether a whole answer is a completion in chat's words (a few substring scans:
    every other answer goes on untouched)."""
    return _COMPLETION in data and (_CHAT_ID in data or b'"content":[' in data)


def _prompt_length(body: bytes) -> int:
    """Where the completion's text starts: after a single prompt string (text_offset
    counts from the prompt's start, as OpenAI's legacy API does); 0 otherwise."""
    prompt = (decode_object(body) or {}).get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return len(prompt) if isinstance(prompt, str) else 0


def legacy_logprobs(chat: dict[str, Any], start: int) -> dict[str, Any]:
    """Chat's logprobs (``content``: one entry per token) as the legacy object."""
    tokens: list[str] = []
    token_logprobs: list[Any] = []
    top_logprobs: list[dict[str, Any]] = []
    text_offset: list[int] = []
    offset = start
    for entry in chat.get("content") or ():
        token = str(entry.get("token", ""))
        tokens.append(token)
        token_logprobs.append(entry.get("logprob"))
        top_logprobs.append({str(t.get("token", "")): t.get("logprob") for t in entry.get("top_logprobs") or ()})
        text_offset.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def whole_answer(body: bytes, data: bytes) -> bytes:
    """A completion with a completion's id and the legacy logprobs object."""
    answer = decode_object(data)
    if answer is None or answer.get("object") != "text_completion":
        return data
    rid = answer.get("id")
    if isinstance(rid, str) and rid.startswith("chatcmpl-"):
        answer["id"] = "cmpl-" + rid.removeprefix("chatcmpl-")
    start = None
    for choice in answer.get("choices") or ():
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if isinstance(logprobs, dict) and "content" in logprobs and logprobs.get("tokens") is None:
            start = _prompt_length(body) if start is None else start
            choice["logprobs"] = legacy_logprobs(logprobs, start)
    return encode(answer)


__all__ = ["legacy_logprobs", "needs_fix", "whole_answer"]
