"""LoRA adapters as model names ([[models.adapters]]): config, each engine's argv, what
the engine is sent for an adapter's name, the store's adapters, and the daemon serving
them (fake engines as vLLM and llama-server; the real llama-server with generated LoRA
GGUFs for the bundled SmolLM2)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import httpx
import msgspec
import pytest

from appliance.config import ConfigError, ModelConfig, builtin_model_path, lora_names, parse_config
from appliance.dist.images import default_llama_server
from appliance.errors import BadRequest
from appliance.fleet.engine_access import EngineAccess
from appliance.fleet.lora import LoraServing, adapters_changed, apply_live, resolve
from appliance.fleet.supervisor import Supervisor
from appliance.safe_paths import StoreError
from appliance.store import adapters as on_disk
from appliance.store.sources import incoming_from
from appliance.store.store import Store
from engines import GpuSlot, Lora, ProbeFailed, adapter_for

from . import make_lora_gguf, make_tiny_gguf
from .conftest import FAKE_ENGINE, PY, ROOT, engine_client, free_port, wait_until
from .test_gpu_adapters import pinned_flags

DATA = Path(__file__).parent / "data"
SMOLLM = builtin_model_path("smollm2-135m-instruct")
CHAT = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "temperature": 0}
SLOT = GpuSlot((0,), 0.9)


def peft_dir(base: Path, name: str, rank: int = 8) -> Path:
    """A PEFT LoRA adapter directory, as vLLM and SGLang load one."""
    d = base / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16}))
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return d


def lora_config(server: str, adapters: list[tuple[str, str]], extra: str = "") -> str:
    entries = "".join(f'[[models.adapters]]\nname = "{n}"\nsource = "{s}"\n' for n, s in adapters)
    return f'[[models]]\nname = "base"\nserver = "{server}"\nsource = "/srv/base"\n{extra}{entries}'


# --- config -------------------------------------------------------------------------------


def test_adapters_are_model_names_of_their_base():
    cfg = parse_config(lora_config("vllm", [("sql", "/srv/sql"), ("support", "store:support-lora")]))
    assert {n: m.name for n, m in lora_names(cfg).items()} == {"sql": "base", "support": "base"}
    assert [a.name for a in cfg.models[0].adapters] == ["sql", "support"]


@pytest.mark.parametrize(
    ("server", "adapters", "field", "says"),
    [
        ("vllm", [("base", "/srv/a")], "models[0].adapters[0].name", "already a model or adapter name"),
        ("vllm", [("a", "/srv/a"), ("a", "/srv/b")], "models[0].adapters[1].name", "already a model or adapter"),
        ("vllm", [("bad name", "/srv/a")], "models[0].adapters[0].name", "not a valid model name"),
        ("vllm", [("a", "builtin:smollm2-135m-instruct")], "models[0].adapters[0].source", "store:NAME or the path"),
        ("vllm", [("a", "../../etc")], "models[0].adapters[0].source", "no '..' segments"),
        ("vllm", [("a", "store:../x")], "models[0].adapters[0].source", "appliance models import"),
    ],
)
def test_a_bad_adapter_names_its_file_field_and_fix(server, adapters, field, says):
    with pytest.raises(ConfigError) as err:
        parse_config(lora_config(server, adapters), origin="/etc/appliance/appliance.toml")
    message = str(err.value)
    assert message.startswith("/etc/appliance/appliance.toml: ")
    assert f"field '{field}'" in message and says in message


def test_an_engine_without_lora_refuses_adapters():
    toml = ('[[models]]\nname = "ext"\nserver = "openai"\nurl = "http://127.0.0.1:9/v1"\n'
            '[[models.adapters]]\nname = "a"\nsource = "/srv/a"\n')
    with pytest.raises(ConfigError, match=r"field 'models\[0\].adapters\[0\]': model 'ext' runs on 'openai', "
                                          r"which serves no LoRA adapters"):
        parse_config(toml)


def test_routes_and_fallbacks_may_name_an_adapter_and_a_provider_may_not_take_its_name():
    routes = ('[[routes]]\nname = "r"\nmodel = "support-bot"\ntarget = "sql"\nfallbacks = ["base"]\n'
              '[[routes]]\nname = "r2"\nmodel = "x"\ntarget = "base"\nfallbacks = ["sql"]\n')
    cfg = parse_config(lora_config("vllm", [("sql", "/srv/sql")]) + routes)
    assert cfg.routes[0].target == "sql"
    provider = '[[providers]]\nname = "sql"\nbase_url = "https://example.com/v1"\ncommercial = false\n'
    with pytest.raises(ConfigError, match="already a provider or model name"):
        parse_config(lora_config("vllm", [("sql", "/srv/sql")]) + provider)


# --- engines: argv ------------------------------------------------------------------------


def _access(tmp_path: Path) -> EngineAccess:
    return EngineAccess(secret="s3cr3t-" + "0" * 57, dir=tmp_path)


def _launch(engine: str, tmp_path: Path, loras: tuple[Lora, ...]):
    cfg = parse_config(
        f'[engines.vllm]\ncommand = ["vllm", "serve"]\n[engines.sglang]\ncommand = ["python", "-m", "sglang"]\n'
        f"[engines.llamacpp]\nbinary = \"/usr/bin/llama-server\"\n{lora_config(engine, [])}"
    )
    slot = None if engine == "llamacpp" else SLOT
    return adapter_for(engine).launch(cfg, cfg.models[0], Path("/srv/base"), "127.0.0.1", 9100, slot,
                                      _access(tmp_path), loras=loras)


LORAS = (Lora("sql", Path("/srv/sql"), 8), Lora("support", Path("/srv/support"), 24))


def test_vllm_serves_each_adapter_under_its_name_with_room_for_all_and_the_largest_rank(tmp_path):
    spec = _launch("vllm", tmp_path, LORAS)
    argv = spec.argv
    assert argv[argv.index("--enable-lora"):argv.index("--enable-lora") + 8] == [
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "32", "--lora-modules",
        "sql=/srv/sql", "support=/srv/support"]
    assert {a for a in argv if a.startswith("--")} <= pinned_flags("vllm")
    assert spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    plain = _launch("vllm", tmp_path / "plain", ())
    assert "--enable-lora" not in plain.argv and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.env


def test_sglang_serves_each_adapter_under_its_name(tmp_path):
    argv = _launch("sglang", tmp_path, LORAS).argv
    assert argv[argv.index("--enable-lora"):argv.index("--enable-lora") + 8] == [
        "--enable-lora", "--max-loras-per-batch", "2", "--max-lora-rank", "32", "--lora-paths",
        "sql=/srv/sql", "support=/srv/support"]
    assert {a for a in argv if a.startswith("--")} <= pinned_flags("sglang")


def test_llama_server_loads_every_adapter_at_scale_zero_in_one_list(tmp_path):
    argv = _launch("llamacpp", tmp_path, LORAS).argv
    assert argv[argv.index("--lora-scaled") + 1] == "/srv/sql:0,/srv/support:0"
    assert "--lora" not in argv  # repeated, llama-server keeps only the last one
    assert "--lora-scaled" not in _launch("llamacpp", tmp_path / "plain", ()).argv


# --- what the engine is sent --------------------------------------------------------------


def _serving(server: str) -> LoraServing:
    model = ModelConfig(name="base", server=server, source="/srv/base")
    return LoraServing.of(model, (Lora("sql", Path("/a")), Lora("support", Path("/b"))), {})


def test_vllm_knows_an_adapter_by_its_own_name():
    s = _serving("vllm")
    assert s.fields("sql", "sql", "chat") == {}
    assert s.fields("sql", "support-bot", "chat") == {"model": "sql"}  # a route's name for it
    assert s.fields("base", "base", "chat") == {}


def test_sglang_gets_the_adapter_in_lora_path_so_a_clients_own_never_selects_one():
    s = _serving("sglang")
    assert s.fields("sql", "sql", "chat") == {"lora_path": "sql"}
    assert s.fields("sql", "support-bot", "chat") == {"model": "sql", "lora_path": "sql"}
    # The base clears it: a key allowed only the base cannot pick an adapter by lora_path.
    assert s.fields("base", "base", "chat") == {"lora_path": None}


def test_llama_server_gets_the_base_name_and_exactly_one_adapter_selected():
    s = _serving("llamacpp")
    assert s.fields("support", "support", "chat") == {
        "model": "base", "lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]}
    # The base sets every scale to 0: a client's own "lora" never selects an adapter.
    assert s.fields("base", "base", "completions") == {"lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]}


def test_an_adapter_on_an_endpoint_llama_server_cannot_apply_it_on_is_a_400():
    s = _serving("llamacpp")
    for endpoint in ("messages", "embeddings", "rerank"):
        with pytest.raises(BadRequest, match="LoRA adapter of 'base'"):
            s.fields("sql", "sql", endpoint)
    assert s.fields("base", "base", "messages")["lora"][0]["scale"] == 0.0  # the base is fine


def test_two_adapters_and_their_base_never_share_a_prefix_seed():
    s = _serving("vllm")
    assert s.seed("base") == 0
    assert len({s.seed("base"), s.seed("sql"), s.seed("support")}) == 3


def test_adapters_changed_is_live_only_where_the_engine_loads_adapters_at_run_time():
    def model(server: str, *names: str) -> ModelConfig:
        cfg = parse_config(lora_config(server, [(n, f"/srv/{n}") for n in names]))
        return cfg.models[0]

    assert adapters_changed(model("vllm", "a"), model("vllm", "a")) == "live"
    assert adapters_changed(model("vllm", "a"), model("vllm", "a", "b")) == "live"
    assert adapters_changed(model("vllm"), model("vllm", "a")) == "restart"  # --enable-lora
    assert adapters_changed(model("vllm", "a"), model("vllm")) == "restart"
    assert adapters_changed(model("llamacpp", "a"), model("llamacpp", "a", "b")) == "restart"
    assert adapters_changed(model("sglang", "a"), model("sglang", "b")) == "restart"
    assert adapters_changed(model("llamacpp", "a"), model("llamacpp", "a")) == "live"


def test_a_store_adapter_new_to_a_running_vllm_replica_restarts_it_as_its_engine_may_not_read_it():
    def model(*adapters: tuple[str, str]) -> ModelConfig:
        return parse_config(lora_config("vllm", list(adapters))).models[0]

    old = model(("a", "/srv/a"), ("s", "store:s"))
    assert adapters_changed(old, model(("a", "/srv/a"), ("s", "store:s"), ("t", "store:t"))) == "restart"
    assert adapters_changed(old, model(("s", "store:s"), ("b", "/srv/b"))) == "live"  # a path one, or one it had
    assert adapters_changed(old, model(("a", "/srv/a"), ("renamed", "store:s"))) == "live"


async def test_apply_live_loads_and_unloads_adapters_in_a_running_vllm_replica(tmp_path):
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": "k" * 64, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    proc = subprocess.Popen([PY, str(FAKE_ENGINE), "--as-engine", "vllm", "--port", str(port), "--lora-modules",
                             "sql=/srv/sql", "old=/srv/old"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        headers = {"Authorization": "Bearer " + "k" * 64}
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 20, what="the fake vLLM")
        async with aiohttp.ClientSession(headers=headers) as session:
            replica = SimpleNamespace(loras=(Lora("sql", Path("/srv/sql")), Lora("old", Path("/srv/old"))),
                                      adapter=adapter_for("vllm"), session=session, base_url=url)
            new = (Lora("sql", Path("/srv/sql")), Lora("support", Path("/srv/support")))
            await apply_live(replica, new)
            assert replica.loras == new
            stats = httpx.get(f"{url}/fake/stats", headers=headers).json()
            assert stats["loras"] == {"sql": "/srv/sql", "support": "/srv/support"}
            # The engine refuses (here: "support" is already loaded): the caller restarts the
            # replica, whose next start loads the new set.
            replica.loras = ()
            with pytest.raises(ProbeFailed, match="answered 400"):
                await apply_live(replica, new)
            assert replica.loras == new
    finally:
        proc.kill()
        proc.wait()


def test_apply_live_refuses_an_engine_that_cannot_load_adapters_at_run_time():
    replica = SimpleNamespace(loras=(Lora("a", Path("/a")),), adapter=adapter_for("llamacpp"), session=object(),
                              base_url="http://127.0.0.1:9")
    with pytest.raises(ProbeFailed, match="llamacpp cannot load or unload LoRA adapters at run time"):
        asyncio.run(apply_live(replica, (Lora("b", Path("/b")),)))
    assert replica.loras == (Lora("b", Path("/b")),)  # its restart loads the new set


# --- adapters on disk and in the store ----------------------------------------------------


@pytest.fixture(scope="module")
def lora_ggufs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny llama GGUF and two LoRA adapter GGUFs for it."""
    d = tmp_path_factory.mktemp("lora-gguf")
    base = d / "tiny.gguf"
    make_tiny_gguf.main([str(base)])
    return base, make_lora_gguf.write(base, d / "a.gguf"), make_lora_gguf.write(base, d / "b.gguf", seed=1)


def test_an_adapter_path_is_checked_like_the_stores_imports(tmp_path, lora_ggufs):
    base, a, _ = lora_ggufs
    peft = peft_dir(tmp_path, "peft")
    assert on_disk.checked_path(peft) == peft and on_disk.rank(peft) == 8
    assert on_disk.checked_path(a) == a and on_disk.rank(a) == 0
    with pytest.raises(StoreError, match="not a LoRA GGUF adapter"):
        on_disk.checked_path(base)
    (tmp_path / "link").symlink_to(peft)
    with pytest.raises(StoreError, match="a link"):
        on_disk.checked_path(tmp_path / "link")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (peft / "adapter_model.bin").symlink_to(secret)
    with pytest.raises(StoreError, match="a link out of the adapter's directory"):
        on_disk.checked_path(peft)
    (tmp_path / "not-peft").mkdir()
    with pytest.raises(StoreError, match="no adapter_config.json"):
        on_disk.checked_path(tmp_path / "not-peft")


@pytest.mark.parametrize("links", [{"dangling": "missing.bin"}, {"loop1": "loop2", "loop2": "loop1"}])
def test_a_dangling_or_looping_link_in_an_adapter_directory_is_refused_not_a_crash(tmp_path, links):
    peft = peft_dir(tmp_path, "peft")
    for name, target in links.items():
        (peft / name).symlink_to(target)
    with pytest.raises(StoreError, match=f"{peft}/"):
        on_disk.checked_path(peft)


def test_the_store_imports_an_adapter_hashed_and_recorded_as_one(tmp_path, lora_ggufs):
    base, a, _ = lora_ggufs
    cfg = parse_config(f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n')
    store = Store.from_config(cfg)
    try:
        for path, name in ((peft_dir(tmp_path, "sql-lora"), "sql-lora"), (a, "a-lora"), (base, "tiny")):
            [incoming] = incoming_from(path, name=name)
            store.add(incoming)
        kinds = {r.name: r.kind for r in store.models()}
        assert kinds == {"sql-lora": "adapter", "a-lora": "adapter", "tiny": "model"}
        record = store.need("sql-lora")
        assert {f["path"] for f in record.files} == {"adapter_config.json", "adapter_model.safetensors"}
        assert all(len(f["sha256"]) == 64 for f in record.files)
        # License-gated like weights: an unknown license is served once accepted.
        assert "has license unknown, not in store.allowed_licenses" in store.admission("sql-lora")
        store.accept_license("sql-lora", "operator")
        assert store.admission("sql-lora") is None
    finally:
        store.close()


def test_models_import_and_ls_say_an_adapter_is_one(tmp_path):
    config = tmp_path / "appliance.toml"
    config.write_text(f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n'
                      f'log_dir = "{tmp_path}/log"\n')

    def cli(*args: str) -> str:
        done = subprocess.run([PY, "-m", "appliance.cli", "models", *args, "--config", str(config), "--json"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    [imported] = json.loads(cli("import", str(peft_dir(tmp_path, "sql")), "--name", "sql-lora",
                                "--license", "apache-2.0"))
    assert imported["kind"] == "adapter" and imported["license_ok"]
    listed = {row["name"]: row for row in json.loads(cli("ls"))}
    assert listed["sql-lora"]["kind"] == "adapter"


def test_resolve_serves_the_adapters_that_pass_and_says_why_of_the_others(tmp_path, lora_ggufs):
    base, a, _ = lora_ggufs
    good, licensed = peft_dir(tmp_path, "good"), peft_dir(tmp_path, "licensed")
    (tmp_path / "linked").symlink_to(good)
    cfg = parse_config(
        f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n'
        + lora_config("vllm", [("good", str(good)), ("linked", str(tmp_path / "linked")),
                               ("absent", "store:absent"), ("a-model", "store:tiny"), ("stored", "store:sql-lora"),
                               ("a-gguf", "store:a-lora")])
        + f'[[models.adapters]]\nname = "licensed"\nsource = "{licensed}"\nlicense = "cc-by-nc-4.0"\n'
    )
    store = Store.from_config(cfg)
    for path, name in ((base, "tiny"), (a, "a-lora"), (peft_dir(tmp_path, "sql"), "sql-lora")):
        [incoming] = incoming_from(path, name=name, license="apache-2.0")
        store.add(incoming)
    store.close()
    serving = resolve(cfg, cfg.models[0], lambda: Store.from_config(cfg))
    try:
        assert [(lora.name, lora.rank) for lora in serving.loras] == [("good", 8), ("stored", 0)]
        assert (serving.loras[1].path / "adapter_config.json").is_file()  # the store's snapshot
        assert serving.leases.keys() == {"sql-lora"}
        why = serving.refused
        assert why.keys() == {"linked", "absent", "a-model", "licensed", "a-gguf"}
        assert "a LoRA GGUF is for llamacpp; vllm loads a PEFT adapter directory" in why["a-gguf"]
        assert "a link" in why["linked"] and "not in the store" in why["absent"]
        assert "a model, not a LoRA adapter" in why["a-model"]
        assert "license cc-by-nc-4.0 is not in store.allowed_licenses" in why["licensed"]
        serving.block_store("sql-lora", "model 'sql-lora' is quarantined: a file changed")  # the scrubber
        assert "is quarantined" in serving.refused["stored"] and "good" not in serving.refused
    finally:
        for lease in serving.leases.values():
            lease.close()


# --- the daemon: vLLM (the fake engine) ---------------------------------------------------


def _vllm_daemon(daemons, tmp_path: Path, extra: str = "", routes: str = ""):
    model_dir = tmp_path / "base-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
        "torch_dtype": "bfloat16"}))
    (model_dir / "model.safetensors").write_bytes(b"\0" * 1024)
    sql, support = peft_dir(tmp_path, "sql"), peft_dir(tmp_path, "support", rank=16)
    fake = f'["{PY}", "{FAKE_ENGINE}", "--as-engine", "vllm"]'
    models = (f'[[models]]\nname = "base"\nserver = "vllm"\nsource = "{model_dir}"\nkv_cache_tokens = 4096\n'
              f'[[models.adapters]]\nname = "sql"\nsource = "{sql}"\n'
              f'[[models.adapters]]\nname = "support"\nsource = "{support}"\n'
              f'[[models.adapters]]\nname = "missing"\nsource = "{tmp_path}/nowhere"\n{routes}')
    config = (f'[gpu]\ninventory = "{DATA / "inventory-8xh100.toml"}"\n'
              f"[engines.vllm]\ncommand = {fake}\noverhead_gib = 2\n[audit]\nflush_interval_s = 0.2\n{extra}")
    return daemons.start(models, extra=config), sql, support


def _audit(d, where: str, args: tuple) -> list[tuple]:
    db = Path(d.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db"
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT key_id, route, model, served_by, status FROM audit WHERE {where}", args).fetchall()


def test_an_adapter_is_served_by_its_base_replica_under_its_own_name(daemons, tmp_path):
    d, sql, support = _vllm_daemon(daemons, tmp_path)
    [replica] = d.replicas("base")
    with engine_client(replica) as engine:
        argv = engine.get("/fake/stats").json()["argv"]
    assert argv[argv.index("--lora-modules"):argv.index("--lora-modules") + 3] == [
        "--lora-modules", f"sql={sql}", f"support={support}"]  # "missing" left out, the base served
    with d.client() as c:
        models = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [
            ("base", None), ("sql", "base"), ("support", "base"), ("missing", "base")]
        assert c.get("/v1/models/sql").json()["parent"] == "base"
        resp = c.post("/v1/chat/completions", json={**CHAT, "model": "sql"}, headers={"x-request-id": "lora-1"})
        assert resp.status_code == 200, resp.text
        with engine_client(replica) as engine:
            assert engine.get("/fake/stats").json()["last_body"]["model"] == "sql"
        refused = c.post("/v1/chat/completions", json={**CHAT, "model": "missing"})
        assert refused.status_code == 503 and "adapter 'missing' of model 'base' is not served" in refused.text
        assert c.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    rows = wait_until(lambda: _audit(d, "request_id = ?", ("lora-1",)), 10, what="the audit row")
    assert rows == [(None, None, "sql", "base#0", 200)]
    [base] = [m for m in d.status()["models"] if m["name"] == "base"]
    assert base["adapters"]["sql"] == "" and "is not served" in base["adapters"]["missing"]
    text = subprocess.run([PY, "-m", "appliance.cli", "status", "--config", str(d.config)], capture_output=True,
                          text=True, cwd=ROOT, timeout=30).stdout
    assert "LoRA adapters: sql, support, missing" in text and "adapter 'missing' of model 'base'" in text


def test_a_reload_swaps_a_vllm_models_adapters_without_restarting_its_replica(daemons, tmp_path):
    d, sql, support = _vllm_daemon(daemons, tmp_path)
    [replica] = d.replicas("base")
    extra = peft_dir(tmp_path, "extra")
    config = d.config.read_text()
    assert f'name = "support"\nsource = "{support}"' in config
    d.config.write_text(config.replace(f'name = "support"\nsource = "{support}"',
                                       f'name = "extra"\nsource = "{extra}"'))
    done = subprocess.run([PY, "-m", "appliance.cli", "reload", "--config", str(d.config), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rolling"] == [] and report["changed"] == {"base": ["adapters"]}, report

    def loaded() -> dict:
        with engine_client(replica) as engine:
            return engine.get("/fake/stats").json()["loras"]

    wait_until(lambda: loaded() == {"sql": str(sql), "extra": str(extra)}, 20, what="the new adapter set")
    assert d.replicas("base")[0]["pid"] == replica["pid"]  # swapped in place: no restart
    with d.client() as c:
        assert c.post("/v1/chat/completions", json={**CHAT, "model": "extra"}).status_code == 200
        assert c.post("/v1/chat/completions", json={**CHAT, "model": "support"}).status_code == 404
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "sql", "extra", "missing"]


def test_a_key_restricted_to_an_adapters_route_gets_that_adapter_only(daemons, tmp_path):
    routes = '[[routes]]\nname = "support-bot"\nmodel = "support-bot"\ntarget = "support"\nregulated = true\n'
    d, _, _ = _vllm_daemon(daemons, tmp_path, extra="[keys]\nrequired = true\n", routes=routes)
    made = subprocess.run([PY, "-m", "appliance.cli", "keys", "create", "--name", "bot", "--route", "support-bot",
                           "--config", str(d.config)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert made.returncode == 0, made.stderr
    auth = {"Authorization": f"Bearer {made.stdout.strip()}"}
    [replica] = d.replicas("base")
    with d.client(headers=auth) as c:
        resp = c.post("/v1/chat/completions", json={**CHAT, "model": "support-bot"})
        assert resp.status_code == 200, resp.text
        with engine_client(replica) as engine:
            assert engine.get("/fake/stats").json()["last_body"]["model"] == "support"
        for other in ("base", "sql", "support"):
            denied = c.post("/v1/chat/completions", json={**CHAT, "model": other})
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "route_not_allowed"
    key_id = made.stdout.strip().split("-")[1]
    rows = wait_until(lambda: _audit(d, "key_id = ? AND status = 200", (key_id,)), 10, what="the audit row")
    assert rows == [(key_id, "support-bot", "support-bot", "base#0", 200)]


# --- the daemon: llama-server ------------------------------------------------------------


def fake_llama_server(tmp_path: Path) -> Path:
    script = tmp_path / "fake-llama-server"
    script.write_text(f'#!/bin/sh\nexec "{PY}" "{FAKE_ENGINE}" --as-engine llamacpp "$@"\n')
    script.chmod(0o755)
    return script


def _llama_models(base: Path, a: Path, b: Path) -> str:
    return (f'[[models]]\nname = "base"\nsource = "{base}"\ncontext_length = 2048\nparallel = 2\nthreads = 1\n'
            f'[[models.adapters]]\nname = "lora-a"\nsource = "{a}"\n'
            f'[[models.adapters]]\nname = "lora-b"\nsource = "{b}"\n')


def test_llama_server_gets_the_base_name_and_the_adapter_selected_per_request(daemons, tmp_path, lora_ggufs):
    base, a, b = lora_ggufs
    d = daemons.start(_llama_models(base, a, b),
                      extra=f'[engines.llamacpp]\nbinary = "{fake_llama_server(tmp_path)}"\n')
    [replica] = d.replicas("base")
    with engine_client(replica) as engine:
        argv = engine.get("/fake/stats").json()["argv"]
    assert argv[argv.index("--lora-scaled") + 1] == f"{a}:0,{b}:0"

    def sent(model: str, **extra) -> dict:
        with d.client() as c:
            resp = c.post("/v1/chat/completions", json={**CHAT, "model": model, **extra})
            assert resp.status_code == 200, resp.text
        with engine_client(replica) as engine:
            return engine.get("/fake/stats").json()["last_body"]

    body = sent("lora-b", lora=[{"id": 0, "scale": 1}])  # a client's own choice is replaced
    assert (body["model"], body["lora"]) == ("base", [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}])
    body = sent("base", lora=[{"id": 1, "scale": 1}])
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    with d.client() as c:
        messages = c.post("/v1/messages", json={"model": "lora-a", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 400, messages.text  # llama-server would drop the adapter's choice
    assert "is a LoRA adapter of 'base'" in messages.json()["error"]["message"]


@pytest.mark.e2e
def test_the_real_llama_server_answers_through_each_adapter_by_its_name(daemons, tmp_path):
    missing = [p for p in (default_llama_server(), str(SMOLLM)) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"run ./install.sh --dev first: missing {', '.join(missing)}")
    a = make_lora_gguf.write(SMOLLM, tmp_path / "a.gguf")
    b = make_lora_gguf.write(SMOLLM, tmp_path / "b.gguf", seed=1)
    d = daemons.start(_llama_models(SMOLLM, a, b), wait=False)
    d.wait_ready(timeout=120)

    def answer(model: str) -> str:
        with d.client(timeout=120) as c:
            resp = c.post("/v1/chat/completions", json={**CHAT, "model": model, "max_tokens": 10})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]

    base = answer("base")
    adapted = {answer("lora-a"), answer("lora-b")}
    assert base == answer("base")  # greedy: the same every time
    assert len(adapted) == 2 and base not in adapted  # each adapter, and only it, applied
    assert answer("lora-a") in adapted


def test_an_adapter_set_served_again_releases_the_previous_sets_store_leases(tmp_path):
    """A reload that changes a model's adapters must not keep the old set's store leases:
    a leased entry can be neither removed nor evicted."""
    paths = f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n'
    cfg = parse_config(paths + lora_config("vllm", [("stored", "store:sql-lora")]))
    store = Store.from_config(cfg)
    [incoming] = incoming_from(peft_dir(tmp_path, "sql"), name="sql-lora", license="apache-2.0")
    store.add(incoming)
    sup = Supervisor(cfg, session=None)  # nothing is started: no session needed
    [dep] = sup.deployments.values()
    sup.serve_adapters(dep)
    assert store.in_use("sql-lora") and sup.adapters == {"stored": dep}

    dep.model = msgspec.structs.replace(dep.model, adapters=[])
    sup.serve_adapters(dep)
    assert not store.in_use("sql-lora") and "sql-lora" not in sup.store_leases and sup.adapters == {}
    store.close()
