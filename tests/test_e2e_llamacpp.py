"""End to end: the real llama.cpp server with the bundled SmolLM2, called through
the openai Python SDK, exactly as a local app would."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from appliance.config import builtin_model_path
from appliance.dist.images import default_llama_server

from .conftest import pid_alive

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def llama_daemon(tmp_path_factory):
    missing = [p for p in (default_llama_server(), str(builtin_model_path(MODEL))) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"run ./install.sh --dev first: missing {', '.join(missing)}")
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("e2e"))
    # No [[models]]: the embedded default is what a fresh install serves.
    daemon = factory.start("", wait=False)
    daemon.wait_ready(timeout=120)
    yield daemon
    factory.cleanup()


@pytest.fixture
def client(llama_daemon):
    return openai.OpenAI(base_url=f"{llama_daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    assert resp.choices[0].message.content.strip()
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_completion_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 1 and "".join(pieces).strip()
    assert usage is not None and usage.completion_tokens > 0


def test_completion(client):
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert resp.choices[0].text.strip()
    assert resp.usage.completion_tokens > 0


def test_models_and_errors_through_the_sdk(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="hi")


def test_a_prompt_over_the_context_a_request_gets_names_the_config_fields(client):
    # llama-server's own 400 named its numbers, not the knobs: context_length is shared by
    # `parallel` slots, so the default model gives one request 8192 / 4 tokens.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello world " * 1500}],
                                       max_tokens=4)
    error = info.value.body
    assert error["code"] == "context_length_exceeded", error
    for words in ("2048 tokens", "context_length 8192", "parallel = 4", "context_per_request"):
        assert words in error["message"], error["message"]


def test_a_required_tool_on_the_bundled_model_is_a_clear_400_not_silence(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                       tools=tools, tool_choice="required", max_tokens=8)
    assert info.value.body["code"] == "tools_not_supported" and info.value.body["param"] == "tool_choice"
    # tool_choice auto (or none) is the model's to honour or not: answered.
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            tools=tools, tool_choice="auto", max_tokens=4)
    assert answer.choices[0].message is not None


def test_a_second_key_reads_no_prompt_cache_signal_from_llama_server(llama_daemon):
    # Regression: llama-server's cached_tokens and timings were relayed as is; a second key
    # sending a prefix plus a guess read how much of another key's prompt was cached.
    from .test_keys import keys_cli

    victim, attacker = (keys_cli(llama_daemon, "create", "--name", n) for n in ("victim", "attacker"))
    secret = "the vault code is 8 3 5 1"
    openai.OpenAI(base_url=f"{llama_daemon.url}/v1", api_key=victim, max_retries=0, timeout=120).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": secret}], max_tokens=2)
    spy = openai.OpenAI(base_url=f"{llama_daemon.url}/v1", api_key=attacker, max_retries=0, timeout=120)
    for guess in ("the vault code is 1", "the vault code is 8 3", secret):
        messages = [{"role": "user", "content": guess}]
        raw = spy.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=2)
        streamed = spy.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=2, stream=True, stream_options={"include_usage": True})
        for text in (raw.text, "".join(streamed.http_response.iter_text())):
            assert '"usage"' in text and not any(f in text for f in ("cached_tokens", "timings", "cache_n")), text


def test_llama_server_refuses_everyone_but_the_appliance(llama_daemon):
    # The port as a local user finds it (the process table), not from /admin/status.
    from .test_engine_door import _environ, assert_every_engine_port_refuses_strangers, engine_processes

    assert_every_engine_port_refuses_strangers(llama_daemon, expected_ports=1)
    [pid] = engine_processes(llama_daemon)
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    key = Path(argv[argv.index("--api-key-file") + 1]).read_text().strip()
    assert len(key) == 64 and "LLAMA_API_KEY" not in _environ(pid)
    [port] = {r["port"] for r in llama_daemon.replicas(MODEL)}
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers=auth, timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/slots", headers=auth, timeout=10).status_code == 501  # off
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200  # public by design


def test_the_engine_stops_with_the_daemon(llama_daemon):
    pid = llama_daemon.replicas(MODEL)[0]["pid"]
    assert pid_alive(pid)
    assert llama_daemon.terminate(signal.SIGTERM) == 0
    assert not pid_alive(pid)


def test_the_default_model_at_zero_answers_its_first_request(tmp_path):
    """Scale to zero, then a request: held while llama-server loads, then answered."""
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path)
    model = ('[[models]]\nname = "smollm2-135m-instruct"\nserver = "llamacpp"\n'
             'source = "builtin:smollm2-135m-instruct"\n[models.autoscaling]\nmin_replicas = 0\n')
    try:
        d = factory.start(model)
        assert d.replicas(MODEL) == []
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0, timeout=120)
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
        assert resp.choices[0].message.content.strip()
        assert [r["state"] for r in d.replicas(MODEL)] == ["READY"]
    finally:
        factory.cleanup()


def test_embeddings_on_the_bundled_model_answer_the_sdk_and_chat_still_works(tmp_path):
    # Before: llama-server answered "Pooling type 'none' is not OAI compatible" until the
    # operator found args = ["--pooling", "mean"].
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path)
    try:
        daemon = factory.start(f'[[models]]\nname = "{MODEL}"\nsource = "builtin:{MODEL}"\nembeddings = true\n',
                               wait=False)
        daemon.wait_ready(timeout=120)
        sdk = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
        vectors = sdk.embeddings.create(model=MODEL, input=["the cat sat", "on the mat"]).data
        assert len(vectors) == 2 and len(vectors[0].embedding) > 100
        assert vectors[0].embedding != vectors[1].embedding
        answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert answer.choices[0].message.content
    finally:
        factory.cleanup()



def test_a_worker_gives_a_legacy_completions_logprobs_as_the_daemon_does(tmp_path):
    """With workers, a completion is carried by one (x-appliance-path: fast): its whole
    answer and its stream get the legacy logprobs, the stream's text_offset counting from
    the prompt's end as the daemon's own relay counts it (the worker had no body to read)."""
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path)
    try:
        daemon = factory.start("", wait=False, server="workers = 2")
        daemon.wait_ready(timeout=120)
        sdk = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
        ask = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "logprobs": 2, "temperature": 0}
        whole = sdk.completions.with_raw_response.create(**ask)
        streamed = sdk.completions.with_raw_response.create(**ask, stream=True)
        assert whole.headers.get("x-appliance-path") == streamed.headers.get("x-appliance-path") == "fast"
        logprobs = whole.parse().choices[0].logprobs
        assert whole.parse().id.startswith("cmpl-") and logprobs.text_offset[0] == len(ask["prompt"])
        chunks = [c for c in streamed.parse() if c.choices and c.choices[0].logprobs]
        assert all(c.id.startswith("cmpl-") for c in chunks)
        assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == logprobs.text_offset
        assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == logprobs.tokens
    finally:
        factory.cleanup()


def test_llama_server_serves_a_store_model_it_may_only_read(tmp_path):
    """The store is read-only to engines and store.db closed to them (appliance/fleet/landlock.py):
    llama-server still loads its GGUF through the snapshot's link to the blob, and its HOME is its own."""
    from appliance.store.records import Incoming, SourceFile
    from appliance.store.store import Store

    from .conftest import DaemonFactory

    gguf = builtin_model_path(MODEL)
    store = Store(tmp_path / "cache")
    store.add(Incoming("smol", str(gguf), [SourceFile(gguf.name, gguf.stat().st_size, lambda: open(gguf, "rb"))],
                       license_accepted_by="test", license_accepted_at=1.0))
    store.close()
    factory = DaemonFactory(tmp_path)
    try:
        daemon = factory.start(f'[[models]]\nname = "{MODEL}"\nserver = "llamacpp"\nsource = "store:smol"\n',
                               wait=False)
        daemon.wait_ready(timeout=120)
        sdk = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert answer.choices[0].message.content
        assert (tmp_path / "cache" / "engine-home" / f"{MODEL}-0").is_dir()
    finally:
        factory.cleanup()
