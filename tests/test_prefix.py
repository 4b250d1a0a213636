"""Prefix-aware routing among READY replicas (appliance/fleet/prefix.py)."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from dataclasses import dataclass

from appliance.config import RoutingConfig
from appliance.fleet.prefix import PrefixRouter, block_hashes, engine_view


@dataclass
class Rep:
    name: str
    inflight: int = 0


def chat(system: str, user: str = "hi", tools=None) -> bytes:
    body = {"model": "m", "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": user}]}
    if tools is not None:
        body["tools"] = tools
    return json.dumps(body).encode()


def tenant(i: int) -> str:
    return f"You are the assistant of tenant {i}. " + f"Policy clause {i}. " * 200


def router(**kw) -> PrefixRouter:
    return PrefixRouter(RoutingConfig(prefix_block_bytes=64, **kw))


def test_the_hash_covers_tools_then_messages_in_order_and_not_other_fields():
    a = engine_view(chat("sys", tools=[{"type": "function"}]), chat=True)
    assert a.index(b"function") < a.index(b"sys") < a.index(b"hi")
    # Sampling settings and the model are not part of what the engine caches.
    body = json.loads(chat("sys"))
    varied = json.dumps({**body, "temperature": 0.3, "model": "other"}).encode()
    assert engine_view(varied, True) == engine_view(chat("sys"), True)
    assert engine_view(b'{"prompt": "abc"}', chat=False) == b'"abc"'


def test_block_hashes_are_chained_so_a_match_at_block_i_means_the_whole_prefix_matches():
    one, two = b"a" * 64 + b"b" * 64, b"c" * 64 + b"b" * 64
    h1, h2 = block_hashes(one, 64), block_hashes(two, 64)
    assert len(h1) == 2 and h1[1] != h2[1]  # same second block, different history
    assert block_hashes(one + b"tail", 64) == h1  # a partial last block is not hashed


def test_the_same_prefix_lands_on_the_same_replica():
    r = router()
    reps = [Rep("m#0"), Rep("m#1"), Rep("m#2")]
    for t in range(30):
        first = r.choose(reps, r.hashes(chat(tenant(t), "first question"), True))
        for q in range(5):
            assert r.choose(reps, r.hashes(chat(tenant(t), f"question {q}"), True)) is first
    assert r.outcomes["hit"] == 150 and r.outcomes["miss"] == 30


def test_new_prefixes_spread_evenly_across_replicas():
    r = router()
    reps = [Rep(f"m#{i}") for i in range(4)]
    counts = Counter(r.choose(reps, r.hashes(chat(tenant(t)), True)).name for t in range(400))
    assert set(counts) == {"m#0", "m#1", "m#2", "m#3"}
    assert min(counts.values()) >= 60  # 100 each on average


def test_the_load_guard_sends_the_request_to_the_least_loaded_replica():
    r = router(prefix_load_margin=2)
    reps = [Rep("m#0"), Rep("m#1")]
    home = r.choose(reps, r.hashes(chat(tenant(1)), True))
    other = next(x for x in reps if x is not home)
    home.inflight = 2  # within the margin: stays home
    assert r.choose(reps, r.hashes(chat(tenant(1), "again"), True)) is home
    home.inflight = 3  # beyond it: the least-loaded one takes it
    assert r.choose(reps, r.hashes(chat(tenant(1), "again"), True)) is other
    assert r.outcomes["load_guard"] == 1


def test_a_request_shorter_than_a_block_goes_to_the_least_loaded_replica():
    r = router()
    reps = [Rep("m#0", inflight=3), Rep("m#1", inflight=1)]
    assert r.choose(reps, r.hashes(b'{"messages": [{"role": "user", "content": "x"}]}', True)).name == "m#1"


def test_the_index_is_bounded_in_entries_and_in_memory():
    mib = 0.05
    r = router(prefix_index_mib=mib)
    reps = [Rep("m#0"), Rep("m#1")]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for t in range(400):
            r.choose(reps, r.hashes(chat(tenant(t)), True))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert all(len(i) <= r.capacity for i in r.indices.values())
    assert r.memory_entries() <= 2 * r.capacity
    assert grown <= 2 * mib * 1024 * 1024 * 1.25  # the cap, plus interpreter noise


def test_the_most_recent_prefixes_survive_eviction():
    r = router(prefix_index_mib=0.2)  # ~15 tenants per replica of the 200
    reps = [Rep("m#0"), Rep("m#1")]
    homes = {t: r.choose(reps, r.hashes(chat(tenant(t)), True)) for t in range(200)}
    # The last tenants are still indexed, and still go home.
    for t in range(195, 200):
        assert r.choose(reps, r.hashes(chat(tenant(t), "more"), True)) is homes[t]


def test_a_replica_joining_or_leaving_moves_affinity_minimally():
    r = router()
    reps = [Rep("m#0"), Rep("m#1"), Rep("m#2")]
    tenants = range(300)
    before = {t: r.choose(reps, r.hashes(chat(tenant(t)), True)).name for t in tenants}
    # A fourth replica joins: every seen prefix stays where its cache is.
    reps.append(Rep("m#3"))
    after_join = {t: r.choose(reps, r.hashes(chat(tenant(t), "x"), True)).name for t in tenants}
    assert after_join == before
    # ...and it takes about a quarter of the new prefixes.
    new = Counter(r.choose(reps, r.hashes(chat(tenant(t)), True)).name for t in range(1000, 1400))
    assert 60 <= new["m#3"] <= 140
    # m#1 leaves (its cache is gone): only its prefixes move.
    r.forget("m#1")
    reps = [x for x in reps if x.name != "m#1"]
    after_leave = {t: r.choose(reps, r.hashes(chat(tenant(t), "y"), True)).name for t in tenants}
    moved = {t for t in tenants if after_leave[t] != before[t]}
    assert moved == {t for t in tenants if before[t] == "m#1"}


def test_routing_is_deterministic():
    def run() -> list[str]:
        r = router()
        reps = [Rep("m#0"), Rep("m#1"), Rep("m#2")]
        return [r.choose(reps, r.hashes(chat(tenant(t % 17), str(t)), True)).name for t in range(100)]

    assert run() == run()
