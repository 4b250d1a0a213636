"""A completion length no answer can reach (max_tokens over what one request of the
model may use, prompt and answer together): OpenAI and Anthropic answer a 400 naming
the field; llama-server took it and answered 200, cut at its slot's context. The
official SDKs against the daemon on the real llama-server (the bundled SmolLM2)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from .test_e2e_llamacpp import MODEL

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "workers=2"])
def llama_daemon(request, tmp_path_factory):
    """The bundled model on llama-server, served by the daemon alone and with workers
    (whose front doors read the body and send the daemon its facts)."""
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("limits"))
    daemon = factory.start("", wait=False, server=f"workers = {request.param}" if request.param > 1 else "")
    daemon.wait_ready(timeout=120)
    yield daemon
    factory.cleanup()


@pytest.fixture
def oai(llama_daemon):
    return openai.OpenAI(base_url=f"{llama_daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def claude(llama_daemon):
    return anthropic.Anthropic(base_url=llama_daemon.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def per_request(claude):
    """What one request may use, as the daemon tells Anthropic's SDK (context / parallel)."""
    return claude.models.retrieve(MODEL).max_input_tokens


def _says_too_large(err, field: str, asked: int, per_request: int) -> None:
    assert err.status_code == 400
    message = str(err.message)
    assert f"{field} is too large: {asked}" in message and str(per_request) in message, message


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_max_tokens_over_the_models_context_is_the_sdks_bad_request_naming_it(oai, per_request, field):
    asked = per_request + 1
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=ASK, **{field: asked})
    _says_too_large(caught.value, field, asked, per_request)
    assert caught.value.body["param"] == field and caught.value.body["code"] == "context_length_exceeded"
    # Streamed: the same 400 before any event.
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=ASK, stream=True, **{field: asked})


def test_a_completions_max_tokens_over_the_models_context_is_a_400(oai, per_request):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt="Hi", max_tokens=10 * per_request)
    _says_too_large(caught.value, "max_tokens", 10 * per_request, per_request)


def test_a_responses_max_output_tokens_over_the_models_context_is_a_400(oai, per_request):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=MODEL, input="Say hi.", max_output_tokens=per_request + 1)
    _says_too_large(caught.value, "max_output_tokens", per_request + 1, per_request)
    assert caught.value.body["param"] == "max_output_tokens"


def test_a_messages_max_tokens_over_the_models_context_is_anthropics_400(claude, per_request):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=100_000, messages=ASK)
    _says_too_large(caught.value, "max_tokens", 100_000, per_request)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError), claude.messages.stream(
            model=MODEL, max_tokens=100_000, messages=ASK) as stream:
        stream.get_final_message()


def test_a_max_tokens_within_the_models_context_is_served(oai, per_request):
    """The bound is the context one request gets, not less: the engine stops the answer."""
    resp = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=per_request, temperature=0,
                                       extra_body={"n_predict": 4})
    assert resp.choices[0].message.content is not None
