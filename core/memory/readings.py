"""Reads process RAM and per-device VRAM: peaks from torch.cuda statistics, device-wide use from NVML."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import psutil
import torch

GIB = 1024 ** 3


@dataclass
class DeviceMemory:
    device: str
    name: str
    allocated: int
    peak_allocated: int
    reserved: int
    nvml_used: int | None = None
    nvml_total: int | None = None
    nvml_process_used: int | None = None  # this process's share, as the driver counts it


@dataclass
class MemorySnapshot:
    ram_rss: int
    ram_peak: int | None
    devices: list[DeviceMemory] = field(default_factory=list)
    vram_note: str = ""


def _process_ram_peak() -> int | None:
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):  # Windows
        return info.peak_wset
    try:
        import resource
    except ImportError:
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _nvml_usage() -> dict[int, tuple[int, int, int]]:
    """(device-wide used, total, used by this process) bytes per GPU index, or {} without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as error:  # no driver, no library: VRAM from NVML is simply unavailable
        logging.debug("NVML unavailable: %s", error)
        return {}
    try:
        usage = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            mine = sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                       if p.pid == os.getpid())
            usage[index] = (int(info.used), int(info.total), int(mine))
        return usage
    except pynvml.NVMLError as error:  # a device gone or in a bad state: no reading this time
        logging.debug("NVML reading failed: %s", error)
        return {}
    finally:
        pynvml.nvmlShutdown()


def nvml_used() -> int | None:
    """Device-wide VRAM in use (all processes) over all GPUs, from NVML; None without NVML or a GPU."""
    usage = _nvml_usage() if torch.cuda.is_available() else {}
    return sum(used for used, _, _ in usage.values()) if usage else None


def read_memory() -> MemorySnapshot:
    snapshot = MemorySnapshot(ram_rss=psutil.Process().memory_info().rss, ram_peak=_process_ram_peak())
    if not torch.cuda.is_available():
        snapshot.vram_note = "VRAM unavailable: no CUDA device visible to this process"
        return snapshot
    nvml = _nvml_usage()
    if not nvml:
        snapshot.vram_note = "NVML unavailable: device-wide VRAM not reported, torch statistics only"
    for index in range(torch.cuda.device_count()):
        used, total, mine = nvml.get(index, (None, None, None))
        snapshot.devices.append(DeviceMemory(
            device=f"cuda:{index}",
            name=torch.cuda.get_device_name(index),
            allocated=torch.cuda.memory_allocated(index),
            peak_allocated=torch.cuda.max_memory_allocated(index),
            reserved=torch.cuda.memory_reserved(index),
            nvml_used=used,
            nvml_total=total,
            nvml_process_used=mine,
        ))
    return snapshot


def format_summary(snapshot: MemorySnapshot) -> str:
    def gib(n):
        return "n/a" if n is None else f"{n / GIB:.2f} GiB"

    lines = [f"RAM: {gib(snapshot.ram_rss)} now, {gib(snapshot.ram_peak)} peak"]
    for dev in snapshot.devices:
        line = f"{dev.device} ({dev.name}): {gib(dev.allocated)} allocated, {gib(dev.peak_allocated)} peak"
        if dev.nvml_total is not None:
            line += (f", {gib(dev.nvml_used)} of {gib(dev.nvml_total)} used device-wide"
                     f" ({gib(dev.nvml_process_used)} by this process)")
        lines.append(line)
    if snapshot.vram_note:
        lines.append(snapshot.vram_note)
    return "\n".join(lines)
