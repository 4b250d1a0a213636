"""[server] workers = N (appliance/dataplane/): N worker processes take the port's
connections and make the engine calls; the daemon still decides every request.
Through the real daemon, with fake-engine replicas and a recording provider."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from appliance.config import ServerConfig, parse_config, worker_count
from appliance.dataplane.protocol import Mailbox, WorkerSettings
from appliance.dataplane.worker_client import ClientSide

from .conftest import DaemonFactory, fake_model, over_admin_socket, pid_alive, wait_until
from .test_hostile_input import CHUNKED, H2_PREFACE
from .test_hostile_input import _raw as raw_answer
from .test_keys import _sent_with as sent_with
from .test_keys import keys_cli
from .test_reload import _reload_cli
from .test_routes import Recorder, provider, recorder, route  # noqa: F401  (the module fixture)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BODY_TIMEOUT_S = 2  # [server] body_read_timeout_s of the module's daemon
WORKER = "x-appliance-worker"
CARRIED = "x-appliance-path"  # "fast": the worker carried it on the daemon's grant
MODELS = (
    fake_model("fake", "--chunks", "3", "--latency", "0.05")
    + fake_model("slow", "--chunks", "60", "--chunk-delay", "0.1")
    + fake_model("err5xx", "--fail-status", "500")
    + fake_model("pair", "--chunks", "2", extra="[models.autoscaling]\nmin_replicas = 2\nmax_replicas = 2")
    + fake_model("flood", "--chunks", "100000")
    + fake_model("twin", "--latency", "1", extra="[models.autoscaling]\nmin_replicas = 2\nmax_replicas = 2")
    + fake_model("cold", "--slow-start", "2", extra="[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1")
)


@pytest.fixture(scope="module")
def workers(tmp_path_factory, recorder):  # noqa: F811  (the module fixture)
    tmp = tmp_path_factory.mktemp("workers")
    factory = DaemonFactory(tmp)
    routes = route("claims", "claims", "err5xx", True) + route("general", "general", "err5xx", False, ["cloud"])
    extra = "[keys]\nrequired = true\n\n[queue]\nkeepalive_s = 0\n\n" + provider(recorder, tmp) + routes
    daemon = factory.start(MODELS, extra=extra, server=f"workers = 2\nbody_read_timeout_s = {BODY_TIMEOUT_S}", wait=False)
    wait_until(lambda: _all_ready(daemon), 60, what="the replicas")
    yield daemon
    factory.cleanup()


def _all_ready(daemon) -> bool:
    assert daemon.proc.poll() is None, daemon.log_text()
    try:
        models = {m["name"]: m for m in daemon.status()["models"]}
    except (httpx.HTTPError, KeyError, ValueError):
        return False
    pairs = models["pair"]["replicas"] + models["twin"]["replicas"]
    ready = models["fake"]["ready"] and models["flood"]["ready"] and models["slow"]["ready"]
    return len(pairs) == 4 and all(r["state"] == "READY" for r in pairs) and ready


def worker_pids(daemon_pid: int) -> dict[int, int]:
    """{worker index: pid} of the daemon's worker processes, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"appliance.dataplane.worker" in argv:
            found[json.loads(argv[-2])["index"]] = int(entry.name)
    return found


def db_rows(daemon, sql: str, *args):
    state = Path(daemon.config.read_text().split('state_dir = "')[1].split('"')[0])
    with sqlite3.connect(state / "appliance.db") as conn:
        return conn.execute(sql, args).fetchall()


def post(daemon, token: str, body: dict, timeout: float = 30) -> httpx.Response:
    with httpx.Client(base_url=daemon.url, timeout=timeout) as c:  # a new connection each time
        return c.post("/v1/chat/completions", json={**CHAT, **body}, headers={"Authorization": f"Bearer {token}"})


def test_requests_are_answered_through_every_worker(workers):
    token = keys_cli(workers, "create", "--name", "spread")
    assert sorted(worker_pids(workers.proc.pid)) == [1, 2]
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(16) as pool:
        while seen != {"1", "2"} and time.monotonic() < deadline:
            answers = list(pool.map(lambda _: post(workers, token, {"model": "fake"}), range(32)))
            assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
            assert {r.headers.get(CARRIED) for r in answers} == {"fast"}
            seen |= {r.headers[WORKER] for r in answers}
    assert seen == {"1", "2"}
    with workers.client() as c:  # what is not a proxied request works on the port too
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/chat/completions", json={**CHAT, "model": "fake"}).status_code == 401


def clients_on_each_worker(daemon, per_worker: int) -> list[httpx.Client]:
    """Keep-alive clients, per_worker of them connected to each of the two workers. A new
    connection goes to a worker picked at random (the port group's program: listener.py)."""
    on: dict[str, list[httpx.Client]] = {"1": [], "2": []}
    spare: list[httpx.Client] = []
    with ThreadPoolExecutor(16) as pool:
        for _ in range(20):
            if all(len(v) >= per_worker for v in on.values()):
                break
            batch = [httpx.Client(base_url=daemon.url, timeout=60) for _ in range(16)]
            for c, r in zip(batch, pool.map(lambda c: c.get("/readyz"), batch)):
                group = on[r.headers[WORKER]]
                (group if len(group) < per_worker else spare).append(c)
    for c in spare:
        c.close()
    assert all(len(v) == per_worker for v in on.values()), {k: len(v) for k, v in on.items()}
    return on["1"] + on["2"]


def test_a_concurrent_burst_through_two_workers_admits_exactly_the_budget(workers):
    # Each request holds its worst case (one token per body byte + max_tokens) while it
    # streams for seconds: a budget of K worst cases admits exactly K of the burst, half of
    # it sent through each worker (they reserve against the one ledger, in the daemon).
    k, burst = 3, 12
    body = json.dumps({**CHAT, "model": "slow", "max_tokens": 40, "stream": True}).encode()
    token = keys_cli(workers, "create", "--name", "burst", "--budget-tokens", str(k * (len(body) + 40)))
    clients = clients_on_each_worker(workers, burst // 2)
    start = threading.Barrier(burst)

    def one(c: httpx.Client) -> tuple[int, str | None]:
        start.wait()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            with c.stream("POST", "/v1/chat/completions", content=body, headers=headers) as r:
                r.read()
                assert r.status_code != 200 or r.headers.get(CARRIED) == "fast"
                return r.status_code, r.headers.get(WORKER)
        finally:
            c.close()

    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(one, clients))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * k + [429] * (burst - k), results
    assert sorted(w for _, w in results) == ["1"] * (burst // 2) + ["2"] * (burst // 2)
    spent = db_rows(workers, "SELECT coalesce(sum(tokens), 0) FROM usage_ledger WHERE key_id = ?",
                    token.split("-")[1])[0][0]
    assert 0 < spent <= k * (len(body) + 40)


def test_a_regulated_route_never_leaves_the_box_through_the_workers(workers, recorder):  # noqa: F811
    token = keys_cli(workers, "create", "--name", "regulated")
    before = recorder.requests()
    for _ in range(4):
        assert post(workers, token, {"model": "claims"}).status_code == 502  # the local engine fails
    assert recorder.requests() == before
    general = post(workers, token, {"model": "general"})  # the same failure, not regulated: it falls back
    assert general.status_code == 200 and recorder.requests() == before + 1
    assert general.headers.get(CARRIED) is None  # a fallback to weigh: the daemon asked for its body, answered it


def test_a_regulated_route_is_not_left_by_naming_the_model_twice_through_the_workers(workers, recorder):  # noqa: F811
    # {"model": "claims", "model": "general"}: the policy read the last, a reader of the
    # first would see the regulated route's request sent out. Each spelling is refused.
    token = keys_cli(workers, "create", "--name", "model-twice")
    before = recorder.requests()
    messages = '"messages": [{"role": "user", "content": "hi"}]'
    for names in ('"model": "claims", "model": "general"', '"model": "general", "model": "claims"',
                  '"model": "claims", "\\u006dodel": "general"'):
        with workers.client() as c:
            r = c.post("/v1/chat/completions", content=f"{{{names}, {messages}}}",
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "duplicate_field" and r.json()["error"]["param"] == "model"
    assert recorder.requests() == before


def test_two_different_keys_in_one_request_are_refused_through_the_workers(workers):
    alice, bob = keys_cli(workers, "create", "--name", "two-a"), keys_cli(workers, "create", "--name", "two-b")
    body = json.dumps({**CHAT, "model": "fake"}).encode()
    for pairs in ([("Authorization", f"Bearer {bob}"), ("Authorization", f"Bearer {alice}")],
                  [("x-api-key", bob), ("Authorization", f"Bearer {alice}")]):
        status, answer = sent_with(workers, "POST", "/v1/chat/completions", pairs, body)
        assert status == 401 and b"Two different API keys" in answer, answer
    assert sent_with(workers, "POST", "/v1/chat/completions", [("x-api-key", alice)], body)[0] == 200


def test_prefix_routing_sends_a_repeated_prefix_to_one_replica_whichever_worker(workers):
    token = keys_cli(workers, "create", "--name", "prefix")
    system = "You are a careful assistant. " * 80  # several prefix blocks
    body = {"model": "pair", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    answers = [post(workers, token, body) for _ in range(8)]
    assert {r.status_code for r in answers} == {200}
    assert {r.headers.get(CARRIED) for r in answers} == {"fast"}
    rids = [r.headers["x-request-id"] for r in answers]
    served = {row[0] for rid in rids
              for row in db_rows(workers, "SELECT served_by FROM audit WHERE request_id = ?", rid)}
    assert len(served) == 1 and next(iter(served)).startswith("pair#"), served


def test_a_worker_killed_mid_stream_is_replaced_its_client_is_not_left_hanging_and_the_request_is_audited(workers):
    token = keys_cli(workers, "create", "--name", "victim")
    before = worker_pids(workers.proc.pid)
    body = {**CHAT, "model": "slow", "stream": True}
    with httpx.Client(base_url=workers.url, timeout=httpx.Timeout(30, read=10)) as c, \
            c.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status_code == 200 and r.headers.get(CARRIED) == "fast"
        rid, index = r.headers["x-request-id"], int(r.headers[WORKER])
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(before[index], signal.SIGKILL)
        ended = time.monotonic()
        with pytest.raises(httpx.HTTPError):  # the stream ends: a cut connection, not a hang
            for _ in lines:
                pass
        assert time.monotonic() - ended < 10
    wait_until(lambda: worker_pids(workers.proc.pid).get(index) not in (None, before[index]), 20,
               what="the worker's replacement")
    wait_until(lambda: db_rows(workers, "SELECT status FROM audit WHERE request_id = ?", rid), 10,
               what="the cut request's audit row")
    assert db_rows(workers, "SELECT status FROM audit WHERE request_id = ?", rid)[0][0] in (499, 502)
    # No other process bound the port meanwhile, and the replacement serves it.
    assert {post(workers, token, {"model": "fake"}).status_code for _ in range(4)} == {200}


def _refusals(daemon, token: str, budgeted: str) -> list[tuple[int, str | None, str | None, dict]]:
    """Status, content type, Retry-After and envelope of each refusal the fast path meets."""
    big = json.dumps({**CHAT, "model": "fake", "pad": "x" * ServerConfig().max_body_bytes})
    asks = [
        ({"Authorization": "Bearer sk-not-a-key"}, json.dumps({**CHAT, "model": "fake"})),
        ({"Authorization": f"Bearer {token}"}, '{"model": "fake", "messages": '),  # malformed JSON
        ({"Authorization": f"Bearer {token}"}, json.dumps({"model": "fake", "messages": "hi"})),  # wrong type
        ({"Authorization": f"Bearer {token}"}, json.dumps({**CHAT, "model": "nothing-here"})),
        ({"Authorization": f"Bearer {budgeted}"}, json.dumps({**CHAT, "model": "fake", "max_tokens": 10**6})),
        ({"Authorization": f"Bearer {token}"}, big),
    ]
    out = []
    with httpx.Client(base_url=daemon.url, timeout=30) as c:
        for headers, body in asks:
            r = c.post("/v1/chat/completions", content=body, headers={**headers, "Content-Type": "application/json"})
            out.append((r.status_code, r.headers.get("content-type"), r.headers.get("retry-after"), r.json()))
    return out


def test_a_workers_refusals_are_one_processs_envelopes(workers, daemons):
    single = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n")
    answers = []
    for daemon in (workers, single):
        token = keys_cli(daemon, "create", "--name", "envelopes")
        budgeted = keys_cli(daemon, "create", "--name", "small", "--budget-tokens", "100")
        time.sleep(1.5)  # the keys' refresh (each second)
        answers.append(_refusals(daemon, token, budgeted))
    assert [a[0] for a in answers[0]] == [401, 400, 400, 404, 400, 413]  # the budget's: it can never fit
    assert answers[0][4][3]["error"]["code"] == "request_exceeds_budget"
    assert answers[0] == answers[1]


def test_refusals_through_the_workers_are_counted_in_metrics_as_in_one_process(workers):
    """appliance_requests_total counted a request only once routed: the workers' 401s and
    413s (answered by the daemon's front door) never showed in Prometheus either."""
    token = keys_cli(workers, "create", "--name", "counted")
    time.sleep(1.5)  # the keys' refresh (each second)
    assert post(workers, "sk-not-a-key", {"model": "fake"}).status_code == 401
    big = json.dumps({**CHAT, "model": "fake", "pad": "x" * ServerConfig().max_body_bytes})
    with httpx.Client(base_url=workers.url, timeout=30) as c:
        too_large = c.post("/v1/chat/completions", content=big,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        text = c.get("/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert too_large.status_code == 413
    for status in (401, 413):
        assert f'appliance_requests_total{{endpoint="chat",model="",status="{status}"}}' in text, text


def test_a_carried_stream_settles_exactly_the_usage_the_engine_reported(workers):
    token = keys_cli(workers, "create", "--name", "metered", "--budget-tokens", "100000")
    headers = {"Authorization": f"Bearer {token}"}
    asked = {**CHAT, "model": "fake", "stream": True, "stream_options": {"include_usage": True}}
    rows = []
    with workers.client() as c:
        for body in (asked, {**CHAT, "model": "fake", "stream": True}):
            with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status_code == 200 and r.headers.get(CARRIED) == "fast"
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            usages = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
            rows.append((r.headers["x-request-id"], usages))
    (asked_rid, [reported]), (kept_rid, kept) = rows
    assert kept == []  # asked for the appliance's metering, not shown to a client that did not ask
    expected = (reported["prompt_tokens"], reported["completion_tokens"])
    for rid in (asked_rid, kept_rid):
        sql = "SELECT prompt_tokens, completion_tokens FROM audit WHERE request_id = ?"
        wait_until(lambda rid=rid: db_rows(workers, sql, rid), 10, what="the stream's audit row")
        assert db_rows(workers, sql, rid)[0] == expected
    spent = db_rows(workers, "SELECT coalesce(sum(tokens), 0) FROM usage_ledger WHERE key_id = ?",
                    token.split("-")[1])[0][0]
    assert spent == 2 * sum(expected)


def test_a_carried_request_whose_replica_dies_before_answering_is_answered_by_the_other_once(workers):
    """The worker's engine call fails before a byte came back: the daemon grants it again,
    on the other replica; the client sees one answer, the ledger one row and one charge."""
    token = keys_cli(workers, "create", "--name", "retried", "--budget-tokens", "100000")
    result: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: result.update(resp=post(workers, token, {"model": "twin"})))
    sender.start()
    busy = wait_until(lambda: [r for r in workers.replicas("twin") if r["inflight"]], 10, what="the request held")
    os.kill(busy[0]["pid"], signal.SIGKILL)  # its engine dies before answering (latency 1 s)
    sender.join(timeout=30)
    resp = result["resp"]
    assert resp.status_code == 200 and resp.headers.get(CARRIED) == "fast", resp.text
    usage = resp.json()["usage"]
    rid = resp.headers["x-request-id"]
    sql = "SELECT served_by, status, prompt_tokens, completion_tokens FROM audit WHERE request_id = ?"
    rows = wait_until(lambda: db_rows(workers, sql, rid), 10, what="the request's audit row")
    assert rows == [(rows[0][0], 200, usage["prompt_tokens"], usage["completion_tokens"])]
    assert rows[0][0] != busy[0]["replica"]  # answered by the other replica
    assert "retrying request" in workers.log_text()
    spent = db_rows(workers, "SELECT coalesce(sum(tokens), 0) FROM usage_ledger WHERE key_id = ?",
                    token.split("-")[1])[0][0]
    assert spent == usage["prompt_tokens"] + usage["completion_tokens"]  # settled once, at what it used
    wait_until(lambda: _all_ready(workers), 30, what="the dead replica's restart")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_reader_slows_the_engine_not_its_workers_memory(workers):
    token = keys_cli(workers, "create", "--name", "slow-reader")
    body = json.dumps({**CHAT, "model": "flood", "stream": True}).encode()
    # Connection: close: the server closes it once the answer has ended, so reading until it
    # closes reads the whole answer. (On a keep-alive connection the server closes an idle one
    # after server.header_read_timeout_s, 10 s, counted from the answer's last write: a read
    # timeout of 10 s raced that close and lost it under load.)
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
               + body)
    pids = worker_pids(workers.proc.pid)
    with socket.create_connection(("127.0.0.1", workers.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(request)
        head = sock.recv(65536)
        assert b" 200 " in head.split(b"\r\n", 1)[0] and b"x-appliance-path: fast" in head, head[:300]
        index = int(head.split(b"x-appliance-worker: ")[1].split(b"\r\n")[0])
        before = _rss_kib(pids[index])
        time.sleep(4)  # not reading: the engine's ~15 MB answer must wait in the engine, not in the worker
        grown = _rss_kib(pids[index]) - before
        received, tail = len(head), head[-64:]
        sock.settimeout(10)
        while received < 40 * 1024 * 1024 and (data := sock.recv(1 << 20)):
            received += len(data)
            tail = (tail + data)[-64:]
    assert received > 8 * 1024 * 1024  # the whole answer came, once read,
    assert tail.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), tail  # to its end
    assert grown < 8 * 1024, f"the worker grew {grown} KiB while its client did not read"


def test_a_worker_killed_holding_granted_tickets_leaves_no_reservation_or_replica_slot(workers):
    body = {**CHAT, "model": "slow", "max_tokens": 40, "stream": True}
    worst = len(json.dumps(body).encode()) + 40
    token = keys_cli(workers, "create", "--name", "held", "--budget-tokens", str(worst + worst // 2))
    headers = {"Authorization": f"Bearer {token}"}

    def slow_inflight() -> int:
        return sum(r["inflight"] for m in workers.status()["models"] if m["name"] == "slow" for r in m["replicas"])

    with httpx.Client(base_url=workers.url, timeout=httpx.Timeout(30, read=10)) as c, \
            c.stream("POST", "/v1/chat/completions", content=json.dumps(body), headers=headers) as r:
        assert r.status_code == 200 and r.headers.get(CARRIED) == "fast"
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert slow_inflight() == 1
        held = post(workers, token, {"model": "slow", "max_tokens": 40})  # the budget is held by the stream
        assert held.status_code == 429, held.text
        os.kill(worker_pids(workers.proc.pid)[int(r.headers[WORKER])], signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    wait_until(lambda: slow_inflight() == 0, 10, what="the dead worker's replica slot back")
    again = post(workers, token, {"model": "slow", "max_tokens": 40})
    assert again.status_code == 200, again.text  # its reservation was settled, not left held
    wait_until(lambda: len(worker_pids(workers.proc.pid)) == 2, 20, what="the worker's replacement")


def _admin(daemon, path: str) -> httpx.Response:
    """An admin POST over the admin socket (keys are required: TCP admin wants a token)."""
    with over_admin_socket(daemon.admin_socket, timeout=30) as c:
        return c.post(f"http://appliance/admin/{path}", json={})


def _cold(daemon) -> dict:
    return next(m for m in daemon.status()["models"] if m["name"] == "cold")


def _unloaded(daemon) -> None:
    assert _admin(daemon, "models/cold/unload").status_code == 200
    wait_until(lambda: _cold(daemon)["replicas"] == [], 20, what="cold unloaded")


def test_requests_held_through_a_cold_start_are_answered_through_the_workers(workers):
    # Held while the model starts, each carried by its worker once a replica is READY:
    # the worker's Finish reaches the grant (the hold's disconnect watcher took none of it).
    token = keys_cli(workers, "create", "--name", "cold-start")
    _unloaded(workers)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(workers, token, {"model": "cold"}, timeout=20), range(3)))
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert {r.headers.get(CARRIED) for r in answers} == {"fast"}
    wait_until(lambda: sum(r["inflight"] for r in _cold(workers)["replicas"]) == 0, 10, what="cold's slots back")


def test_a_held_request_whose_client_leaves_through_a_worker_leaves_no_slot_or_reservation(workers):
    body = {**CHAT, "model": "cold", "max_tokens": 40}
    worst = len(json.dumps(body).encode()) + 40
    token = keys_cli(workers, "create", "--name", "cold-leaver", "--budget-tokens", str(worst + worst // 2))
    _unloaded(workers)
    with pytest.raises(httpx.TimeoutException):  # gone while held (the model takes 2 s to start)
        post(workers, token, {"model": "cold", "max_tokens": 40}, timeout=0.7)
    wait_until(lambda: _cold(workers)["ready"], 20, what="cold ready")
    assert sum(r["inflight"] for r in _cold(workers)["replicas"]) == 0
    again = post(workers, token, {"model": "cold", "max_tokens": 40}, timeout=20)
    assert again.status_code == 200, again.text  # the leaver's reservation was settled, not left held
    wait_until(lambda: sum(r["inflight"] for r in _cold(workers)["replicas"]) == 0, 10, what="cold's slot back")


def _stalled_body(daemon, headers: str, sent: bytes) -> tuple[int, dict[str, str], bytes]:
    """A POST declaring 1000 body bytes that sends only `sent`, then nothing: the answer
    (status, headers, body) that comes without the rest, or a timeout at the client."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
                     f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + sent)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields, body


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return int(head.split("content-length: ", 1)[1].split("\r\n")[0]) if "content-length: " in head else 0


def test_a_body_that_never_arrives_is_answered_408_through_the_workers(workers):
    token = keys_cli(workers, "create", "--name", "trickler")
    status, _, body = _stalled_body(workers, f"Authorization: Bearer {token}\r\n", b'{"model": ')
    assert status == 408, body
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and f"within {BODY_TIMEOUT_S}s" in error["message"]


def test_a_body_that_never_arrives_without_a_key_is_answered_401_at_once_through_the_workers(workers):
    status, _, body = _stalled_body(workers, "", b'{"model": ')
    assert status == 401, body


def test_a_body_declared_too_large_that_never_arrives_is_answered_413_through_the_workers(workers):
    token = keys_cli(workers, "create", "--name", "large-trickler")
    with socket.create_connection(("127.0.0.1", workers.port), timeout=20) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{{}}".encode())
        assert sock.recv(65536).split(b" ", 2)[1] == b"413"


def test_a_body_that_never_starts_is_answered_408_through_the_workers(workers):
    token = keys_cli(workers, "create", "--name", "silent")
    status, _, body = _stalled_body(workers, f"Authorization: Bearer {token}\r\n", b"")
    assert status == 408, body
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_the_workers_408_for_a_body_that_never_starts_names_the_request_id(workers):
    """The worker answers this 408 alone (the daemon never heard of the request): it
    carried no X-Request-Id, unlike every other answer. The client's, by the front
    door's rule (1-128 printable ASCII), else a new one."""
    token = keys_cli(workers, "create", "--name", "silent-id")
    key = f"Authorization: Bearer {token}\r\n"
    status, fields, _ = _stalled_body(workers, f"{key}X-Request-Id: trace-42 a/b\r\n", b"")
    assert status == 408 and fields.get("x-request-id") == "trace-42 a/b", fields
    status, fields, _ = _stalled_body(workers, f"{key}X-Request-Id: {'x' * 129}\r\n", b"")
    assert status == 408 and re.fullmatch("[0-9a-f]{32}", fields.get("x-request-id", "")), fields


class _Frames:
    """A worker's link to the daemon, as the worker writes it: the frames, kept."""

    def __init__(self) -> None:
        self.frames: list = []

    def write(self, frame) -> None:
        self.frames.append(frame)

    async def drain(self) -> None:
        pass


async def _first_piece(came: bool) -> tuple[list, list]:
    """A request on a worker (its clock a seam) whose body's first piece is swept at the
    timeout: came, the piece arrives in that same loop turn, before the request's task
    resumes. The frames the worker sent its daemon, and what it sent its client."""
    settings = WorkerSettings(index=1, header_read_timeout_s=10, max_body_bytes=1 << 20,
                              max_connections_per_replica=4, body_read_timeout_s=BODY_TIMEOUT_S)
    link, sent, now = _Frames(), [], [0.0]
    worker = ClientSide(settings, link, None)  # type: ignore[arg-type]  (no engine called: no session)
    worker.clock = lambda: now[0]
    loop = asyncio.get_running_loop()
    piece, unheard = loop.create_future(), loop.create_future()
    pieces = iter([piece])

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/audio/speech", "query_string": b"",
             "headers": [(b"content-length", b"2")], "client": ("127.0.0.1", 5), "http_version": "1.1"}
    task = asyncio.create_task(worker(scope, lambda: next(pieces, unheard), send))
    await asyncio.sleep(0)  # waiting for its first piece
    now[0] = BODY_TIMEOUT_S
    if came:
        piece.set_result({"type": "http.request", "body": b"{}", "more_body": False})
    worker.sweep()
    for _ in range(3):
        await asyncio.sleep(0)
    for answer in worker.requests.values():  # the daemon's answer, for a request it was passed
        answer.put(None)
    await asyncio.wait_for(task, 2)
    return link.frames, sent


def test_a_body_whose_first_piece_comes_as_the_late_body_sweep_runs_is_passed_on_not_answered_408():
    frames, sent = asyncio.run(_first_piece(came=True))
    assert [type(f).__name__ for f in frames] == ["Request"] and frames[0].body == b"{}", frames
    assert sent == []  # no 408 from the worker: the daemon answers it


def test_a_body_whose_first_piece_is_later_than_the_timeout_is_swept_into_the_workers_408():
    frames, sent = asyncio.run(_first_piece(came=False))
    assert frames == [] and sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"


@pytest.mark.parametrize(("case", "body", "half_close"), CHUNKED, ids=[c[0] for c in CHUNKED])
def test_a_malformed_chunked_body_gets_the_front_doors_400_through_the_workers(workers, case, body, half_close):
    # A chunk size that is not hex ends the body before its first byte: the worker got a
    # disconnect as its first piece and said nothing, so Granian answered its own bare
    # 500 ("Internal server error"), where one process answers a 400 envelope, audited.
    token = keys_cli(workers, "create", "--name", f"chunked-{case}")
    rid = f"chunked-{case}-{time.monotonic_ns()}"
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            f"X-Request-Id: {rid}\r\nConnection: close\r\n\r\n").encode()
    answer = raw_answer(workers.port, head + body, half_close)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "invalid_body" and "chunked" in error["message"]
    wait_until(lambda: db_rows(workers, "SELECT status FROM audit WHERE request_id = ?", rid) == [(400,)], 10,
               what="the audit row")


def test_http2_with_prior_knowledge_is_not_spoken_through_the_workers(workers):
    for _ in range(4):  # new connections: both workers' sockets
        assert not raw_answer(workers.port, H2_PREFACE, half_close=True).startswith(b"\x00\x00")


def test_a_reloads_body_limits_reach_the_running_workers(daemons):
    # server.max_body_bytes and body_read_timeout_s are live settings: one process reads the
    # next body by the reloaded ones. The workers did only once replaced: a body the new
    # limit allows was cut at the old one, and a body that never starts waited the old timeout.
    limits = "workers = 2\nmax_body_bytes = {0}\nmax_upload_bytes = {0}\nbody_read_timeout_s = {1}"
    daemon = daemons.start(fake_model("fake"), server=limits.format(2048, 60))
    daemons.write_config(fake_model("fake"), port=daemon.port, server=limits.format(65536, 1))
    done = _reload_cli(daemon)
    assert done.returncode == 0, done.stderr
    padded = {**CHAT, "model": "fake", "pad": "x" * 10_000}
    with ThreadPoolExecutor(8) as pool:  # on both workers, most likely
        answers = list(pool.map(lambda _: post(daemon, "none", padded), range(8)))
    assert [r.status_code for r in answers] == [200] * 8, answers[0].text
    for _ in range(2):
        status, _, body = _stalled_body(daemon, "", b"")
        assert status == 408 and "within 1s" in json.loads(body)["error"]["message"], body


def test_a_refusal_before_the_whole_body_closes_the_connection_through_the_workers_as_one_processs(workers):
    # One process answers a cross-origin request without reading its body: Granian closes
    # the connection (the rest of the body is never read). Through a worker, the same.
    token = keys_cli(workers, "create", "--name", "cross-site")
    big = json.dumps({**CHAT, "model": "fake", "pad": "x" * 300_000})
    headers = {"Authorization": f"Bearer {token}", "Origin": "http://evil.example", "Content-Type": "application/json"}
    with workers.client() as c:
        r = c.post("/v1/chat/completions", content=big, headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin"
    assert r.headers.get("connection") == "close"


def _answer_then_healthz(daemon, request: bytes) -> tuple[int, dict[str, str], bytes | None]:
    """Sends `request` whole, in one write, then GET /healthz on the same connection:
    the first answer's status and headers, and the second's status line (None: the
    connection was closed after the first answer)."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            data += sock.recv(65536)
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in head[1:])
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            after = sock.recv(65536).split(b"\r\n", 1)[0] or None
        except OSError:  # reset: closed
            after = None
    return int(head[0].split()[1]), fields, after


REFUSED_BEFORE_THE_BODY = [
    ("", 401),  # no key
    ("Authorization: Bearer sk-not-a-key\r\n", 401),
    ("Origin: http://evil.example\r\n", 403),  # cross-origin
    ("Content-Encoding: gzip\r\n", 415),
]


def _refused_before_the_body(headers: str) -> bytes:
    body = b'{"model":"x"}'  # whole, in the same write as the head
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(("headers", "status"), REFUSED_BEFORE_THE_BODY)
def test_a_refusal_made_before_the_body_is_read_closes_the_connection_through_the_workers(workers, headers, status):
    # The front door refuses these before reading the body, and says `connection: close`
    # (one process: the test below). A worker has read the whole body already (the fast
    # path's facts); it must not serve the next request on that connection either (the
    # probe's repro: a keyless POST, then GET /healthz on the same socket, answered 200).
    got, fields, after = _answer_then_healthz(workers, _refused_before_the_body(headers))
    assert got == status
    assert fields.get("connection") == "close" and after is None, after


def test_one_process_closes_the_connection_after_a_refusal_made_before_the_body_is_read(daemons):
    # Granian alone closes it only when the body was not in its buffer yet (it drains one
    # that is): a race the front door's `connection: close` takes away, in both modes.
    single = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n")
    for headers, status in REFUSED_BEFORE_THE_BODY:
        got, fields, after = _answer_then_healthz(single, _refused_before_the_body(headers))
        assert (got, fields.get("connection"), after) == (status, "close", None), headers


def _statuses_expecting_continue(daemon, headers: str) -> list[int]:
    """A POST sent as a client that waits for 100 Continue sends it: its head alone, its
    body only once told to continue. The status lines that came (100 first, if it came)."""
    body = json.dumps({**CHAT, "model": "fake"}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Expect: 100-continue\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        data, statuses = b"", []
        while True:
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, data = data.split(b"\r\n\r\n", 1)
            statuses.append(int(head.split(b" ", 2)[1]))
            if statuses[-1] != 100:
                return statuses
            sock.sendall(body)


@pytest.mark.parametrize(("headers", "status"), REFUSED_BEFORE_THE_BODY)
def test_a_refusal_before_the_body_sends_no_100_continue_through_the_workers_as_one_processs(
    workers, daemons, headers, status
):
    # A worker read the body before the daemon's word, so its server told a client that
    # waits for 100 Continue to send the body, then refused it (a keyless client's body
    # uploaded for nothing); one process refuses it without a 100.
    single = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n")
    assert _statuses_expecting_continue(single, headers) == [status]
    assert _statuses_expecting_continue(workers, headers) == [status]


def test_a_client_expecting_100_continue_is_told_to_send_its_body_and_answered_through_the_workers(workers):
    token = keys_cli(workers, "create", "--name", "expecting")
    assert _statuses_expecting_continue(workers, f"Authorization: Bearer {token}\r\n") == [100, 200]


def test_a_refusal_after_the_body_is_read_keeps_the_connection_through_the_workers(workers):
    token = keys_cli(workers, "create", "--name", "keep-alive")
    body = json.dumps({**CHAT, "model": "nothing-here"}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    got, fields, after = _answer_then_healthz(workers, request)
    assert got == 404 and "connection" not in fields
    assert after == b"HTTP/1.1 200 OK"


def test_a_whole_body_refused_unread_off_the_fast_path_keeps_the_connection_through_the_workers(workers):
    # One process answers a PUT's 405 without reading its body and keeps the connection
    # (Granian drains a body it has whole). Its worker passed the body on "in pieces"
    # (Granian says more_body until it reads past the end), so it closed the connection.
    body = json.dumps({**CHAT, "model": "fake"}).encode()
    request = (f"PUT /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    got, fields, after = _answer_then_healthz(workers, request)
    assert got == 405 and "connection" not in fields
    assert after == b"HTTP/1.1 200 OK"


BURST = 32


def _joiner(port: int) -> socket.socket:
    """What Granian and other servers that share a port do: SO_REUSEPORT, bind, listen."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _workers_of_a_burst(daemon) -> list[str]:
    """BURST connections opened at once (all made before any is used), then one request
    on each: which worker answered each (its x-appliance-worker header)."""
    conns = [socket.create_connection(("127.0.0.1", daemon.port), timeout=30) for _ in range(BURST)]
    try:
        for conn in conns:
            conn.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        heads = [_head(conn) for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    assert all(h.startswith(b"HTTP/1.1 200") for h in heads), heads
    return [h.lower().split(b"\r\nx-appliance-worker: ")[1].split(b"\r\n")[0].decode() for h in heads]


def _head(conn: socket.socket) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got:
        piece = conn.recv(4096)
        assert piece, got
        got += piece
    return got.split(b"\r\n\r\n")[0]


def test_the_connections_of_a_burst_are_spread_over_both_workers(workers):
    # One socket shared by the workers: the first awake often took the whole burst.
    served = _workers_of_a_burst(workers)
    assert set(served) == {"1", "2"}, served


def test_a_process_of_the_daemons_uid_may_join_the_workers_port_but_is_given_no_connection(workers):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain, pytest.raises(OSError) as err:
        plain.bind(("127.0.0.1", workers.port))  # without SO_REUSEPORT: refused
    assert err.value.errno == errno.EADDRINUSE
    # With it, the kernel lets a process of the same uid join the group (another uid is
    # refused); the daemon's program steers only among its own sockets.
    with _joiner(workers.port) as joiner:
        served = _workers_of_a_burst(workers)
        joiner.setblocking(False)
        with pytest.raises(BlockingIOError):
            joiner.accept()
    assert set(served) <= {"1", "2"} and len(served) == BURST


def test_new_connections_go_to_the_live_worker_while_a_killed_one_is_down(daemons):
    daemon = daemons.start(fake_model("fake"), server="workers = 2")
    wait_until(lambda: set(_workers_of_a_burst(daemon)) == {"1", "2"}, 30, what="both workers serving")
    pid = worker_pids(daemon.proc.pid)[1]
    os.kill(pid, signal.SIGKILL)
    # Logged once the daemon saw it exit (and steered new connections off its socket);
    # its replacement comes a second later (it died young), and starts then.
    wait_until(lambda: f"worker 1 (pid {pid}) exited" in daemon.log_text(), 10, what="the daemon to see it")
    assert set(_workers_of_a_burst(daemon)) == {"2"}  # none waits on the dead one's socket
    wait_until(lambda: "1" in _workers_of_a_burst(daemon), 30, what="the replacement to take its share")
    assert worker_pids(daemon.proc.pid)[1] != pid


def test_no_process_can_bind_the_port_of_a_daemon_in_one_process_even_with_so_reuseport(daemons):
    # Granian bound it with SO_REUSEPORT: a process of the daemon's uid could join the
    # port and be handed a share of the clients' connections (their keys).
    daemon = daemons.start(fake_model("fake"))
    for reuse_port in (False, True):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe, pytest.raises(OSError) as err:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
            probe.bind(("127.0.0.1", daemon.port))
        assert err.value.errno == errno.EADDRINUSE
    with daemon.client() as c:
        assert c.post("/v1/chat/completions", json={**CHAT, "model": "fake"}).status_code == 200


def test_the_daemons_death_takes_its_workers_along(daemons):
    daemon = daemons.start(fake_model("fake"), server="workers = 2")
    pids = worker_pids(daemon.proc.pid)
    assert len(pids) == 2
    daemon.terminate(signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 10, what="the workers to die")
    wait_until(lambda: _bindable(daemon.port), 10, what="nothing to hold the port any more")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            import subprocess
            print(subprocess.run(["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True).stdout)
            return False
    return True


def test_sigterm_drains_through_the_workers_and_stops_them(daemons):
    daemon = daemons.start(fake_model("slow", "--chunks", "10", "--chunk-delay", "0.1"), server="workers = 2")
    pids = worker_pids(daemon.proc.pid)
    with daemon.client() as c, c.stream("POST", "/v1/chat/completions",
                                        json={**CHAT, "model": "slow", "stream": True}) as r:
        lines = r.iter_lines()
        first = next(lines)
        daemon.proc.send_signal(signal.SIGTERM)
        rest = list(lines)  # the in-flight stream finishes
    assert first.startswith("data: ") and "data: [DONE]" in rest
    assert daemon.proc.wait(timeout=30) == 0
    assert not any(pid_alive(p) for p in pids.values())


def test_a_reload_changes_policy_in_the_daemon_and_the_workers_serve_it_unchanged(daemons):
    daemon = daemons.start(fake_model("steady"), server="workers = 2")
    pids = worker_pids(daemon.proc.pid)
    daemons.write_config(fake_model("steady") + fake_model("second"), port=daemon.port, server="workers = 2")
    daemon.proc.send_signal(signal.SIGHUP)

    def second_answers() -> bool:
        with daemon.client() as c:
            return c.post("/v1/chat/completions", json={**CHAT, "model": "second"}).status_code == 200

    wait_until(second_answers, 30, what="the reloaded model to answer through the workers")
    assert worker_pids(daemon.proc.pid) == pids  # the workers hold no policy: nothing restarted
    daemons.write_config(fake_model("steady") + fake_model("second"), port=daemon.port, server="workers = 3")
    with over_admin_socket(daemon.admin_socket) as admin:
        refused = admin.post("http://appliance/admin/reload", json={})
    assert refused.status_code >= 400 and "server.workers" in refused.text, refused.text


def test_with_one_worker_no_worker_process_exists(daemons):
    daemon = daemons.start(fake_model("fake"))
    with daemon.client() as c:
        resp = c.post("/v1/chat/completions", json={**CHAT, "model": "fake"})
    assert resp.status_code == 200 and WORKER not in resp.headers
    assert worker_pids(daemon.proc.pid) == {}


@pytest.mark.parametrize("value, message", [
    ("0", "must be 1-64"), ("65", "must be 1-64"), ('"many"', "server.workers"), ("2.5", "server.workers"),
])
def test_a_bad_workers_setting_names_the_field_and_the_fix(value, message):
    with pytest.raises(Exception) as err:
        parse_config(f"[server]\nworkers = {value}\n")
    assert message in str(err.value) and "server.workers" in str(err.value)


def test_auto_workers_is_a_share_of_the_cores():
    auto = ServerConfig(workers="auto")
    assert [worker_count(auto, cores) for cores in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 4]
    assert worker_count(ServerConfig(workers=3), 2) == 3


def test_a_mailbox_reader_cancelled_as_the_next_one_waits_loses_no_frame():
    # The hold's watcher is cancelled (its cancellation runs a turn later) as the grant's
    # reader starts waiting: the Finish that comes next must wake that reader.

    async def attempt(box: Mailbox[str]) -> str:
        watcher = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        watcher.cancel()  # then, in the same turn, the next reader waits
        asyncio.get_running_loop().call_later(0.05, box.put, "finish")
        return await box.get()

    assert asyncio.run(asyncio.wait_for(attempt(Mailbox()), 2)) == "finish"
