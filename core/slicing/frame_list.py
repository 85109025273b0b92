"""A video activation held as one tensor per frame, and the grouped video ResBlock over it.

A frame-local stage replaces the frames one by one, so a level's input shrinks while its (larger)
output grows; a temporal stage gathers a width strip of every frame and writes it back in place.
No activation is ever held twice.
"""
from typing import Callable, Optional

import torch

from .settings import SliceSettings
from .slices import chain, chunk_slices
from .temporal import TemporalResBlockStrips


def frame_rows(x: torch.Tensor) -> list:
    """The frames of a (batch*frames, ...) tensor as one-frame views."""
    # plain slices, not split(): outside inference mode autograd forbids writing into split() views
    return [x[i:i + 1] for i in range(x.shape[0])]


class FrameList:
    """A (batch*frames, C, H, W) activation held as one tensor per frame, on the compute device or,
    with `store` (host memory), off it: each chunk or strip then visits the compute device only
    while it is worked on."""

    def __init__(self, x: torch.Tensor, timesteps: Optional[int], store: Optional[torch.device] = None):
        self.device = x.device
        self.store = store or x.device
        self.timesteps = timesteps or x.shape[0]
        self.frames = self._keep(x)

    def _keep(self, y: torch.Tensor) -> list:
        return frame_rows(y.to(self.store))

    def map_frames(self, fn: Callable, chunks: int):
        """frames[s] = fn(cat(frames[s]), s) per chunk; each chunk's input is dropped before the next."""
        for s in chunk_slices(len(self.frames), chunks):
            xs = self.frames[s.start] if s.stop - s.start == 1 else torch.cat(self.frames[s])
            self.frames[s] = [None] * (s.stop - s.start)
            y = fn(xs.to(self.device), s)
            del xs
            self.frames[s] = self._keep(y)
            del y

    def apply_whole(self, fn: Callable):
        """For modules that are not known to be frame-local: the whole tensor at once."""
        whole = torch.cat(self.frames).to(self.device)
        self.frames.clear()
        self.frames.extend(self._keep(fn(whole)))

    def strip(self, s: slice) -> torch.Tensor:
        """Columns `s` of every frame as (b, c, t, h, w), on the compute device."""
        columns = torch.cat([f[..., s] for f in self.frames]).to(self.device)
        return columns.unflatten(0, (-1, self.timesteps)).transpose(1, 2)

    def strips(self, chunks: int):
        return chunk_slices(self.frames[0].shape[-1], chunks)

    def map_strips(self, fn: Callable, chunks: int):
        """Columns s of every frame = fn(strip(s)): in place, or into new frames when fn changes
        the dtype (as a blend with an fp32 mix factor does)."""
        out = None
        for s in self.strips(chunks):
            y = fn(self.strip(s)).transpose(1, 2).flatten(0, 1)
            if out is None:
                out = self.frames if y.dtype == self.frames[0].dtype else [
                    f.new_empty(f.shape, dtype=y.dtype) for f in self.frames]
            for frame, column in zip(out, y):
                frame[0, ..., s].copy_(column)
            del y
        self.frames[:] = out

    def stack(self) -> torch.Tensor:
        return torch.cat(self.frames).to(self.device)


def run_video_block(h: FrameList, spatial: Callable, temporal: Optional[TemporalResBlockStrips],
                    mix: Callable, settings: SliceSettings, prelude: Optional[Callable] = None):
    """A video ResBlock on `h`, grouped: `spatial(xs)` per frame chunk (after `prelude`, a frame-local
    module such as the previous level's upsample), then `mix(strip, temporal(strip))` per width
    strip with exact GroupNorm statistics. Without `temporal` only the spatial half runs."""
    layers = [lambda xs, s: spatial(xs)]
    if prelude is not None:
        layers.insert(0, lambda xs, s: prelude(xs))
    h.map_frames(chain(layers), settings.frames(len(h.frames)))
    if temporal is None:
        return
    strips = settings.strips(h.frames[0].shape[-1])
    temporal.prepare(lambda: (h.strip(s) for s in h.strips(strips)))
    h.map_strips(lambda xs: mix(xs, temporal(xs)), strips)
