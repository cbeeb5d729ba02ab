"""`--amp auto` follows the hardware: bf16 only with native support, else a timed probe cached per machine."""
import json

import pytest
import torch

from selflabel import precision
from selflabel.devices import autocast_dtype, precision_name


@pytest.fixture(autouse=True)
def _fresh_choice():
    precision._choose_cached.cache_clear()
    yield
    precision._choose_cached.cache_clear()


def _cpu(monkeypatch, *, capability: str, onednn: bool, flags: set[str] | None):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "mkldnn_bf16", lambda: onednn)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)


def _no_probe(*a, **k):
    raise AssertionError("the probe must not run when the hardware decides")


def test_avx2_without_bf16_runs_fp32(monkeypatch, tmp_path):
    """The issue's laptop: AVX2, oneDNN without bf16 (emulated, 5x slower): auto must mean fp32."""
    monkeypatch.setenv("SELFLABEL_CACHE", str(tmp_path))
    _cpu(monkeypatch, capability="AVX2", onednn=False, flags={"avx2", "fma"})
    monkeypatch.setattr(precision, "probe_bf16_speedup", _no_probe)
    cpu = torch.device("cpu")
    assert precision_name("auto", cpu) == "fp32" and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp32", cpu) is None  # explicit wins


def test_native_bf16_runs_bf16(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFLABEL_CACHE", str(tmp_path))
    _cpu(monkeypatch, capability="AVX512", onednn=True, flags={"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "probe_bf16_speedup", _no_probe)
    assert autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize("speedup, expected", [(0.2, "fp32"), (1.1, "fp32"), (2.5, "bf16")])
def test_doubtful_cpu_is_probed_once_and_cached(monkeypatch, tmp_path, speedup, expected):
    """AVX-512 without the bf16 flag (oneDNN converts): a timed probe decides, cached per machine and torch version."""
    monkeypatch.setenv("SELFLABEL_CACHE", str(tmp_path))
    _cpu(monkeypatch, capability="AVX512", onednn=True, flags={"avx512f"})
    calls = []
    monkeypatch.setattr(precision, "probe_bf16_speedup", lambda: calls.append(1) or speedup)
    cpu = torch.device("cpu")
    assert precision_name("auto", cpu) == expected
    table = json.loads((tmp_path / precision.PROBE_FILE).read_text())
    (entry,) = table.values()
    assert entry["precision"] == expected and entry["bf16_speedup"] == speedup
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write: no temporary left
    precision._choose_cached.cache_clear()  # a new process: the file answers, no second probe
    assert precision_name("auto", cpu) == expected and len(calls) == 1
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another library version probes again
    precision._choose_cached.cache_clear()
    assert precision_name("auto", cpu) == expected and len(calls) == 2
    assert len(json.loads((tmp_path / precision.PROBE_FILE).read_text())) == 2


def test_probe_measures_this_cpu():
    assert precision.probe_bf16_speedup(batch=2, size=32, repeats=1) > 0
    assert "capability" in precision.cpu_summary()
