"""An engine's too-long-prompt 400 names the config fields that set the limit (issue 19)."""

from __future__ import annotations

from appliance.config import parse_config
from appliance.gateway.engine_errors import explain

LLAMA_400 = (b'{"error":{"code":400,"message":"request (631 tokens) exceeds the available context size '
             b'(256 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":631,'
             b'"n_ctx":256}}')


def _model():
    return parse_config('[[models]]\nname = "m"\nsource = "builtin:smollm2-135m-instruct"\n'
                        "context_length = 1024\n").models[0]


def test_llama_servers_context_error_names_context_length_parallel_and_the_numbers():
    error = explain(_model(), 400, LLAMA_400)
    assert error is not None and error.status == 400 and error.code == "context_length_exceeded"
    for words in ("(631 tokens)", "256 tokens", "context_length 1024", "parallel = 4", "context_per_request"):
        assert words in error.message, error.message


def test_other_engine_answers_are_relayed_as_they_are():
    assert explain(_model(), 200, LLAMA_400) is None
    assert explain(_model(), 400, b'{"error":{"message":"bad temperature"}}') is None


def test_a_required_tool_on_a_template_without_tools_is_a_400_and_auto_is_left_alone():
    import pytest

    from appliance.errors import BadRequest
    from appliance.gateway.capabilities import check_tools

    cfg = parse_config("")  # the bundled SmolLM2: its template never mentions tools
    model = cfg.models[0]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(BadRequest, match="cannot call tools") as info:
            check_tools(cfg, model, choice)
        assert info.value.code == "tools_not_supported" and info.value.param == "tool_choice"
    for choice in (None, "auto", "none"):
        check_tools(cfg, model, choice)
