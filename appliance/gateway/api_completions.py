"""The legacy Completions API (POST /v1/completions) as the openai SDK reads it,
whatever the engine answered: an id ``cmpl-...`` and, when ``logprobs`` was
asked, the legacy logprobs object (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``).

llama-server answers a completion with a chat completion's id (``chatcmpl-...``)
and its logprobs in chat's shape (``{"content": [{"token", "logprob",
"top_logprobs": [...]}]}``), leaving the legacy fields null: the SDK's
``choice.logprobs.tokens`` was None. A whole answer is rewritten here (this
process's relay and a worker's alike: relay.charged), and so is a stream, event by
event (``CompletionEvents``, from relay._pump, which both run): an engine whose first
event needs neither fix is passed on untouched from there on.
"""

from __future__ import annotations

from typing import Any

from appliance.gateway.sse import EventRewriter, decode_object, encode

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


def _chat_shaped(choice: object) -> dict[str, Any] | None:
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    if isinstance(logprobs, dict) and "content" in logprobs and logprobs.get("tokens") is None:
        return logprobs
    return None


def _fix_id(answer: dict[str, Any]) -> bool:
    rid = answer.get("id")
    if isinstance(rid, str) and rid.startswith("chatcmpl-"):
        answer["id"] = "cmpl-" + rid.removeprefix("chatcmpl-")
        return True
    return False


def whole_answer(body: bytes, data: bytes) -> bytes:
    """A completion with a completion's id and the legacy logprobs object."""
    answer = decode_object(data)
    if answer is None or answer.get("object") != "text_completion":
        return data
    _fix_id(answer)
    start = None
    for choice in answer.get("choices") or ():
        if (logprobs := _chat_shaped(choice)) is not None:
            start = _prompt_length(body) if start is None else start
            choice["logprobs"] = legacy_logprobs(logprobs, start)
    return encode(answer)


class CompletionEvents(EventRewriter):
    """A completion's stream with a completion's id and the legacy logprobs in each
    chunk, ``text_offset`` running on from chunk to chunk (each choice its own)."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body
        self._offsets: dict[int, int] = {}  # choice index -> where its next token starts
        self._start: int | None = None

    def fix(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        fixed = _fix_id(data)
        for choice in data.get("choices") or ():
            if (logprobs := _chat_shaped(choice)) is None:
                continue
            fixed = True
            if self._start is None:
                self._start = _prompt_length(self._body)
            index = choice.get("index", 0) if isinstance(choice.get("index"), int) else 0
            legacy = choice["logprobs"] = legacy_logprobs(logprobs, self._offsets.get(index, self._start))
            if legacy["tokens"]:
                self._offsets[index] = legacy["text_offset"][-1] + len(legacy["tokens"][-1])
        if not fixed and self._start is None and self._offsets == {}:
            self.passing = True  # an engine that speaks the legacy API: nothing to fix
        return [data]


__all__ = ["CompletionEvents", "legacy_logprobs", "needs_fix", "whole_answer"]
