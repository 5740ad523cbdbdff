"""GPU detection through NVML (``nvidia-ml-py``), overridable from config.

Why NVML and not ``nvidia-smi``: it is one shared library call, no subprocess, and it
also gives utilisation, which feeds the worker record's load. No driver (the common
case on CI and CPU boxes) means a CPU worker; that is said once in the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.config import WorkerSection

log = logging.getLogger("rma_agent.gpu")
_said_no_gpu = False


@dataclass(frozen=True)
class GpuInfo:
    name: str                 # e.g. "A100", "RTX 4090"; "CPU" when there is none
    memory_gb: float          # 0 for CPU workers
    utilization: float | None  # 0..1 from NVML, None when unknown


def _short_name(raw: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'A100'; 'NVIDIA GeForce RTX 4090' -> 'RTX 4090'."""
    name = raw.replace("NVIDIA", "").replace("GeForce", "").replace("Tesla", "").strip()
    for known in ("H200", "H100", "A100", "L40S", "A10", "V100", "RTX 4090", "RTX 3090", "T4"):
        if name.startswith(known):
            return known
    return name.split("-")[0].strip() or raw


def _nvml() -> GpuInfo | None:
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        raw = pynvml.nvmlDeviceGetName(handle)
        raw = raw.decode() if isinstance(raw, bytes) else str(raw)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
        try:
            util: float | None = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
        except Exception:
            util = None
        return GpuInfo(_short_name(raw), round(mem, 1), util)
    except Exception as exc:  # a broken driver must not stop the agent
        log.warning("NVML present but failed: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def detect_gpu(cfg: WorkerSection) -> GpuInfo:
    """Config values win; otherwise NVML; otherwise a CPU worker."""
    global _said_no_gpu
    found = _nvml() if cfg.gpu is None or cfg.gpu_memory_gb is None else None
    if cfg.gpu is not None:
        mem = cfg.gpu_memory_gb if cfg.gpu_memory_gb is not None else (found.memory_gb if found else 0.0)
        return GpuInfo(cfg.gpu, float(mem), found.utilization if found else None)
    if found is not None:
        if cfg.gpu_memory_gb is not None:
            return GpuInfo(found.name, float(cfg.gpu_memory_gb), found.utilization)
        return found
    if not _said_no_gpu:
        log.info("no NVIDIA GPU found through NVML: running as a CPU worker")
        _said_no_gpu = True
    return GpuInfo("CPU", float(cfg.gpu_memory_gb or 0.0), None)
