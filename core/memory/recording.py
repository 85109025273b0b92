"""A memory recording of one run of many steps (a ComfyUI prompt of many nodes): a sampler thread
takes RAM and VRAM samples while it runs, and each step gets its exact VRAM peak from torch.cuda's
peak statistics (reset when the step starts) and its RAM peak from the samples taken during it."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import psutil
import torch

from .readings import GIB, nvml_used

SAMPLE_SECONDS = 0.1

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step_id: str
    label: str
    started: float
    finished: Optional[float] = None
    ram_peak: int = 0
    vram_peak: Optional[int] = None  # bytes allocated by torch, over all CUDA devices; None without CUDA
    vram_after: Optional[int] = None


@dataclass
class Sample:
    t: float
    ram: int
    vram: Optional[int]  # torch-allocated bytes over all CUDA devices
    vram_device: Optional[int]  # device-wide use from NVML (all processes)
    step_id: Optional[str]


@dataclass
class Recording:
    """Samples and step records of one run; `t` is seconds since the run started."""
    run_id: str
    started: float = field(default_factory=time.time)
    samples: list[Sample] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    vram_note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def peaks(self) -> dict:
        ram = max([s.ram for s in self.samples] + [r.ram_peak for r in self.steps], default=0)
        vram = [r.vram_peak for r in self.steps if r.vram_peak is not None]
        return {"ram": ram, "vram": max(vram) if vram else None}

    def summary(self) -> str:
        def gib(n):
            return f"{n / GIB:.2f} GiB"

        peaks = self.peaks()
        lines = [f"peak RAM {gib(peaks['ram'])}" + (f", peak VRAM {gib(peaks['vram'])}" if peaks["vram"] is not None
                                                   else f"; {self.vram_note}")]
        for record in self.steps:
            line = f"{record.label}: RAM {gib(record.ram_peak)}"
            if record.vram_peak is not None:
                line += f", VRAM {gib(record.vram_peak)} peak"
            if record.finished is not None:
                line += f", {record.finished - record.started:.2f} s"
            lines.append(line)
        return "\n".join(lines)


def _cuda_devices() -> range:
    return range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)


class Recorder:
    """Records one run. `on_samples(list[Sample])` gets the new samples about every
    `publish_seconds` (from the sampler thread)."""

    def __init__(self, run_id: str, on_samples: Callable[[list], None] = lambda samples: None,
                 publish_seconds: float = 0.5):
        self.recording = Recording(run_id)
        if not torch.cuda.is_available():
            self.recording.vram_note = "VRAM unavailable: no CUDA device visible to this process"
        self._on_samples, self._publish_seconds = on_samples, publish_seconds
        self._current: Optional[StepRecord] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="streamline-memory-sampler", daemon=True)

    def __enter__(self) -> "Recorder":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._current is not None:
            self.finish_step(self._current.step_id)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def start_step(self, step_id: str, label: str):
        with self._lock:
            if self._current is not None:
                self._finish_locked()
            for index in _cuda_devices():
                torch.cuda.reset_peak_memory_stats(index)
            self._current = StepRecord(step_id, label, self._now(), ram_peak=psutil.Process().memory_info().rss)
            self.recording.steps.append(self._current)

    def finish_step(self, step_id: str):
        with self._lock:
            if self._current is not None and self._current.step_id == step_id:
                self._finish_locked()

    def _finish_locked(self):
        record, self._current = self._current, None
        record.finished = self._now()
        record.ram_peak = max(record.ram_peak, psutil.Process().memory_info().rss)
        devices = _cuda_devices()
        if devices:
            record.vram_peak = sum(torch.cuda.max_memory_allocated(i) for i in devices)
            record.vram_after = sum(torch.cuda.memory_allocated(i) for i in devices)

    def _now(self) -> float:
        return time.time() - self.recording.started

    def sample(self) -> Sample:
        devices = _cuda_devices()
        with self._lock:
            sample = Sample(self._now(), psutil.Process().memory_info().rss,
                            sum(torch.cuda.memory_allocated(i) for i in devices) if devices else None,
                            nvml_used(), self._current.step_id if self._current else None)
            if self._current is not None:
                self._current.ram_peak = max(self._current.ram_peak, sample.ram)
            self.recording.samples.append(sample)
        return sample

    def _sample_loop(self):
        """Samples until stopped. A failing reading or publisher is logged once and skipped: the thread
        keeps going and never takes the run down with it."""
        pending, published, failed = [], time.monotonic(), set()

        def guarded(what, function, *args):
            try:
                return function(*args)
            except Exception:
                if what not in failed:
                    failed.add(what)
                    log.exception("memory recording: %s failed (logged once per run)", what)
                return None

        while True:
            sample = guarded("taking a sample", self.sample)
            if sample is not None:
                pending.append(sample)
            if time.monotonic() - published >= self._publish_seconds or self._stop.is_set():
                if pending:
                    guarded("publishing samples", self._on_samples, pending)
                pending, published = [], time.monotonic()
            if self._stop.wait(SAMPLE_SECONDS):
                if pending:
                    guarded("publishing samples", self._on_samples, pending)
                return
