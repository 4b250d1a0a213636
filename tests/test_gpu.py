"""The GPU probe: simulated inventories, and NVML's failures as values."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pynvml
import pytest

from appliance.gpu.probe import GiB, NvmlProbe, SimulatedProbe, gpu_kind, kinds_match, load_inventory

DATA = Path(__file__).parent / "data"


def test_a_simulated_8x_h100_inventory_with_two_half_used_gpus():
    inv = SimulatedProbe(DATA / "inventory-8xh100.toml").read()
    assert len(inv.gpus) == 8 and not inv.cpu_only
    assert {g.kind for g in inv.gpus} == {"H100"}
    assert [g.free_bytes // GiB for g in inv.gpus] == [40, 40, 80, 80, 80, 80, 80, 80]
    assert inv.gpus[0].processes[0].pid == 4242
    assert inv.process_bytes() == {4242: 40 * GiB, 4243: 40 * GiB}
    assert inv.gpus[0].used_by({4242}) == 40 * GiB and inv.gpus[0].used_by({1}) == 0
    assert len({g.uuid for g in inv.gpus}) == 8


def test_a_json_inventory_of_mixed_kinds():
    inv = load_inventory(DATA / "inventory-mixed.json")
    assert [g.kind for g in inv.gpus] == ["A100", "A100", "L40S"]
    assert inv.gpus[2].free_bytes == 40 * GiB


@pytest.mark.parametrize(("text", "error"), [
    ('[[gpu]]\nname = "x"\n', "Object missing required field `memory_gib` - at `$.gpu[0]`"),
    ('[[gpu]]\nname = "x"\nmemory_gib = 8\n[[process]]\ngpu = 3\nused_gib = 1\n', "process[0].gpu must be 0-0"),
    ("[[gpu]\n", "not a valid inventory"),
])
def test_a_bad_inventory_says_what_is_wrong(tmp_path, text, error):
    path = tmp_path / "inv.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(error)) as info:
        load_inventory(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(("text", "error"), [
    ("gpu = 5\n", "Expected `array`, got `int` - at `$.gpu`"),
    ('[[gpu]]\nname = "x"\nmemory_gib = 80\ncount = 1000000000\n', "Expected `int` <= 4096 - at `$.gpu[0].count`"),
    ('[[gpu]]\nname = "x"\nmemory_gib = inf\n', "at `$.gpu[0].memory_gib`"),
    ('[[gpu]]\nname = "x"\nmemory_gib = -8\n', "Expected `float` > 0.0 - at `$.gpu[0].memory_gib`"),
    ('[[gpu]]\nname = "x"\nmemory_gib = 8\n[[process]]\ngpu = 0\n', "missing required field `used_gib`"),
    ("x = " + "[" * 50_000 + "]" * 50_000 + "\n", "not a valid inventory"),
])
def test_an_inventory_of_wrong_types_or_ranges_is_a_line_naming_the_field_not_a_traceback(tmp_path, text, error):
    """`plan --inventory` and `serve` with gpu.inventory: a wrong type was a TypeError or
    KeyError traceback, a count of 10**9 a list that long, inf an OverflowError."""
    path = tmp_path / "inv.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(error)) as info:
        load_inventory(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(("name", "kind"), [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"), ("Tesla T4", "T4"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-ADA"), ("Some Future GPU", "Some Future GPU"),
])
def test_gpu_kinds_come_from_nvml_names(name, kind):
    assert gpu_kind(name) == kind


def test_kinds_match_any_or_the_same_family():
    assert kinds_match("any", "H100") and kinds_match(None, "A100")
    assert kinds_match("h100", "H100") and not kinds_match("H100", "H200")


def test_without_the_nvml_library_the_probe_says_cpu_only_once(monkeypatch, caplog):
    def missing():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    probe = NvmlProbe()
    with caplog.at_level(logging.WARNING, logger="appliance.gpu"):
        first, second = probe.read(), probe.read()
    assert first.cpu_only and second.cpu_only
    assert "NVMLError_LibraryNotFound" in first.error
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "running CPU-only" in lines[0]


def test_an_nvml_failure_while_reading_is_a_value_not_a_crash(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)

    def broken():
        raise pynvml.NVMLError_GpuIsLost()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", broken)
    inv = NvmlProbe().read()
    assert inv.cpu_only and "NVML read failed" in inv.error and "GpuIsLost" in inv.error
