"""Metering and tenancy without a daemon: reservations against a budget, the
stream tap, the cache-revealing fields, and tenants' cache salts."""

from __future__ import annotations

import json

import pytest

from appliance.access.keys import Gate, KeyStore
from appliance.access.tenancy import Tenancy, revealing, scrub
from appliance.errors import RateLimited
from appliance.gateway.metering import DONE, StreamTap, Usage, completion_cap, prompt_bound
from appliance.gateway.protocol import ChatCompletionRequest, decode_request


def _gate(tmp_path, budget: int):
    charges = []
    store = KeyStore(tmp_path / "keys.db")
    key, _ = store.create("k", budget_tokens=budget)
    gate = Gate(store, required=True, charge=lambda *a: charges.append(a), clock=lambda: 1_700_000_000.0)
    return gate, gate.keys[key.id], charges


def test_reservations_in_flight_never_add_up_past_the_budget(tmp_path):
    gate, key, charges = _gate(tmp_path, 1000)
    held = []
    with pytest.raises(RateLimited) as refused:
        for _ in range(100):
            held.append(gate.admit(key, None, prompt=50, cap=50))
    assert len(held) == 10 and refused.value.retry_after == 2  # the holds settle soon
    gate.settle(key, held.pop(), 30, 0)  # settled to its real usage: 70 of its 100 free again
    held.append(gate.admit(key, None, prompt=50, cap=20))
    with pytest.raises(RateLimited):
        gate.admit(key, None, prompt=1, cap=0)
    for res in held:
        gate.settle(key, res, res.held, 0)
    assert sum(c[2] for c in charges) == 1000 and gate.held == {}


def test_a_request_without_a_cap_is_reserved_at_what_the_budget_leaves(tmp_path):
    gate, key, _ = _gate(tmp_path, 1000)
    res = gate.admit(key, None, prompt=100, cap=None, ceiling=8192, choices=2)
    assert res.completion == 450 and res.held == 1000
    with pytest.raises(RateLimited):
        gate.admit(key, None, prompt=1, cap=None, ceiling=8192)
    gate.settle(key, res, 0, 0)
    roomy = gate.admit(key, None, prompt=100, cap=None, ceiling=64)
    assert roomy.completion == 64 and roomy.held == 164


def test_the_completion_cap_is_the_largest_length_field_times_the_choices():
    req = decode_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                     "max_tokens": 5, "max_completion_tokens": 9, "n_predict": 7, "n": 3}).encode(),
                         ChatCompletionRequest)
    assert completion_cap(req) == 27
    unbounded = decode_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n_predict": -1}',
                               ChatCompletionRequest)
    assert completion_cap(unbounded) is None
    assert prompt_bound(b'{"a": 1}') == 8


def _events(*payloads: dict | str) -> bytes:
    return b"".join(b"data: " + (p.encode() if isinstance(p, str) else json.dumps(p).encode()) + b"\n\n"
                    for p in payloads)


def test_the_tap_strips_the_usage_event_it_asked_for_counts_events_and_holds_done():
    content = {"choices": [{"delta": {"content": "a"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                                      "prompt_tokens_details": {"cached_tokens": 3}}}
    stream = _events(content, content, usage, "[DONE]")
    tap = StreamTap(True, scrub, revealing)
    out = b"".join(tap.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))
    assert out == _events(content, content) and tap.events == 2
    assert tap.usage.prompt_tokens == 4 and tap.rest() == DONE


def test_usage_is_still_counted_from_a_stream_whose_usage_event_is_split_across_reads():
    # The engine's last events can arrive in any two reads: every cut point, even
    # one inside the "usage" name the tap looks for, still yields the usage.
    content = {"choices": [{"delta": {"content": "a"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}
    stream = _events(content, usage, "[DONE]")
    for cut in range(1, len(stream)):
        tap = StreamTap(True)
        out = tap.feed(stream[:cut]) + tap.feed(stream[cut:])
        assert out == _events(content) and tap.events == 1, cut
        assert tap.usage == Usage(4, 1) and tap.rest() == DONE, cut


def test_the_tap_scrubs_a_usage_event_the_client_asked_for():
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                                      "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0}},
             "timings": {"cache_n": 3, "prompt_n": 1}}
    tap = StreamTap(False, scrub, revealing)
    out = json.loads(tap.feed(_events(usage))[6:])
    assert out == {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                                            "prompt_tokens_details": {"audio_tokens": 0}}}


def test_scrubbing_leaves_an_answer_without_cache_fields_byte_for_byte():
    tenancy = Tenancy("key")
    plain = b'{"choices":[{"message":{"content":"\\"timings\\" are private"}}],"usage":{"prompt_tokens":1}}'
    assert tenancy.answer(plain) is plain
    leaky = (b'{"id":"x","timings":{"cache_n":40},'
             b'"usage":{"prompt_tokens":44,"prompt_tokens_details":{"cached_tokens":41}}}')
    assert json.loads(tenancy.answer(leaky)) == {"id": "x", "usage": {"prompt_tokens": 44, "prompt_tokens_details": {}}}
    assert Tenancy("shared").answer(leaky) is leaky


def test_tenants_get_distinct_salts_no_client_salt_can_reach():
    tenancy = Tenancy("key", secret=b"s" * 32)
    a, b = tenancy.salt("key:a", None), tenancy.salt("key:b", None)
    assert a != b and tenancy.salt("key:a", None) == a
    assert tenancy.salt("key:b", a) not in (a, b)  # naming another tenant's salt only narrows its own
    assert Tenancy("key").salt("key:a", None) != a  # and it is secret: a new process, new salts
    assert Tenancy("shared").tenant(None, None) is None and Tenancy("key").tenant(None, None) == "local"
