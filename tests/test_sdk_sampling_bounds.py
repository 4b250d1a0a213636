"""Sampling fields out of the range the API documents (OpenAI: temperature 0 to 2,
top_p 0 to 1, top_logprobs 0 to 20; Anthropic: temperature and top_p 0 to 1): the
commercial APIs answer a 400 naming the field, llama-server took them (a temperature of
-1 or 5, a top_p of 2) and answered 200. The official SDKs against the real daemon on
fake engines, alone and with workers (which decode the body themselves)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from .conftest import fake_model

ASK = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "workers=2"])
def daemon(request, tmp_path_factory):
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("bounds"))
    d = factory.start(fake_model("fake", "--chunks", "3"),
                      server=f"workers = {request.param}" if request.param > 1 else "")
    yield d
    factory.cleanup()


@pytest.fixture
def oai(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def claude(daemon):
    return anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=30)


OPENAI_OUT_OF_RANGE = [("temperature", -1), ("temperature", 2.5), ("top_p", -0.1), ("top_p", 2)]


@pytest.mark.parametrize(("field", "value"), OPENAI_OUT_OF_RANGE + [("top_logprobs", 21), ("top_logprobs", -1)])
def test_a_chat_sampling_field_out_of_openais_range_is_the_sdks_bad_request_naming_it(oai, field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="fake", messages=ASK, max_tokens=3, **extra, **{field: value})
    assert caught.value.body["param"] == field, caught.value.body
    assert field in caught.value.message


@pytest.mark.parametrize(("field", "value"), OPENAI_OUT_OF_RANGE)
def test_a_completions_sampling_field_out_of_range_is_a_400(oai, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="fake", prompt="Hi", max_tokens=3, **{field: value})
    assert caught.value.body["param"] == field


@pytest.mark.parametrize(("field", "value"), OPENAI_OUT_OF_RANGE + [("top_logprobs", 21)])
def test_a_responses_sampling_field_out_of_range_is_a_400(oai, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="fake", input="Say hi.", max_output_tokens=3, **{field: value})
    assert caught.value.body["param"] == field


@pytest.mark.parametrize(("field", "value"), [("temperature", 1.5), ("temperature", -1), ("top_p", 1.1)])
def test_a_messages_sampling_field_out_of_anthropics_range_is_anthropics_400(claude, field, value):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="fake", max_tokens=3, messages=ASK, extra_body={field: value})
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert field in caught.value.message


def test_sampling_fields_at_their_bounds_are_served(oai, claude):
    oai.chat.completions.create(model="fake", messages=ASK, max_tokens=3, temperature=2, top_p=0,
                                logprobs=True, top_logprobs=20)
    oai.chat.completions.create(model="fake", messages=ASK, max_tokens=3, temperature=0, top_p=1)
    oai.responses.create(model="fake", input="Say hi.", max_output_tokens=3, temperature=2, top_p=1)
    # (This Anthropic SDK's create() names neither field: sent as the body's own.)
    claude.messages.create(model="fake", max_tokens=3, messages=ASK, extra_body={"temperature": 1, "top_p": 0})
