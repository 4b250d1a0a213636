"""What Anthropic's SDK gets from a Messages request on the real llama.cpp server
(the bundled SmolLM2) where llama-server's own Messages API differs from Anthropic's:
an app that moves from Anthropic changes only base_url and model, and must get the
answer its code was written for, or a 400 that says why."""

from __future__ import annotations

import anthropic
import pytest

from .test_e2e_llamacpp import MODEL, llama_daemon  # noqa: F401  (the daemon on the bundled model)

pytestmark = pytest.mark.e2e

PREFILL = "My favourite colour is"
WITH_PREFILL = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": PREFILL}]


@pytest.fixture
def claude(llama_daemon):
    return anthropic.Anthropic(base_url=llama_daemon.url, api_key="unused", max_retries=0, timeout=120)


def test_a_prefilled_answer_is_only_what_the_model_added_as_anthropic_answers_it(claude):
    """llama-server answered an assistant prefill with the prefill and its continuation:
    an app that joins prefill and answer (prefill "{" for JSON, say) got the prefill twice."""
    message = claude.messages.create(model=MODEL, max_tokens=1, messages=WITH_PREFILL)
    [block] = message.content
    assert not block.text.startswith(PREFILL) and block.text, block.text
    assert message.usage.output_tokens == 1
    # As a list of text blocks too.
    blocks = [{"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": [{"type": "text", "text": PREFILL}]}]
    again = claude.messages.create(model=MODEL, max_tokens=1, messages=blocks)
    assert not again.content[0].text.startswith(PREFILL), again.content


def test_a_prefilled_answer_streamed_is_only_what_the_model_added(claude):
    with claude.messages.stream(model=MODEL, max_tokens=2, messages=WITH_PREFILL) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces and not "".join(pieces).startswith(PREFILL), pieces
    assert final.content[0].text == "".join(pieces)
    events = list(claude.messages.create(model=MODEL, max_tokens=2, messages=WITH_PREFILL, stream=True))
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert all(deltas) and not "".join(deltas).startswith(PREFILL), deltas
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]


@pytest.mark.parametrize("block", [
    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The secret is banana."}},
    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}},
    {"type": "search_result", "source": "https://example.com", "title": "t",
     "content": [{"type": "text", "text": "The secret is banana."}]},
    {"type": "no_such_block", "text": "x"},
])
def test_a_content_block_llama_server_would_drop_is_a_400_naming_it_not_an_answer_without_it(claude, block):
    """llama-server's Messages API reads text, image, thinking, tool_use and tool_result
    blocks and drops any other without a word: the model answered as if the document
    had not been sent, and count_tokens counted without it."""
    messages = [{"role": "user", "content": [block, {"type": "text", "text": "What is the secret?"}]}]
    for call in (lambda: claude.messages.create(model=MODEL, max_tokens=4, messages=messages),
                 lambda: claude.messages.count_tokens(model=MODEL, messages=messages)):
        with pytest.raises(anthropic.BadRequestError) as err:
            call()
        error = err.value.body["error"]
        assert error["type"] == "invalid_request_error" and block["type"] in error["message"], error
        assert "messages[0].content[0]" in error["message"], error
    # The blocks it reads are answered as before.
    read = [{"role": "user", "content": [{"type": "text", "text": "The secret is banana."},
                                         {"type": "text", "text": "What is the secret?"}]}]
    assert claude.messages.create(model=MODEL, max_tokens=2, messages=read).content


def test_tool_choice_none_on_llama_server_is_answered_in_words(claude):
    # The engine is given no tools for "none" (capabilities.engine_fields): still a plain answer.
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    message = claude.messages.create(model=MODEL, max_tokens=4, tools=tools, tool_choice={"type": "none"},
                                     messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert [b.type for b in message.content] == ["text"] and message.stop_reason in ("max_tokens", "end_turn")


def test_a_models_max_input_tokens_is_what_one_request_may_send_not_the_shared_context(claude):
    """llama.cpp shares context_length among its `parallel` slots: the bundled model gives
    one request 8192 / 4 tokens, and a longer prompt is a 400. The model object said 8192,
    so an app sizing its prompts by it had them refused."""
    said = claude.models.retrieve(MODEL).max_input_tokens
    assert said == 8192 // 4
    assert [m.max_input_tokens for m in claude.models.list() if m.id == MODEL] == [said]
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hello world " * 1500}])
    assert f"{said} tokens" in err.value.body["error"]["message"]
