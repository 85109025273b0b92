"""Wan 2.1 / 2.2 VAE decode in spatial strips: exact, no tile seams.

After its middle attention, every op of the Wan decoder is local in space (3x3 convolutions,
per-pixel RMS norm, nearest or duplicating 2x upsampling), so a strip of the output depends only
on a strip of the latent widened by the receptive field. Stock decodes the latent frames in short
runs and keeps, for every causal convolution, the last frames of its input over the whole frame;
those caches dominate its peak. Here the decode runs strip-outer, time-inner: each strip keeps
only its own share of the caches, and after every layer the strip is cut back to the halo the
remaining layers still need, so the recomputed margin stays small at the expensive high
resolutions. The part before the first upsampling (conv1, middle with its attention, and the
latent-resolution residual blocks) runs over whole frames once; its output, one latent-sized
tensor per run of frames, is what the strips read.

Time runs as ComfyUI 0.33's own decode runs it: the first latent frame alone, then runs of the
host's CACHE_T (2) frames, each run cut back into runs of CACHE_T frames wherever a layer has
multiplied its frames (the temporal upsamplings). The host's layers cache the last CACHE_T frames
of what they are given: since 0.33 without the frames cached before (zeros stand in for missing
history), so a decode that feeds one frame at a time loses the frame before last from the third
latent frame on; 0.3.75's layers carry the older frame over, and give the same video either way.
Runs of CACHE_T frames hold the whole history a layer reads on both, so one schedule fits both.
"""
import inspect
import math
import sys
from typing import Callable

import torch
from torch import nn

from .settings import SliceSettings
from .slices import chunk_slices

# Peak of the sliced decode as a share of stock's, against the strip count n (measured at 480x832 and
# 720p, bench/wan_vae_peaks.py): about 0.04 + 0.95 / n, before the per-frame buffers.
STRIP_PEAK_SHARE = (0.05, 1.0)
AUTO_STRIP_PIXELS = 256  # output pixels per strip along the longer spatial axis, in auto mode
CACHE_FRAMES = 2  # frames of input a causal convolution keeps for the next call, where the host names none
POINTWISE = ("RMS_norm", "SiLU", "Dropout", "Identity")


class UnsupportedDecoderError(ValueError):
    pass


def input_halo(module: nn.Module, halo: int, dim: int) -> int:
    """Positions either side of a strip (along `dim` of the 5-d activation) that `module` needs at
    its input so that `halo` positions either side of the strip are exact at its output."""
    name = type(module).__name__
    if isinstance(module, nn.Sequential):
        for child in reversed(module):
            halo = input_halo(child, halo, dim)
        return halo
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        kernel, stride = module.kernel_size[dim - 5], module.stride[dim - 5]
        if stride != 1:
            raise UnsupportedDecoderError(f"{name} with stride {stride} in the upsampling path")
        return halo + (kernel - 1) // 2
    if name == "Upsample":
        return math.ceil(halo / _factor(module.scale_factor, dim))
    if name == "DupUp3D":
        return math.ceil(halo / module.factor_s)
    if name in POINTWISE:
        return halo
    if name == "ResidualBlock":
        return max(input_halo(module.residual, halo, dim), input_halo(module.shortcut, halo, dim))
    if name == "Resample":
        halo = input_halo(module.resample, halo, dim)
        return input_halo(module.time_conv, halo, dim) if hasattr(module, "time_conv") else halo
    if name == "Up_ResidualBlock":
        shortcut = module.avg_shortcut
        return max(input_halo(module.upsamples, halo, dim),
                   input_halo(shortcut, halo, dim) if shortcut is not None else 0)
    raise UnsupportedDecoderError(f"{name} is not known to be local in space")


def _factor(scale_factor, dim: int) -> int:
    factors = scale_factor if isinstance(scale_factor, tuple) else (scale_factor, scale_factor)
    return int(factors[dim - 5])


def _count_causal_convs(modules) -> int:
    return sum(type(m).__name__ == "CausalConv3d" for module in modules for m in module.modules())


def strip_steps(layers: list, halo: int, dim: int) -> tuple[list, int]:
    """(layer, halo its output keeps, steps inside it) for `layers` in call order, and the halo the
    first one needs at its input. Up_ResidualBlocks (Wan 2.2) are stepped into, so their long main
    path is cut back layer by layer too."""
    steps = []
    for layer in reversed(layers):
        inner = strip_steps(list(layer.upsamples), halo, dim)[0] if type(layer).__name__ == "Up_ResidualBlock" else None
        steps.append((layer, halo, inner))
        halo = input_halo(layer, halo, dim)
    return steps[::-1], halo


class DecoderPlan:
    """The Wan decoder's layers in stock call order, split into the whole-frame part (up to the
    first change of resolution) and the strip steps."""

    def __init__(self, decoder: nn.Module, dim: int):
        upsamples = list(decoder.upsamples)
        latent_level = 0
        while latent_level < len(upsamples) and type(upsamples[latent_level]).__name__ == "ResidualBlock":
            latent_level += 1
        self.whole = [decoder.conv1, *decoder.middle, *upsamples[:latent_level]]
        strip = [*upsamples[latent_level:], *decoder.head]
        self.steps, self.input_halo = strip_steps(strip, 0, dim)
        self.whole_caches = _count_causal_convs(self.whole)
        self.strip_caches = _count_causal_convs(strip)
        self.patch = math.isqrt(decoder.head[-1].out_channels // 3)  # Wan 2.2 decodes 2x2 patches as channels
        self.scale = 2 ** sum(type(m).__name__ == "Upsample" for m in decoder.upsamples.modules()) * self.patch
        self.cache_frames = cache_frames(decoder)


def cache_frames(decoder: nn.Module) -> int:
    """Frames of its input each causal layer of the host keeps for the next call (its CACHE_T)."""
    return int(getattr(sys.modules.get(type(decoder).__module__), "CACHE_T", CACHE_FRAMES))


def latent_runs(frames: int, run: int) -> list[slice]:
    """The latent frames in the runs stock 0.33 decodes them in: the first frame alone, then `run`
    frames at a time (the last run may be shorter: no later call reads its caches)."""
    return [slice(0, min(1, frames))] + [slice(t, min(t + run, frames)) for t in range(1, frames, run)]


def run_layer(layer: nn.Module, x: torch.Tensor, caches: list, index: list, first_chunk: bool) -> torch.Tensor:
    """One decoder layer as stock Decoder3d.forward calls it, with its causal caches in `caches`."""
    name = type(layer).__name__
    if name == "CausalConv3d":  # as Decoder3d.forward calls its conv1 and its head's convolution
        i = index[0]
        keep = cache_frames(layer)
        kept = x[:, :, -keep:].clone()
        if kept.shape[2] < keep and caches[i] is not None:  # (only a first or last run is that short)
            kept = torch.cat([caches[i][:, :, -(keep - kept.shape[2]):].to(kept.device), kept], dim=2)
        x = layer(x, caches[i])
        caches[i] = kept
        index[0] += 1
        return x
    if name in ("ResidualBlock", "Resample", "Up_ResidualBlock"):
        if "first_chunk" in inspect.signature(layer.forward).parameters:
            return layer(x, caches, index, first_chunk)
        return layer(x, caches, index)
    return layer(x)


def unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """b (c r q) f h w -> b c f (h q) (w r), as Wan 2.2's decode ends."""
    if patch == 1:
        return x
    b, c, f, h, w = x.shape
    x = x.view(b, c // patch ** 2, patch, patch, f, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c // patch ** 2, f, h * patch, w * patch)


def strip_count(settings: SliceSettings, length: int, scale: int) -> int:
    """Strips of a latent axis of `length` positions that decode to `scale` pixels each."""
    return settings.strips(length) if settings.strip_chunks else -(-length * scale // AUTO_STRIP_PIXELS)


class Strip:
    """Activations `x` covering positions [lo, lo + x.shape[dim]) of an axis of length `size`, of
    which [core.start, core.stop) are the positions this strip decodes."""

    def __init__(self, x: torch.Tensor, dim: int, lo: int, core: slice, size: int):
        self.x, self.dim, self.lo, self.core, self.size = x, dim, lo, core, size

    def run(self, step, caches: list, index: list, first_chunk: bool):
        layer, halo, inner = step
        if inner is None:
            before = self.x.shape[self.dim]
            self.x = run_layer(layer, self.x, caches, index, first_chunk)
            self._scale(self.x.shape[self.dim] // before)
        else:  # Up_ResidualBlock: main path step by step, plus the upsampled shortcut of its input
            x, lo = self.x, self.lo
            for inner_step in inner:
                self.run(inner_step, caches, index, first_chunk)
            if layer.avg_shortcut is not None:
                shortcut = layer.avg_shortcut(x, first_chunk)
                factor = shortcut.shape[self.dim] // x.shape[self.dim]
                self.x = self.x + shortcut.narrow(self.dim, self.lo - lo * factor, self.x.shape[self.dim])
        keep_lo = max(self.lo, self.core.start - halo)
        keep_hi = min(self.lo + self.x.shape[self.dim], self.core.stop + halo)
        self.x = self.x.narrow(self.dim, keep_lo - self.lo, keep_hi - keep_lo)
        self.lo = keep_lo

    def _scale(self, factor: int):
        self.lo, self.size = self.lo * factor, self.size * factor
        self.core = slice(self.core.start * factor, self.core.stop * factor)


def wan_vae_decode(vae: nn.Module, settings: SliceSettings):
    """A replacement for WanVAE.decode(z) that decodes in strips along the longer spatial axis."""
    plans = {dim: DecoderPlan(vae.decoder, dim) for dim in (3, 4)}

    def run_steps(strip: Strip, steps: list, caches: list, index: list, first_chunk: bool, pieces: list):
        """The strip through `steps`; where a layer has made it longer than the caches' span, its
        frames go on in runs of that span, each from the same cache index (stock run_up)."""
        span = plans[strip.dim].cache_frames
        for k, step in enumerate(steps):
            strip.run(step, caches, index, first_chunk)
            if strip.x.shape[2] > span and k + 1 < len(steps):
                x, strip.x = strip.x, None
                for t in range(0, x.shape[2], span):
                    part = Strip(x[:, :, t:t + span], strip.dim, strip.lo, strip.core, strip.size)
                    run_steps(part, steps[k + 1:], caches, list(index), first_chunk, pieces)
                return
        pieces.append(strip)

    def decode(z: torch.Tensor) -> torch.Tensor:
        dim = 4 if z.shape[4] >= z.shape[3] else 3
        plan = plans[dim]
        store = settings.frame_store or z.device
        x = vae.conv2(z)
        runs = latent_runs(x.shape[2], plan.cache_frames)
        caches, features = [None] * plan.whole_caches, []
        for r, run in enumerate(runs):
            index, y = [0], x[:, :, run]
            for layer in plan.whole:
                y = run_layer(layer, y, caches, index, r == 0)
            features.append(y.to(store))
        del x, caches, y
        length = features[0].shape[dim]
        output = OutputVideo(runs, dim, store)
        for core in chunk_slices(length, strip_count(settings, length, plan.scale)):
            lo, hi = max(0, core.start - plan.input_halo), min(length, core.stop + plan.input_halo)
            caches = [None] * plan.strip_caches
            for r, feature in enumerate(features):
                pieces = []
                strip = Strip(feature.narrow(dim, lo, hi - lo).to(z.device), dim, lo, core, length)
                run_steps(strip, plan.steps, caches, [0], r == 0, pieces)
                del strip
                output.write(r, [unpatchify(piece.x, plan.patch) for piece in pieces],
                             pieces[0].core.start * plan.patch, pieces[0].size * plan.patch)
                del pieces
        return output.video

    return decode


class OutputVideo:
    """The decoded video, written strip by strip, one run of latent frames at a time (its frames
    come as consecutive pieces). The first latent frame decodes to fewer frames than the others, so
    the buffer is allocated once the second run's count is known."""

    def __init__(self, runs: list, dim: int, store: torch.device):
        self.runs, self.dim, self.store = runs, dim, store
        self.video, self.pending, self.frame_at = None, [], [0]

    def write(self, r: int, pieces: list, start: int, size: int):
        if self.video is None:
            self.pending.append((r, pieces, start))
            if len(self.pending) < min(2, len(self.runs)):
                return
            first = sum(piece.shape[2] for piece in self.pending[0][1])
            last = self.pending[-1][1]  # the second run's pieces (the first's for a one-frame latent)
            per_frame = 0
            if len(self.runs) > 1:
                per_frame = sum(piece.shape[2] for piece in last) // (self.runs[1].stop - self.runs[1].start)
            shape = list(last[0].shape)
            shape[2], shape[self.dim] = first + (self.runs[-1].stop - 1) * per_frame, size
            self.video = last[0].new_empty(shape, device=self.store)
            self.frame_at = [0] + [first + (run.start - 1) * per_frame for run in self.runs[1:]]
            for r, pieces, start in self.pending:
                self._copy(r, pieces, start)
            self.pending.clear()
            return
        self._copy(r, pieces, start)

    def _copy(self, r: int, pieces: list, start: int):
        at = self.frame_at[r]
        for piece in pieces:
            self.video.narrow(2, at, piece.shape[2]).narrow(self.dim, start, piece.shape[self.dim]).copy_(piece)
            at += piece.shape[2]


def decode_estimate(vae: nn.Module, settings: SliceSettings, stock_estimate: Callable) -> Callable:
    """ComfyUI's Wan estimate for the shape (0.3.75: the same at any frame count; 0.33: lower up to
    4 latent frames) scaled to a strip's share, plus what grows with the frames: the whole-frame
    features the strips read and the output video (both in RAM with offload_frames)."""
    fixed, per_strip = STRIP_PEAK_SHARE
    plan = DecoderPlan(vae.decoder, 4)
    whole_channels = plan.whole[-1].out_dim

    def estimate(shape, dtype):
        batch, _, frames, height, width = shape
        element = torch.empty((), dtype=dtype).element_size()
        share = stock_estimate(shape, dtype) * (fixed + per_strip / strip_count(settings, max(height, width), plan.scale))
        if settings.offload_frames:
            return share
        per_frame = (whole_channels + 4 * 3 * plan.scale ** 2) * height * width * element
        return share + batch * frames * per_frame
    return estimate
