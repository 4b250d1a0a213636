"""`appliance export`: every Kubernetes object valid against its target's published schema
(tests/data/k8s), every engine command parsed with the pinned engine's own flag list, the
memory model's figures carried through, for a model on one node and one on several; and
what an export must refuse."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import msgspec
import pytest
import yaml

from appliance.config import parse_config
from appliance.export import render
from appliance.export.source import ExportError, Options, Source, gather
from appliance.gpu.memory import estimate, per_gpu_bytes, read_shape, smallest_shape
from appliance.gpu.probe import SimulatedProbe
from appliance.safe_paths import StoreError
from appliance.store.sources import incoming_from
from appliance.store.store import Store

from .conftest import PY, ROOT
from .test_gpu_adapters import pinned_flags

DATA = Path(__file__).parent / "data"
K8S = DATA / "k8s"
INVENTORY = DATA / "inventory-8xh100.toml"   # 8x H100 80 GiB
VLLM = ["/opt/engines/vllm/bin/vllm", "serve"]
SGLANG = ["/opt/engines/sglang/bin/python", "-m", "sglang.launch_server"]


# --- the published schemas, as the API server applies them ---------------------------------

def _strict(schema):
    """Unknown fields are errors (kubectl's strict validation) unless the schema keeps them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k not in ("enum", "default", "required", "x-kubernetes-validations") else v)
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {name: _strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@cache
def _kubernetes() -> dict:
    definitions = _strict(json.loads((K8S / "kubernetes-1.36.json").read_text())["definitions"])
    # How Kubernetes reads its own special types (the OpenAPI text calls both "string").
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"type": ["integer", "string"]}
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {"type": ["number", "string"]}
    return definitions


CRDS = {("serving.kserve.io/v1alpha2", "LLMInferenceService"): "llminferenceservice-v1alpha2.json",
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
        ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json"}
BUILTIN = {("apps/v1", "Deployment"): "io.k8s.api.apps.v1.Deployment",
           ("v1", "ConfigMap"): "io.k8s.api.core.v1.ConfigMap",
           ("batch/v1", "Job"): "io.k8s.api.batch.v1.Job"}


def _definition(name: str) -> dict:
    return {"$ref": f"#/definitions/{name}", "definitions": _kubernetes()}


@cache
def _validator(api_version: str, kind: str) -> jsonschema.Validator:
    if (api_version, kind) in BUILTIN:
        schema = _definition(BUILTIN[(api_version, kind)])
    else:
        data = json.loads((K8S / CRDS[(api_version, kind)]).read_text())
        assert f"{data['group']}/{data['version']}" == api_version and data["kind"] == kind
        schema = _strict(data["schema"])
    return jsonschema.Draft7Validator(schema)


def k8s_objects(text: str) -> list[dict]:
    """The YAML documents of an export, each one checked as the API server would."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert docs
    meta = jsonschema.Draft7Validator(_definition("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"))
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        assert key in CRDS or key in BUILTIN, f"{key} is not a type the export may write"
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator(*key).iter_errors(doc)]
        errors += [f"metadata {list(e.absolute_path)}: {e.message}" for e in meta.iter_errors(doc["metadata"])]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors[:20])
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


# --- the engines' argument parsers ------------------------------------------------------------

def parse_flags(engine: str, argv: list[str], positional: bool) -> dict[str, list[str]]:
    """argv (after the entry point) split as the pinned engine's parser splits it: every option
    one it has, in the exact spelling the flags file lists; values after their option; vLLM's
    one positional (the model) first, when `positional`."""
    flags = pinned_flags(engine)
    parsed: dict[str, list[str]] = {}
    current = None
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            assert arg in flags, f"{arg} is not an option of {engine}'s pinned version"
            current = parsed.setdefault(arg, [])
        elif current is None:
            assert positional and engine == "vllm" and i == 0, f"stray positional {arg!r} in {argv}"
            parsed["MODEL"] = [arg]
        else:
            current.append(arg)
    return parsed


def one(parsed: dict[str, list[str]], flag: str) -> str:
    [value] = parsed[flag]
    return value


# --- the models ------------------------------------------------------------------------------

def hf_dir(path: Path, seed: bytes = b"w", **shape) -> Path:
    path.mkdir(parents=True)
    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "torch_dtype": "bfloat16", **shape}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model-00001-of-00002.safetensors").write_bytes(hashlib.sha256(seed).digest() * 4096)
    (path / "model-00002-of-00002.safetensors").write_bytes(hashlib.sha256(seed + b"2").digest() * 2048)
    (path / "tokenizer.json").write_text("{}")
    return path


def config_text(tmp_path: Path, models: str, vllm: list[str] = VLLM, sglang: list[str] = SGLANG) -> str:
    return (f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\nlog_dir = "{tmp_path}/log"\n'
            f'[gpu]\ninventory = "{INVENTORY}"\n'
            f"[engines.vllm]\ncommand = {json.dumps(vllm)}\n[engines.sglang]\ncommand = {json.dumps(sglang)}\n"
            + models)


MODELS = """
[[models]]
name = "Small-Chat"
server = "vllm"
source = "store:org/small"
context_length = 4096
parallel = 4
args = ["--enable-lora", "--lora-modules", "sql=/srv/lora/sql", "--max-lora-rank", "16"]
env = { VLLM_LOGGING_LEVEL = "INFO", HF_TOKEN = "hf_never_exported" }
[models.autoscaling]
min_replicas = 2
max_replicas = 3
[[models]]
name = "small-sglang"
server = "sglang"
source = "store:org/small"
[[models]]
name = "on-disk"
server = "vllm"
source = "/srv/models/on-disk"
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A config with GPU models over one store model, on a simulated 8x H100 80 GiB box."""
    tmp = tmp_path_factory.mktemp("export")
    store = Store(tmp / "cache")
    [incoming] = incoming_from(hf_dir(tmp / "src"), name="org/small", license="Apache-2.0")
    store.add(incoming)
    store.close()
    cfg = parse_config(config_text(tmp, MODELS))
    return cfg, SimulatedProbe(INVENTORY).read()


def huge(src: Source, tmp: Path) -> Source:
    """The same deployment for a 405B-parameter model (bf16 weights, sparse on disk): the
    memory model's figures and the smallest shape, over nodes like the box."""
    big = tmp / "huge"
    if not big.exists():
        big.mkdir()
        (big / "config.json").write_text(json.dumps({
            "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
            "head_dim": 128, "torch_dtype": "bfloat16"}))
        with open(big / "model.safetensors", "wb") as f:
            f.truncate(810 * 10**9)
    est = estimate(big, kv_tokens=src.kv_tokens, overhead_bytes=src.estimate.overhead, gpu_count=8)
    shape = smallest_shape(read_shape(big), est, src.node.gpus, src.node.gpu_bytes)
    return dataclasses.replace(src, estimate=est, shape=shape)


@pytest.fixture(scope="module", params=["one node", "several nodes"])
def source(request, box, tmp_path_factory) -> Source:
    cfg, inventory = box
    src = gather(cfg, "Small-Chat", inventory)
    if request.param == "several nodes":
        src = huge(src, tmp_path_factory.mktemp("huge"))
        assert src.shape.nodes > 1
    return src


def sglang_source(box, src: Source) -> Source:
    cfg, inventory = box
    return dataclasses.replace(gather(cfg, "small-sglang", inventory), estimate=src.estimate, shape=src.shape)


def check_memory(src: Source) -> None:
    """The shape holds the model by the memory model, on as few nodes as it can."""
    e, s = src.estimate, src.shape
    need = per_gpu_bytes(e.weights, e.kv_cache, e.overhead, s.tp * s.pp)
    assert need == s.bytes_per_gpu <= src.node.gpu_bytes
    if s.nodes > 1:  # one node fewer would not hold it
        fewer = s.tp * s.pp * (s.nodes - 1) // s.nodes
        assert per_gpu_bytes(e.weights, e.kv_cache, e.overhead, fewer) > src.node.gpu_bytes


# --- KServe -----------------------------------------------------------------------------------

def test_the_kserve_export_is_a_valid_llminferenceservice_with_the_model_s_shape(source):
    check_memory(source)
    docs = by_kind(k8s_objects(render("kserve", source, Options()).document))
    svc = docs["LLMInferenceService"]["spec"]
    s = source.shape
    assert svc["model"] == {"uri": "pvc://appliance-models/org/small", "name": "Small-Chat",
                            "lora": {"adapters": [{"name": "sql", "uri": "pvc://appliance-models/lora/sql"}]}}
    assert svc["parallelism"] == {"tensor": s.tp, **({"pipeline": s.pp} if s.pp > 1 else {})}
    assert svc["replicas"] == 2  # the model's min_replicas
    # The schema's CEL rule: replicas and scaling are exclusive. KServe's webhook: a worker
    # needs pipeline (or data) parallelism, and the workload is one pod per stage.
    assert not ("replicas" in svc and "scaling" in svc)
    assert ("worker" in svc) == (s.pp > 1)
    for pod in [svc["template"], *([svc["worker"]] if "worker" in svc else [])]:
        [main] = pod["containers"]
        assert main["name"] == "main" and main["image"].endswith(f":v{source.engine.version}")
        assert main["resources"]["limits"]["nvidia.com/gpu"] == str(s.tp)
        # KServe's template passes the model, name, port and parallel sizes; the export adds the rest.
        args = parse_flags("vllm", main["args"], positional=False)
        assert "--lora-modules" not in args and one(args, "--max-lora-rank") == "16"
        assert int(one(args, "--kv-cache-memory-bytes")) * s.gpus >= source.estimate.kv_cache
        assert one(args, "--max-model-len") == "4096" and one(args, "--max-num-seqs") == "4"
        check_affinity(pod["affinity"], source)
    check_verify_job(docs, source)


def test_kserve_takes_the_weights_as_an_oci_artifact_named_by_digest(source):
    ref = "registry.airgap.local:5000/models/small@sha256:" + "ab" * 32
    docs = by_kind(k8s_objects(render("kserve", source, Options(oci=ref)).document))
    assert docs["LLMInferenceService"]["spec"]["model"]["uri"] == f"oci://{ref}"
    job = docs["Job"]["spec"]["template"]["spec"]
    assert {"name": "model", "image": {"reference": ref, "pullPolicy": "IfNotPresent"}} in job["volumes"]
    # llm-d mounts the artifact as an image volume; LoRA adapters still come from the claim.
    docs = by_kind(k8s_objects(render("llm-d", source, Options(oci=ref)).document))
    pod = (docs["Deployment"]["spec"]["template"] if "Deployment" in docs
           else docs["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["leaderTemplate"])["spec"]
    assert {"name": "model", "image": {"reference": ref, "pullPolicy": "IfNotPresent"}} in pod["volumes"]
    assert {"name": "lora", "persistentVolumeClaim": {"claimName": "appliance-models", "readOnly": True}} \
        in pod["volumes"]
    args = engine_args(source, pod["containers"][0])
    assert one(args, "MODEL") == "/mnt/models/models" and args["--lora-modules"] == ["sql=/mnt/lora/sql"]


@pytest.mark.parametrize("ref", ["registry.local/models/small:v1", "registry.local/models/small",
                                 "registry.local/models/small@sha256:abc", "Registry/x@sha256:" + "a" * 64])
def test_an_oci_artifact_named_by_a_tag_is_refused(source, ref):
    with pytest.raises(ExportError, match="by digest"):
        render("kserve", source, Options(oci=ref))


def test_kserve_refuses_an_sglang_model_naming_the_targets_that_take_it(box, source):
    with pytest.raises(ExportError, match="--to llm-d or --to sglang-multinode"):
        render("kserve", sglang_source(box, source), Options())


# --- llm-d ------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_the_llm_d_export_is_model_servers_and_an_inference_pool_selecting_their_leaders(box, source, engine):
    src = source if engine == "vllm" else sglang_source(box, source)
    docs = by_kind(k8s_objects(render("llm-d", src, Options()).document))
    s = src.shape
    pool = docs["InferencePool"]["spec"]
    # The pool's CEL rules: the endpoint picker's port is given for a Service; ports are unique.
    assert pool["endpointPickerRef"].get("kind", "Service") != "Service" or "port" in pool["endpointPickerRef"]
    assert len({p["number"] for p in pool["targetPorts"]}) == len(pool["targetPorts"])
    if s.pp == 1:
        workload = docs["Deployment"]["spec"]
        assert "LeaderWorkerSet" not in docs
        leader, workers = workload["template"], None
        assert workload["selector"]["matchLabels"].items() <= leader["metadata"]["labels"].items()
    else:
        lws = docs["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
        assert "Deployment" not in docs and lws["size"] == s.pp
        leader, workers = lws["leaderTemplate"], lws["workerTemplate"]
        assert not selects(pool["selector"], workers["metadata"]["labels"])
    assert selects(pool["selector"], leader["metadata"]["labels"])
    [c] = leader["spec"]["containers"]
    assert [p["containerPort"] for p in c["ports"]] == [p["number"] for p in pool["targetPorts"]]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(s.tp)
    check_affinity(leader["spec"]["affinity"], src)
    leader_args = engine_args(src, c)
    if engine == "vllm":
        assert one(leader_args, "MODEL") == "/mnt/models/org/small"
        assert leader_args["--lora-modules"] == ["sql=/mnt/models/lora/sql"]
    else:
        assert one(leader_args, "--model-path") == "/mnt/models/org/small"
    if workers is not None:
        [w] = workers["spec"]["containers"]
        worker_args = engine_args(src, w)
        assert "--host" not in worker_args and "ports" not in w
        rank = "--node-rank"
        assert one(leader_args, rank) == "0" and one(worker_args, rank) == "$(LWS_WORKER_INDEX)"
        if engine == "vllm":
            assert "--headless" in worker_args and "--headless" not in leader_args
            assert one(worker_args, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
            assert one(worker_args, "--nnodes") == str(s.pp)
        else:
            assert one(worker_args, "--dist-init-addr").startswith("$(LWS_LEADER_ADDRESS):")
    check_verify_job(docs, src)


def selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def engine_args(src: Source, container: dict) -> dict[str, list[str]]:
    """A container's argv, parsed with its engine's pinned flags, the parallel layout checked."""
    engine = src.engine.engine
    assert container["command"] == (["vllm", "serve"] if engine == "vllm" else ["python3", "-m", "sglang.launch_server"])
    args = parse_flags(engine, container["args"], positional=True)
    tp, pp = ("--tensor-parallel-size", "--pipeline-parallel-size") if engine == "vllm" else ("--tp-size", "--pp-size")
    assert (one(args, tp), one(args, pp)) == (str(src.shape.tp), str(src.shape.pp))
    assert one(args, "--served-model-name") == src.model.name
    return args


def check_affinity(affinity: dict, src: Source) -> None:
    """Only nodes whose GPUs hold what one GPU needs."""
    [term] = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    [rule] = term["matchExpressions"]
    assert rule["key"] == "nvidia.com/gpu.memory" and rule["operator"] == "Gt"
    assert (int(rule["values"][0]) + 1) * 1024**2 >= src.shape.bytes_per_gpu > int(rule["values"][0]) * 1024**2


def check_verify_job(docs: dict[str, dict], src: Source) -> None:
    """The Job checks the cluster's copy against exactly the store's files and hashes."""
    sums = docs["ConfigMap"]["data"]["SHA256SUMS"]
    assert sums == "".join(f"{_sha256(src.weights_dir / f.path)}  {f.path}\n" for f in src.manifest.files)
    job = docs["Job"]["spec"]["template"]["spec"]
    [check] = job["containers"]
    assert check["command"][0] == "sha256sum" and check["command"][-1].endswith("/SHA256SUMS")
    assert job["securityContext"]["runAsNonRoot"] and job["automountServiceAccountToken"] is False
    assert all(m.get("readOnly") for m in check["volumeMounts"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- vLLM and SGLang multi-node -------------------------------------------------------------

@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_multinode_scripts_parse_with_the_pinned_engine_and_give_each_node_its_rank(box, source, engine):
    src = source if engine == "vllm" else sglang_source(box, source)
    out = render(f"{engine}-multinode", src, Options(head_address="10.1.0.1", interface="ib0"))
    n, s = src.shape.nodes, src.shape
    scripts = [out.files[f"node-{rank}.sh"] for rank in range(n)]
    assert set(out.files) == {*(f"node-{r}.sh" for r in range(n)), "SHA256SUMS", "README.md"}
    assert out.executable == {f"node-{r}.sh" for r in range(n)}
    for rank, script in enumerate(scripts):
        env, argv = exec_line(script)
        command = VLLM if engine == "vllm" else SGLANG
        assert argv[:len(command)] == command
        args = parse_flags(engine, argv[len(command):], positional=True)
        tp, pp = ("--tensor-parallel-size", "--pipeline-parallel-size") if engine == "vllm" else ("--tp-size", "--pp-size")
        assert (one(args, tp), one(args, pp)) == (str(s.tp), str(s.pp))
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, range(s.gpus_per_node)))
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"
        assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env
        # The head alone serves the API, on the private address.
        assert ("--host" in args) == (rank == 0) and ("--port" in args) == (rank == 0)
        if rank == 0:
            assert one(args, "--host") == "10.1.0.1"
        if n > 1:
            assert one(args, "--nnodes") == str(n) and one(args, "--node-rank") == str(rank)
            if engine == "vllm":
                assert one(args, "--master-addr") == "10.1.0.1"
                assert one(args, "--distributed-executor-backend") == "mp"
                assert ("--headless" in args) == (rank > 0)
            else:
                assert one(args, "--dist-init-addr") == "10.1.0.1:29500"
        if engine == "sglang":
            assert int(one(args, "--max-total-tokens")) == src.kv_tokens
            fraction = float(one(args, "--mem-fraction-static"))
            assert s.bytes_per_gpu <= fraction * src.node.gpu_bytes < s.bytes_per_gpu + 0.01 * src.node.gpu_bytes
    readme = out.files["README.md"]
    assert "private network" in readme and "in the clear, without authentication" in readme
    assert 'url = "http://10.1.0.1:8000/v1"' in readme
    assert out.files["SHA256SUMS"] == "".join(f"{_sha256(src.weights_dir / f.path)}  {f.path}\n"
                                              for f in src.manifest.files)
    assert "hf_never_exported" not in "".join(out.files.values())


def exec_line(script: str) -> tuple[dict[str, str], list[str]]:
    """The environment a node script exports and the argv it execs."""
    env, argv = {}, None
    for line in script.splitlines():
        if line.startswith("export "):
            key, value = shlex.split(line[len("export "):])[0].split("=", 1)
            env[key] = value
        elif line.startswith("exec "):
            argv = shlex.split(line)[1:]
    assert argv is not None
    return env, argv


def test_a_node_script_starts_the_engine_only_on_the_store_s_exact_weights(box, tmp_path):
    cfg, inventory = box
    src = gather(cfg, "Small-Chat", inventory, nodes=2)
    copy = tmp_path / "weights"
    copy.mkdir()
    for f in src.manifest.files:
        (copy / f.path).write_bytes((src.weights_dir / f.path).read_bytes())
    probe = tmp_path / "started"
    # The engine: a stand-in that records that it was started.
    pin = dataclasses.replace(src.engine, command=("/bin/sh", "-c", f"touch {probe}", "engine"))
    out = render("vllm-multinode", dataclasses.replace(src, engine=pin),
                 Options(head_address="127.0.0.1", weights_dir=str(copy)))
    script = tmp_path / "node-1.sh"
    script.write_text(out.files["node-1.sh"])
    ok = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and probe.exists(), ok.stderr
    probe.unlink()
    shard = copy / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    bad = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and not probe.exists()
    assert "model-00002-of-00002.safetensors: FAILED" in bad.stdout + bad.stderr


# --- what an export refuses ---------------------------------------------------------------------

def test_a_model_outside_the_store_has_no_manifest_to_hand_on(box):
    cfg, inventory = box
    with pytest.raises(ExportError, match="appliance models import"):
        gather(cfg, "on-disk", inventory)


def test_a_quarantined_model_is_not_exported(box, tmp_path):
    cfg, inventory = box
    record = Store.from_config(cfg).need("org/small")
    blob = Store.from_config(cfg).snapshot_dir(record) / "tokenizer.json"
    target = blob.resolve()
    original = target.read_bytes()
    os.chmod(target, 0o644)
    try:
        target.write_bytes(b'{"changed": true}')
        with pytest.raises(ExportError, match="quarantined"):
            gather(cfg, "Small-Chat", inventory)
    finally:
        target.write_bytes(original)
        os.chmod(target, 0o444)
        Store.from_config(cfg).verify("org/small")   # restored: ready again for the other tests


@pytest.mark.parametrize(("options", "message"), [
    (Options(), "--head-address"),
    (Options(head_address="10.0.0.1; rm -rf /"), "not a hostname"),
    (Options(head_address="10.0.0.1", interface="eth0 && x"), "interface"),
    (Options(head_address="10.0.0.1", weights_dir="relative/dir"), "absolute path"),
])
def test_multinode_options_are_checked_before_anything_is_written(source, options, message):
    with pytest.raises(ExportError, match=message):
        render("vllm-multinode", source, options)


@pytest.mark.parametrize("pvc", ["Claim", "claim/../etc", "claim//x/../y", "-claim"])
def test_a_pvc_outside_a_claim_s_tree_is_refused(source, pvc):
    with pytest.raises(ExportError, match="--pvc"):
        render("llm-d", source, Options(pvc=pvc))


def test_the_multinode_target_must_be_the_model_s_engine(source):
    with pytest.raises(ExportError, match="--to vllm-multinode"):
        render("sglang-multinode", source, Options(head_address="10.0.0.1"))


def test_export_cli_writes_every_file_whole_or_prints_the_document(box, tmp_path):
    cfg, _ = box
    config = tmp_path / "appliance.toml"
    config.write_text(config_text(Path(cfg.paths.state_dir).parent, MODELS))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "appliance.cli", "export", "Small-Chat", "--config", str(config), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    printed = cli("--to", "llm-d")
    assert printed.returncode == 0, printed.stderr
    k8s_objects(printed.stdout)
    out = cli("--to", "vllm-multinode", "--nodes", "2", "--head-address", "10.0.0.1", "-o", f"{tmp_path}/out/")
    assert out.returncode == 0, out.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["README.md", "SHA256SUMS", "node-0.sh", "node-1.sh"]
    assert os.stat(tmp_path / "out" / "node-1.sh").st_mode & 0o111
    single = cli("--to", "kserve", "-o", str(tmp_path / "svc.yaml"))
    assert single.returncode == 0 and k8s_objects((tmp_path / "svc.yaml").read_text())
    refused = cli("--to", "vllm-multinode")
    assert refused.returncode == 1 and "--head-address" in refused.stderr and not refused.stdout


def test_a_model_no_shape_holds_is_refused_naming_the_nodes_it_assumed(box):
    cfg, inventory = box
    with pytest.raises(ExportError, match=r"does not fit on 1 node\(s\) of 8x H100 0\.1 GiB"):
        gather(cfg, "Small-Chat", inventory, nodes=1, gpu_gib=0.1)


def test_the_memory_model_is_carried_into_every_export(box):
    cfg, inventory = box
    src = gather(cfg, "Small-Chat", inventory)
    check_memory(src)
    # One GPU holds the small model, as the box's placer would put it.
    assert (src.shape.nodes, src.shape.tp, src.shape.pp) == (1, 1, 1)
    assert src.shape.bytes_per_gpu == src.estimate.per_gpu[1]
    assert src.estimate.kv_cache == 4096 * 4 * 32 * 8 * 128 * 2 * 2   # tokens x layers x KV heads x dim x K,V x bf16


def test_the_schema_check_refuses_what_the_api_server_would(source):
    """The harness itself: typos, wrong types and stray fields in each kind are caught."""
    docs = {d["kind"]: d for target in ("kserve", "llm-d")
            for d in k8s_objects(render(target, source, Options()).document)}
    workload = docs.get("Deployment") or docs["LeaderWorkerSet"]
    mutations = [
        (docs["LLMInferenceService"], lambda d: d["spec"]["parallelism"].update(tensorParallel=8)),
        (docs["LLMInferenceService"], lambda d: d["spec"].update(replicas="2")),
        (docs["InferencePool"], lambda d: d["spec"].pop("targetPorts")),
        (docs["ConfigMap"], lambda d: d.update(data={"SHA256SUMS": 1})),
        (docs["Job"], lambda d: d["spec"]["template"]["spec"]["containers"][0].update(comand=["sh"])),
        (workload, lambda d: d["metadata"].update(labels={"bad label!": "x"}) or d["spec"].update(replica=1)),
    ]
    for doc, mutate in mutations:
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(AssertionError):
            k8s_objects(yaml.safe_dump(bad))


def test_a_file_name_that_would_break_out_of_the_manifest_is_refused(tmp_path):
    """A store file named with a newline would end its SHA256SUMS line, and could end the node
    script's here-document and run what follows on every node. The store refuses such a name at
    import (appliance/safe_paths.py), so no manifest an export reads can hold one."""
    evil = "a\nSHA256SUMS\ntouch pwned\n: "
    model = hf_dir(tmp_path / "src")
    (model / evil).write_text("x")
    store = Store(tmp_path / "cache")
    with pytest.raises(StoreError, match="control character"):
        store.add(*incoming_from(model, name="org/evil", license="Apache-2.0"))
    assert "org/evil" not in {m.name for m in store.models()}
    store.close()


def test_an_env_name_that_is_not_a_variable_name_is_refused_not_written_into_a_script(source):
    hostile = dataclasses.replace(source, model=msgspec.structs.replace(
        source.model, env={"X=1; touch pwned; Y": "v"}))
    for target, options in (("vllm-multinode", Options(head_address="10.0.0.1")), ("llm-d", Options())):
        with pytest.raises(ExportError, match="not an environment variable name"):
            render(target, hostile, options)


def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback(box, tmp_path):
    cfg, _ = box
    config = tmp_path / "appliance.toml"
    config.write_text(config_text(Path(cfg.paths.state_dir).parent, MODELS))
    out = subprocess.run([PY, "-m", "appliance.cli", "export", "Small-Chat", "--to", "kserve", "--config",
                          str(config), "-o", str(tmp_path / "missing" / "svc.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("Error: cannot write ") and "No such file or directory" in out.stderr
