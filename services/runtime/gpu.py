"""GPU utilization and memory on a worker's /metrics, through NVML, where an NVIDIA GPU and its driver are.

OpenTelemetry's hardware names in Prometheus form, per GPU (`gpu` index, `uuid`): `hw_gpu_utilization_ratio`
(0-1, the driver's last sample period), `hw_gpu_memory_usage_bytes` and `hw_gpu_memory_limit_bytes` (the whole
device), and InferBus's `inferbus_worker_gpu_memory_bytes`: what this worker process holds on it (several workers
may share a GPU). Values are read when /metrics is scraped, never on the request path. Without the NVML library
(no NVIDIA driver: a CPU machine) nothing is exported and the worker logs why, once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge

from services.runtime import logging as log

LABELS = ["gpu", "uuid"]
UTILIZATION = Gauge("hw_gpu_utilization_ratio", "GPU busy fraction over the driver's last sample period", LABELS)
MEMORY_USED = Gauge("hw_gpu_memory_usage_bytes", "GPU memory in use on the device (every process)", LABELS)
MEMORY_LIMIT = Gauge("hw_gpu_memory_limit_bytes", "GPU memory on the device", LABELS)
OWN_MEMORY = Gauge("inferbus_worker_gpu_memory_bytes", "GPU memory this worker process holds", LABELS)

_exported = -1  # GPUs exported by this process; -1: not tried yet


def _read(read: Callable[[], float]) -> Callable[[], float]:
    """`read` for a scrape: NaN when NVML fails then (a GPU fallen off the bus must not break /metrics)."""

    def value() -> float:
        try:
            return float(read())
        except Exception:
            return math.nan

    return value


def export() -> int:
    """Export every NVIDIA GPU's gauges (once per process); how many GPUs (0: none, or no NVML)."""
    global _exported
    if _exported >= 0:
        return _exported
    _exported = 0
    logger = log.get("gpu")
    try:
        import pynvml  # nvidia-ml-py: ctypes over the driver's libnvidia-ml.so

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception as exc:  # no driver library, no device, or a driver too old: no GPU metrics
        logger.info("gpu_metrics_off", reason=str(exc) or type(exc).__name__)
        return 0
    pid = os.getpid()
    for index in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        labels = (str(index), uuid.decode() if isinstance(uuid, bytes) else str(uuid))

        def utilization(h: Any = handle) -> float:
            return float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) / 100

        def used(h: Any = handle) -> float:
            return float(pynvml.nvmlDeviceGetMemoryInfo(h).used)

        def total(h: Any = handle) -> float:
            return float(pynvml.nvmlDeviceGetMemoryInfo(h).total)

        def own(h: Any = handle) -> float:
            return float(sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                             if p.pid == pid))

        for gauge, read in ((UTILIZATION, utilization), (MEMORY_USED, used), (MEMORY_LIMIT, total),
                            (OWN_MEMORY, own)):
            gauge.labels(*labels).set_function(_read(read))
    _exported = count
    logger.info("gpu_metrics_on", gpus=count)
    return count
