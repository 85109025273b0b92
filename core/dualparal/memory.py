"""Peak memory of one rank's run: torch's allocator peak on a GPU (weights included), the peak of
live tensor storage created during the run on a CPU (states, messages, activations; the shared
weights are not counted)."""
from contextlib import contextmanager

import torch

from ..memory.tracker import LiveStorageTracker


@contextmanager
def peak_memory(device: torch.device, stats):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield
        finally:
            stats.peak_bytes = torch.cuda.max_memory_allocated(device)
        return
    tracker = LiveStorageTracker(device.type)
    try:
        with tracker:
            yield
    finally:
        stats.peak_bytes = tracker.peak
