"""A fake OpenAI-compatible engine, run as a real subprocess by tests and benchmarks.

    python tests/fake_engine.py --port 9000 [--latency 0.01] [--chunks 5]
        [--chunk-delay 0.01] [--stamp-chunks] [--slow-start 2] [--reuse-port] [--crash-after 3] [--ignore-sigterm]
        [--embeddings] [--fail-status 500 [--fail-from 2]] [--cache-report] [--no-usage]

It answers /v1/chat/completions, /v1/completions (both with stream: true as SSE),
/v1/embeddings, /v1/responses and /v1/messages (streamed as their own events),
/v1/messages/count_tokens, /tokenize, /detokenize, /infill (llama-server's shape),
/v1/rerank, /v1/score, /v1/audio/transcriptions and /translations (vLLM's multipart
shapes; GET/DELETE /v1/responses/{id} and POST .../cancel for stored Responses),
/v1/models and /health, and reports what it saw at /fake/stats
(requests, streams started, completed and cancelled by the client, unary answers
completed and cancelled by the client, the last body).
POST /fake/latency?seconds=S changes --latency while it runs (the chaos tests' slow replica);
POST /fake/pacing?seconds=S changes --chunk-delay alone (bench/gateway_overhead.py --stream).
--stamp-chunks puts "sent_at=T" in each streamed chat/completion chunk's text, T the engine's
time.monotonic() as it writes the chunk, so a client on the same machine measures the time
the chunk spent between engine and client (bench/overhead_stream.py).
As vLLM it keeps its LoRA adapters (--lora-modules, then /v1/load_lora_adapter and
/v1/unload_lora_adapter with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) in /fake/stats' "loras".

Like llama-server, the completion's length is n_predict, else max_tokens, else
max_completion_tokens (a negative n_predict: --chunks). --cache-report counts the
prompt's words as its tokens and keeps a prefix cache per cache_salt: answers say how
many leading words were cached, in usage.prompt_tokens_details.cached_tokens and
llama-server's timings (cache_n, prompt_n). --no-usage leaves usage out of every
answer (an engine that ignores stream_options). --tool-calls N answers a request that
offers tools with N calls (the k-th of tools[k % len(tools)]), streamed as llama-server
streams them: chat deltas (index, id, type, name, empty arguments, then argument pieces,
finish_reason tool_calls), Messages tool_use blocks (input_json_delta pieces, no input
at the start, every block stopped at the end) and Responses function_call items (no
numbers, no arguments.done, no item id: events name an item by its call_id).

It takes its API key the way the engine it plays does: $ENGINE_API_KEY or
--api-key-file (a server = "openai" command), $VLLM_API_KEY (--as-engine vllm,
which also listens on --uds), the "api-key" of its --config file (--as-engine
sglang); with a key, every path but /health answers 401 without it.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import hashlib
import hmac
import json
import os
import signal
import sys
import time

from aiohttp import web

STATS = {"requests": 0, "streams_started": 0, "streams_completed": 0, "streams_cancelled": 0,
         "unary_completed": 0, "unary_cancelled": 0, "last_body": None, "pid": os.getpid()}
CACHE: dict[str, list[list[str]]] = {}  # cache_salt -> prompts seen (as words), for --cache-report
STORED: dict[str, dict] = {}  # Responses kept like vLLM's store (store unless false), by id


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--as-engine", choices=["vllm", "sglang", "llamacpp"], default=None,
                   help="accept that engine's argv (unknown flags ignored, recorded in /fake/stats) "
                        "and speak its /metrics, and vLLM's /sleep, /wake_up, /is_sleeping")
    p.add_argument("--served-model-name", dest="model", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--uds", default="", help="listen on this unix socket instead (vLLM's flag)")
    p.add_argument("--reuse-port", action="store_true",
                   help="set SO_REUSEPORT on its listening socket, as vLLM's API server does")
    p.add_argument("--api-key-file", default="", help="the API key, in this file (llama-server's flag)")
    p.add_argument("--config", default="", help="a JSON/YAML file whose 'api-key' is the key (SGLang's)")
    p.add_argument("--model", dest="model", default=None)
    p.add_argument("--latency", type=float, default=0.0, help="seconds before a unary answer")
    p.add_argument("--latency-from", type=int, default=1,
                   help="first request number that gets --latency (2: the readiness probe is quick)")
    p.add_argument("--chunks", type=int, default=3, help="content chunks in a streamed answer")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    p.add_argument("--stamp-chunks", action="store_true",
                   help="put sent_at=time.monotonic() in each streamed chunk's text as it is written")
    p.add_argument("--slow-start", type=float, default=0.0, help="seconds before listening")
    p.add_argument("--sleep-delay", type=float, default=0.0, help="seconds vLLM's /sleep takes")
    p.add_argument("--wake-delay", type=float, default=0.0, help="seconds vLLM's /wake_up takes")
    p.add_argument("--stamp-dir", default="",
                   help="append to DIR/<pid> when it starts serving, and the start and end of each "
                        "sleep, wake and 1-token answer (time.monotonic: the engine's own times, for "
                        "bench/market.py)")
    p.add_argument("--crash-after", type=int, default=0, help="exit(3) after answering N requests")
    p.add_argument("--die-mid-stream", type=int, default=0,
                   help="exit(3) after sending this many chunks of a streamed answer")
    p.add_argument("--stall-mid-stream", type=int, default=0,
                   help="fall silent (connection open) after this many chunks of a streamed chat answer")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings")
    p.add_argument("--fail-status", type=int, default=0,
                   help="answer completions with this status (from request --fail-from on)")
    p.add_argument("--fail-from", type=int, default=2,
                   help="first request number that fails (default 2: the readiness probe passes)")
    p.add_argument("--cache-report", action="store_true",
                   help="report cached prompt tokens like llama-server (cached_tokens, timings)")
    p.add_argument("--no-usage", action="store_true", help="never report usage")
    p.add_argument("--pad-bytes", type=int, default=0,
                   help="a unary completion's answer (and a --fail-status error's message) carries this many more bytes")
    p.add_argument("--no-completions", action="store_true", help="no /v1/completions (chat-only)")
    p.add_argument("--tool-calls", type=int, default=0,
                   help="answer a chat, Messages or Responses request that offers tools (tool_choice not "
                        "'none') with this many calls of them, streamed as llama-server streams them")
    args, unknown = p.parse_known_args(argv)
    if unknown and not args.as_engine:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not (args.port or args.uds):
        p.error("--port or --uds is required")
    args.api_key = api_key(args)
    args.model = args.model or "fake-model"
    STATS["argv"] = argv
    STATS["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return args


def api_key(args: argparse.Namespace) -> str:
    if args.api_key_file:
        with open(args.api_key_file) as f:
            return f.read().strip()
    if args.config:
        with open(args.config) as f:
            return json.load(f)["api-key"]
    return os.environ.get("VLLM_API_KEY" if args.as_engine == "vllm" else "ENGINE_API_KEY", "")


def _usage(prompt_tokens: int, completion_tokens: int, cached: int | None = None) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _length(body: dict, default: int) -> int:
    """The completion's length as llama-server reads it."""
    n_predict = body.get("n_predict")
    if n_predict is not None:
        return default if n_predict < 0 else n_predict
    return (body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
            or default)


def _prompt_words(body: dict) -> list[str]:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"])
    else:
        text = str(body.get("prompt", body.get("input", "")))
    return text.split()


def _cached(body: dict) -> tuple[int, int]:
    """(prompt tokens, how many leading ones an earlier prompt of the same cache salt shared)."""
    words = _prompt_words(body)
    seen = CACHE.setdefault(str(body.get("cache_salt", "")), [])
    best = 0
    for earlier in seen:
        n = 0
        while n < min(len(words), len(earlier)) and words[n] == earlier[n]:
            n += 1
        best = max(best, n)
    seen.append(words)
    return len(words), best


def _responses_events(answer: dict, n: int) -> list[tuple[str, dict]]:
    """llama-server's events: unnumbered, each item's done events just before the end."""
    head = {k: v for k, v in answer.items() if k not in ("output", "usage")}
    events = [("response.created", {"type": "response.created", "response": {**head, "status": "in_progress"}})]
    events += [("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_fake",
                                               "output_index": 0, "content_index": 0, "delta": f"tok{i} "})
               for i in range(n)]
    for item in answer["output"]:
        if item["type"] == "message":
            part = item["content"][0]
            events += [("response.output_text.done", {"type": "response.output_text.done", "item_id": item["id"],
                                                      "text": part["text"]}),
                       ("response.content_part.done", {"type": "response.content_part.done",
                                                       "item_id": item["id"], "part": part})]
        events.append(("response.output_item.done", {"type": "response.output_item.done", "item": item}))
    return events + [("response.completed", {"type": "response.completed", "response": answer})]


def _messages_events(answer: dict, n: int) -> list[tuple[str, dict]]:
    usage = answer.get("usage")
    start = {**answer, "content": [], "stop_reason": None}
    if usage is not None:
        start["usage"] = {**usage, "output_tokens": 1}
    events = [("message_start", {"type": "message_start", "message": start}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": f"tok{i} "}}) for i in range(n)]
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if usage is not None:
        delta["usage"] = {"output_tokens": usage["output_tokens"]}
    return events + [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                     ("message_delta", delta), ("message_stop", {"type": "message_stop"})]


ARG_PIECES = ['{"city', '": "Pa', 'ris", "', 'call": ', '{k}}']  # one call's arguments, as the engine streams them


def _tool_calls(body: dict, count: int) -> list[tuple[str, str, list[str]]]:
    """(id, name, argument pieces) of each call the answer makes: none unless tools are offered."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not count or not tools or choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return []
    names = [t.get("name") or (t.get("function") or {}).get("name") for t in tools]
    return [(f"call_fake{k}", names[k % len(names)], [piece.replace("{k}", str(k)) for piece in ARG_PIECES])
            for k in range(count)]


def _chat_tool_chunks(calls: list[tuple[str, str, list[str]]]) -> list[dict]:
    """llama-server's (and vLLM's) chat deltas: each call announced whole with empty
    arguments, then its arguments in pieces; a last chunk says tool_calls."""
    chunks = [{"role": "assistant", "content": None,
               "tool_calls": [{"index": 0, "id": calls[0][0], "type": "function",
                               "function": {"name": calls[0][1], "arguments": ""}}]}]
    for k, (call_id, name, pieces) in enumerate(calls):
        if k:
            chunks.append({"tool_calls": [{"index": k, "id": call_id, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
        chunks += [{"tool_calls": [{"index": k, "function": {"arguments": piece}}]} for piece in pieces]
    return [{"index": 0, "delta": delta, "finish_reason": None} for delta in chunks] + [
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]


def _messages_tool_events(answer: dict, calls: list[tuple[str, str, list[str]]]) -> list[tuple[str, dict]]:
    """llama-server's Messages stream of tool calls: a tool_use block's start without input."""
    usage = answer.get("usage")
    start = {**answer, "content": [], "stop_reason": None}
    if usage is not None:
        start["usage"] = {**usage, "output_tokens": 0}
    events = [("message_start", {"type": "message_start", "message": start})]
    for k, (call_id, name, pieces) in enumerate(calls):
        events.append(("content_block_start", {"type": "content_block_start", "index": k,
                                               "content_block": {"type": "tool_use", "id": call_id, "name": name}}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": k,
                                            "delta": {"type": "input_json_delta", "partial_json": piece}})
                   for piece in pieces]
    # llama-server stops every block at the end, after the last call's deltas.
    events += [("content_block_stop", {"type": "content_block_stop", "index": k}) for k in range(len(calls))]
    delta = {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}}
    if usage is not None:
        delta["usage"] = {"output_tokens": usage["output_tokens"]}
    return events + [("message_delta", delta), ("message_stop", {"type": "message_stop"})]


def _responses_tool_events(answer: dict, calls: list[tuple[str, str, list[str]]]) -> list[tuple[str, dict]]:
    """llama-server's Responses stream of function calls: items added with empty
    arguments, argument deltas, each item done at the end; unnumbered, and an item
    has no id: its events name it by its call_id."""
    head = {k: v for k, v in answer.items() if k not in ("output", "usage")}
    events = [("response.created", {"type": "response.created", "response": {**head, "status": "in_progress"}})]
    for (call_id, name, pieces), item in zip(calls, answer["output"], strict=True):
        events.append(("response.output_item.added", {"type": "response.output_item.added",
                                                      "item": {**item, "arguments": "", "status": "in_progress"}}))
        events += [("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                               "item_id": item["call_id"], "delta": piece})
                   for piece in pieces]
    events += [("response.output_item.done", {"type": "response.output_item.done", "item": item})
               for item in answer["output"]]
    return events + [("response.completed", {"type": "response.completed", "response": answer})]


def make_app(args: argparse.Namespace) -> web.Application:
    async def counted(request: web.Request) -> dict:
        STATS["requests"] += 1
        body = await request.json()
        STATS["last_body"] = body
        STATS["last_request_id"] = request.headers.get("X-Request-Id")  # the engine's own id for it (vLLM)
        # What a tracing engine would continue (tests/test_tracing.py).
        STATS["last_trace_headers"] = {k: v for k, v in request.headers.items()
                                       if k.lower() in ("traceparent", "tracestate")}
        return body

    def maybe_crash() -> None:
        if args.crash_after and STATS["requests"] >= args.crash_after:
            asyncio.get_running_loop().call_later(0.05, os._exit, 3)

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await counted(request)
        chat = request.path.endswith("/chat/completions")
        if args.fail_status and STATS["requests"] >= args.fail_from:
            return web.json_response({"error": {"message": "fake failure" + " padding" * (args.pad_bytes // 8),
                                                "type": "server_error"}}, status=args.fail_status)
        n = max(1, min(args.chunks, _length(body, args.chunks)))
        width = max(1, int(body.get("n") or 1))  # choices, each n tokens long
        prompt, cached = _cached(body) if args.cache_report else (5, None)
        STATS["last_cached"] = cached
        extra = {}
        if cached is not None:
            extra["timings"] = {"cache_n": cached, "prompt_n": prompt - cached, "prompt_ms": 1.0,
                                "predicted_n": n, "predicted_ms": 1.0}
        calls = _tool_calls(body, args.tool_calls) if chat else []
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage")) and not args.no_usage
            if calls:
                return await tool_stream(request, calls, usage, prompt)
            return await stream(request, chat, n, usage, prompt, cached, extra, width)
        began = time.monotonic()
        try:
            if args.latency and STATS["requests"] >= args.latency_from:
                await asyncio.sleep(args.latency)
        except asyncio.CancelledError:  # the client went away: the "slot" is freed
            STATS["unary_cancelled"] += 1
            raise
        if body.get("max_tokens") == 1:  # a readiness probe: the engine's own answer time
            stamp(args, "probe", began, time.monotonic())
        text = " ".join(f"tok{i}" for i in range(n))
        choices = [{"index": k, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                   if chat else {"index": k, "text": text, "finish_reason": "stop"} for k in range(width)]
        if calls:
            choices = [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": i, "type": "function", "function": {"name": name, "arguments": "".join(p)}}
                               for i, name, p in calls]}}]
        maybe_crash()
        STATS["unary_completed"] += 1
        answer = {"id": "fake-1", "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": body.get("model", args.model), "choices": choices}
        if not args.no_usage:
            answer["usage"] = _usage(prompt, n * width, cached)
        if args.pad_bytes:
            answer["padding"] = "x" * args.pad_bytes
        return web.json_response({**answer, **extra})

    async def stream(request: web.Request, chat: bool, n: int, usage: bool = False, prompt: int = 5,
                     cached: int | None = None, extra: dict | None = None, width: int = 1) -> web.StreamResponse:
        """n tokens for each of width choices: one event per token per choice (vLLM's way)."""
        STATS["streams_started"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(n):
                if args.chunk_delay:
                    await asyncio.sleep(args.chunk_delay)
                elif i % 64 == 63:
                    # A write waits only once the client stops reading: a long answer to a fast
                    # reader would hold the loop, and /health with it, for its whole generation
                    # (seconds under load: the supervisor's probes fail and it restarts the engine
                    # mid-answer). A real engine answers /health while it generates.
                    await asyncio.sleep(0)
                # --stamp-chunks: in the text, which every proxy relays, however it re-encodes the chunk.
                text = f"tok{i} sent_at={time.monotonic():.6f} " if args.stamp_chunks else f"tok{i} "
                for k in range(width):
                    delta = ({"index": k, "delta": {"content": text}, "finish_reason": None}
                             if chat else {"index": k, "text": text, "finish_reason": None})
                    chunk = {"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": int(time.time()), "model": args.model, "choices": [delta]}
                    if i == n - 1 and k == width - 1 and extra:  # llama-server: timings on the last chunk
                        chunk.update(extra)
                    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if args.die_mid_stream and i + 1 >= args.die_mid_stream:
                    os._exit(3)
                if args.stall_mid_stream and i + 1 >= args.stall_mid_stream:
                    await asyncio.sleep(3600)  # silent, connection open, until the client leaves
            if usage:  # stream_options.include_usage: one more event, no choices, the usage
                last = {"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()), "model": args.model, "choices": [],
                        "usage": _usage(prompt, n * width, cached)}
                await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            STATS["streams_cancelled"] += 1
            raise
        STATS["streams_completed"] += 1
        maybe_crash()
        return resp

    async def tool_stream(request: web.Request, calls: list, usage: bool, prompt: int) -> web.StreamResponse:
        """A chat answer that is tool calls, streamed (then usage when asked, then [DONE])."""
        STATS["streams_started"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        head = {"id": "fake-1", "object": "chat.completion.chunk", "created": int(time.time()), "model": args.model}
        tokens = sum(len(pieces) + 1 for _, _, pieces in calls)
        chunks = [{**head, "choices": [choice]} for choice in _chat_tool_chunks(calls)]
        if usage:
            chunks.append({**head, "choices": [], "usage": _usage(prompt, tokens)})
        try:
            for chunk in chunks:
                if args.chunk_delay:
                    await asyncio.sleep(args.chunk_delay)
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            STATS["streams_cancelled"] += 1
            raise
        STATS["streams_completed"] += 1
        return resp

    async def dialect(request: web.Request) -> web.StreamResponse:
        """/v1/responses and /v1/messages: the Responses and Anthropic Messages shapes."""
        body = await counted(request)
        responses = request.path == "/v1/responses"
        if args.fail_status and STATS["requests"] >= args.fail_from:
            return web.json_response({"error": {"message": "fake failure", "type": "server_error"}},
                                     status=args.fail_status)
        n = max(1, min(args.chunks, _length(body, args.chunks)))
        prompt, cached = _cached(body) if args.cache_report else (5, None)
        text = " ".join(f"tok{i}" for i in range(n))
        previous = body.get("previous_response_id") if responses else None
        if previous is not None and previous not in STORED:
            return web.json_response({"error": {"message": f"Response {previous} not found",
                                                 "type": "invalid_request_error"}}, status=404)
        if responses:
            usage = {"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n}
            if cached is not None:
                usage["input_tokens_details"] = {"cached_tokens": cached}
            answer = {"id": f"resp_{os.getpid()}_{STATS['requests']}", "object": "response", "status": "completed",
                      "previous_response_id": previous,
                      "model": body.get("model", args.model), "usage": usage,
                      "output": [{"type": "message", "id": "msg_fake", "role": "assistant", "status": "completed",
                                  "content": [{"type": "output_text", "text": text, "annotations": []}]}]}
        else:
            usage = {"input_tokens": prompt - (cached or 0), "output_tokens": n}
            if cached is not None:
                usage["cache_read_input_tokens"] = cached
            answer = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model", args.model),
                      "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                      "stop_sequence": None, "usage": usage}
        calls = _tool_calls(body, args.tool_calls)
        if calls and responses:
            answer["output"] = [{"type": "function_call", "call_id": f"fc_{i}", "name": name,
                                 "arguments": "".join(p), "status": "completed"} for i, name, p in calls]
        elif calls:
            answer["content"] = [{"type": "tool_use", "id": i, "name": name, "input": json.loads("".join(p))}
                                 for i, name, p in calls]
            answer["stop_reason"] = "tool_use"
        if args.no_usage:
            answer.pop("usage")
        if responses and body.get("store", True) is not False:
            STORED[answer["id"]] = answer
        if not body.get("stream"):
            STATS["unary_completed"] += 1
            return web.json_response(answer)
        if calls:
            events = (_responses_tool_events if responses else _messages_tool_events)(answer, calls)
        else:
            events = _responses_events(answer, n) if responses else _messages_events(answer, n)
        return await send_events(request, events)

    async def send_events(request: web.Request, events: list[tuple[str, dict]]) -> web.StreamResponse:
        STATS["streams_started"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, (name, data) in enumerate(events):
                if args.chunk_delay:
                    await asyncio.sleep(args.chunk_delay)
                await resp.write(f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
                if args.die_mid_stream and i + 1 >= args.die_mid_stream:
                    os._exit(3)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            STATS["streams_cancelled"] += 1
            raise
        STATS["streams_completed"] += 1
        return resp

    async def stored(request: web.Request) -> web.Response:
        """GET, DELETE and POST .../cancel of a stored Response, as vLLM keeps them."""
        STATS["stored_calls"] = STATS.get("stored_calls", 0) + 1
        rid = request.match_info["id"]
        found = STORED.get(rid)
        if found is None:
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error"}},
                                     status=404)
        if request.method == "DELETE":
            del STORED[rid]
            return web.json_response({"id": rid, "object": "response", "deleted": True})
        if request.path.endswith("/cancel"):
            found["status"] = "cancelled"
        return web.json_response(found)

    async def count_tokens(request: web.Request) -> web.Response:
        body = await counted(request)
        return web.json_response({"input_tokens": len(_prompt_words(body)) + 3})

    async def tokenize(request: web.Request) -> web.Response:
        body = await counted(request)
        words = str(body.get("content", body.get("prompt", ""))).split()
        return web.json_response({"tokens": [1000 + len(w) for w in words]})

    async def detokenize(request: web.Request) -> web.Response:
        body = await counted(request)
        return web.json_response({"content": " ".join("x" * (t - 1000) if 1000 <= t < 1100 else f"<{t}>"
                                                      for t in body["tokens"])})

    async def infill(request: web.Request) -> web.StreamResponse:
        """llama-server's own completion shape: tokens_evaluated, tokens_predicted."""
        body = await counted(request)
        n = max(1, min(args.chunks, _length(body, args.chunks)))
        prompt = len(str(body.get("input_prefix", "")).split()) + len(str(body.get("input_suffix", "")).split())
        last = {"content": "", "stop": True, "tokens_evaluated": prompt, "tokens_predicted": n,
                "timings": {"cache_n": 0, "prompt_n": prompt}}
        if not body.get("stream"):
            return web.json_response({**last, "content": " ".join(f"tok{i}" for i in range(n))})
        STATS["streams_started"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(b"data: " + json.dumps({"content": f"tok{i} ", "stop": False}).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write_eof()
        STATS["streams_completed"] += 1
        return resp

    async def transcription(request: web.Request) -> web.StreamResponse:
        """vLLM's audio API: multipart; json ({text, usage: {type: duration, seconds}}),
        verbose_json (duration), text; streamed as chat-like chunks (usage when
        stream_include_usage). The audio lasts its size / 32000 s (16 kHz, 16-bit PCM)."""
        STATS["requests"] += 1
        raw = await request.read()
        if failed := failing():
            return failed
        head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
        fields, audio = {}, None
        for part in email.parser.BytesParser().parsebytes(head + raw).get_payload():
            if part.get_param("filename", header="content-disposition") is not None:
                audio = (part.get_filename(), len(part.get_payload(decode=True)))
            else:
                fields[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True).decode()
        if audio is None:
            return web.json_response({"error": {"message": "file is required"}}, status=400)
        size = audio[1]
        STATS["last_body"] = {**fields, "file": {"filename": audio[0], "size": size},
                              "raw_sha256": hashlib.sha256(raw).hexdigest()}
        seconds = max(1, size // 32000)
        n = args.chunks
        text = " ".join(f"tok{i}" for i in range(n))
        if fields.get("stream") == "true":
            STATS["streams_started"] += 1
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            head = {"id": "trsc-fake", "object": "transcription.chunk", "created": int(time.time()),
                    "model": fields.get("model")}
            for i in range(n):
                chunk = {**head, "choices": [{"delta": {"content": f"tok{i} "}, "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if fields.get("stream_include_usage") == "true":
                usage = {**head, "choices": [], "usage": _usage(4, n)}
                await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            STATS["streams_completed"] += 1
            return resp
        STATS["unary_completed"] += 1
        fmt = fields.get("response_format", "json")
        if fmt == "text":
            return web.Response(text=text, content_type="text/plain")
        if fmt == "verbose_json":
            return web.json_response({"task": "transcribe", "language": "en", "duration": float(seconds),
                                      "text": text, "segments": []})
        return web.json_response({"text": text, "usage": {"type": "duration", "seconds": seconds}})

    def failing() -> web.Response | None:
        if args.fail_status and STATS["requests"] >= args.fail_from:
            return web.json_response({"error": {"message": "fake failure", "type": "server_error"}},
                                     status=args.fail_status)
        return None

    async def rerank(request: web.Request) -> web.Response:
        body = await counted(request)
        if failed := failing():
            return failed
        docs = body["documents"]
        results = [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(docs))]
        return web.json_response({"model": args.model, "results": results[: body.get("top_n") or len(docs)],
                                  "usage": {"prompt_tokens": 7 * len(docs), "total_tokens": 7 * len(docs)}})

    async def score(request: web.Request) -> web.Response:
        await counted(request)
        if failed := failing():
            return failed
        return web.json_response({"object": "list", "model": args.model, "data": [{"index": 0, "score": 0.5}],
                                  "usage": {"prompt_tokens": 6, "total_tokens": 6}})

    async def embeddings(request: web.Request) -> web.Response:
        body = await counted(request)
        if not args.embeddings:
            return web.json_response({"error": {"message": "embeddings not enabled"}}, status=501)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        return web.json_response({"object": "list", "data": data, "model": args.model, "usage": _usage(3, 0)})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model"}]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(STATS)

    async def set_latency(request: web.Request) -> web.Response:
        # Chaos: make a running replica answer slowly (or quickly again).
        args.latency, args.latency_from = float(request.query["seconds"]), 1
        args.chunk_delay = args.latency / max(args.chunks, 1)
        return web.json_response({"latency": args.latency})

    async def set_pacing(request: web.Request) -> web.Response:
        # The bench's streams: the time between streamed chunks, unary answers untouched.
        args.chunk_delay = float(request.query["seconds"])
        return web.json_response({"chunk_delay": args.chunk_delay})

    async def metrics(request: web.Request) -> web.Response:
        running = STATS["streams_started"] - STATS["streams_completed"] - STATS["streams_cancelled"]
        if args.as_engine == "llamacpp":
            text = (f"llamacpp:requests_processing {running}\nllamacpp:requests_deferred 0\n"
                    "llamacpp:kv_cache_usage_ratio 0.125\n")
        elif args.as_engine == "sglang":
            text = (f"sglang:num_running_reqs{{model_name=\"{args.model}\"}} {running}\n"
                    f"sglang:num_queue_reqs{{model_name=\"{args.model}\"}} 0\n"
                    f"sglang:token_usage{{model_name=\"{args.model}\"}} 0.25\n"
                    f"sglang:cache_hit_rate{{model_name=\"{args.model}\"}} 0.5\n")
        else:
            text = ("# TYPE vllm:num_requests_running gauge\n"
                    f"vllm:num_requests_running{{model_name=\"{args.model}\"}} {running}\n"
                    "# TYPE vllm:num_requests_waiting gauge\n"
                    f"vllm:num_requests_waiting{{model_name=\"{args.model}\"}} 0\n"
                    "# TYPE vllm:kv_cache_usage_perc gauge\n"
                    f"vllm:kv_cache_usage_perc{{model_name=\"{args.model}\"}} 0.25\n"
                    "# TYPE vllm:prefix_cache_queries counter\n"
                    f"vllm:prefix_cache_queries_total{{model_name=\"{args.model}\"}} 400\n"
                    "# TYPE vllm:prefix_cache_hits counter\n"
                    f"vllm:prefix_cache_hits_total{{model_name=\"{args.model}\"}} 100\n")
        return web.Response(text=text, content_type="text/plain")

    async def sleep(request: web.Request) -> web.Response:
        began = time.monotonic()
        await asyncio.sleep(args.sleep_delay)
        stamp(args, "sleep", began, time.monotonic())
        STATS["sleeping"] = True
        STATS["sleep_level"] = int(request.query.get("level", "1"))
        return web.Response()

    async def wake_up(request: web.Request) -> web.Response:
        began = time.monotonic()
        await asyncio.sleep(args.wake_delay)
        stamp(args, "wake", began, time.monotonic())
        STATS["sleeping"] = False
        return web.Response()

    async def is_sleeping(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": bool(STATS.get("sleeping"))})

    # vLLM's LoRA adapters: those of --lora-modules NAME=PATH, then loaded and unloaded at
    # run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING), in STATS["loras"] (name -> path).
    argv = STATS["argv"]
    STATS["loras"] = {}
    if "--lora-modules" in argv:
        for value in argv[argv.index("--lora-modules") + 1:]:
            if value.startswith("--"):
                break
            name, _, path = value.partition("=")
            STATS["loras"][name] = path

    async def load_lora(request: web.Request) -> web.Response:
        body = await request.json()
        if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") != "1":
            return web.json_response({"error": {"message": "runtime LoRA updating is off"}}, status=404)
        if body["lora_name"] in STATS["loras"]:
            return web.json_response({"error": {"message": "already loaded"}}, status=400)
        STATS["loras"][body["lora_name"]] = body["lora_path"]
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def unload_lora(request: web.Request) -> web.Response:
        body = await request.json()
        if STATS["loras"].pop(body["lora_name"], None) is None:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    @web.middleware
    async def require_key(request: web.Request, handler):
        if args.api_key and request.path != "/health":
            sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(sent.encode(), args.api_key.encode()):
                STATS["refused"] = STATS.get("refused", 0) + 1
                return web.json_response({"error": {"message": "Invalid API Key", "type": "authentication_error"}},
                                         status=401)
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[require_key])
    app.router.add_post("/v1/chat/completions", completion)
    if not args.no_completions:  # a chat-only OpenAI-compatible server
        app.router.add_post("/v1/completions", completion)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", dialect)
    app.router.add_post("/v1/messages", dialect)
    app.router.add_get("/v1/responses/{id}", stored)
    app.router.add_delete("/v1/responses/{id}", stored)
    app.router.add_post("/v1/responses/{id}/cancel", stored)
    app.router.add_post("/v1/audio/transcriptions", transcription)
    app.router.add_post("/v1/audio/translations", transcription)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/infill", infill)
    app.router.add_post("/v1/rerank", rerank)
    app.router.add_post("/v1/score", score)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/fake/stats", stats)
    app.router.add_post("/fake/latency", set_latency)
    app.router.add_post("/fake/pacing", set_pacing)
    if args.as_engine:
        app.router.add_get("/metrics", metrics)
    if args.as_engine == "vllm":
        app.router.add_post("/sleep", sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_get("/is_sleeping", is_sleeping)
        app.router.add_post("/v1/load_lora_adapter", load_lora)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora)
    return app


def stamp(args: argparse.Namespace, what: str, *at: float) -> None:
    if args.stamp_dir:
        with open(os.path.join(args.stamp_dir, str(os.getpid())), "a") as f:
            f.write(" ".join([what, *map(repr, at)]) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.as_engine == "sglang":  # SGLang logs its arguments at start, its api_key included
        print(f"server_args=ServerArgs(model_path={args.model!r}, api_key={args.api_key!r})", flush=True)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.slow_start:
        time.sleep(args.slow_start)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # handler_cancellation: a client that disconnects cancels its request, as real
    # engines stop generating for a connection that closed.
    where = {"path": args.uds} if args.uds else {"host": args.host, "port": args.port}
    app = make_app(args)

    async def serving(app: web.Application) -> None:  # (just before it listens: an early stamp)
        stamp(args, "serving", time.monotonic())

    app.on_startup.append(serving)
    web.run_app(app, **where, print=None, reuse_port=args.reuse_port or None,
                handle_signals=not args.ignore_sigterm, access_log=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
