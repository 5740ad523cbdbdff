"""GPU detection (agent/gpu.py).

This machine has no NVIDIA driver, so the real NVML path is exercised only as "no
driver -> CPU worker". The driver-present cases use a small stand-in for the ``pynvml``
module (the NVIDIA driver cannot be installed here); it answers the same calls with the
same types as nvidia-ml-py does.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import pytest

from agent import gpu as gpu_mod
from agent.config import WorkerSection
from agent.gpu import GpuInfo, _short_name, detect_gpu


@pytest.fixture(autouse=True)
def _fresh_once_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_mod, "_said_no_gpu", False)


def test_no_driver_here_is_a_cpu_worker_said_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rma_agent.gpu")
    assert detect_gpu(WorkerSection()) == GpuInfo("CPU", 0.0, None)
    assert detect_gpu(WorkerSection()) == GpuInfo("CPU", 0.0, None)
    said = [r for r in caplog.records if "CPU worker" in r.getMessage()]
    assert len(said) == 1


def test_config_overrides_win() -> None:
    assert detect_gpu(WorkerSection(gpu="A100", gpu_memory_gb=80)) == GpuInfo("A100", 80.0, None)
    assert detect_gpu(WorkerSection(gpu="L40S")) == GpuInfo("L40S", 0.0, None)
    assert detect_gpu(WorkerSection(gpu_memory_gb=12)) == GpuInfo("CPU", 12.0, None)


@pytest.mark.parametrize(("raw", "short"), [
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("Tesla T4", "T4"), ("NVIDIA A10", "A10"),
    ("NVIDIA L40S", "L40S"), ("Tesla V100-PCIE-32GB", "V100"), ("NVIDIA H200", "H200"),
    ("NVIDIA RTX A6000", "RTX A6000"),
])
def test_marketing_names_are_shortened(raw: str, short: str) -> None:
    assert _short_name(raw) == short


def _stand_in_nvml(name: Any, total_bytes: int, util: int, fail: str = "") -> types.ModuleType:
    """A stand-in for nvidia-ml-py's ``pynvml`` (no NVIDIA driver on this machine)."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def call(what: str, value: Any) -> Any:
        if fail == what:
            raise NVMLError(f"{what} failed")
        return value

    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.nvmlInit = lambda: call("init", None)  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: call("count", 1)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: call("handle", object())  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: call("name", name)  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: call(  # type: ignore[attr-defined]
        "memory", types.SimpleNamespace(total=total_bytes))
    m.nvmlDeviceGetUtilizationRates = lambda h: call(  # type: ignore[attr-defined]
        "util", types.SimpleNamespace(gpu=util))
    return m


def test_driver_present_gives_name_memory_and_utilisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _stand_in_nvml(b"NVIDIA A100-SXM4-80GB", 80 * 2**30, 37))
    assert detect_gpu(WorkerSection()) == GpuInfo("A100", 80.0, 0.37)
    # config memory overrides what NVML says; config name overrides both
    assert detect_gpu(WorkerSection(gpu_memory_gb=40)) == GpuInfo("A100", 40.0, 0.37)
    assert detect_gpu(WorkerSection(gpu="H100")) == GpuInfo("H100", 80.0, 0.37)


def test_utilisation_unavailable_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml",
                        _stand_in_nvml("NVIDIA GeForce RTX 4090", 24 * 2**30, 0, fail="util"))
    assert detect_gpu(WorkerSection()) == GpuInfo("RTX 4090", 24.0, None)


def test_broken_driver_is_a_cpu_worker_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _stand_in_nvml("x", 1, 0, fail="memory"))
    assert detect_gpu(WorkerSection()) == GpuInfo("CPU", 0.0, None)
    assert any("NVML present but failed" in r.getMessage() for r in caplog.records)
