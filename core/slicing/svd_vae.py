"""ComfyUI's SVD temporal VAE decoder (temporal_ae.VideoDecoder): sliced forwards.

Every frame keeps the full temporal context: spatial work runs in frame chunks, the time-only
convolutions in strips of the width axis with exact GroupNorm statistics.

Feature Slicer alone patches each video block (`decoder_video_resblock_forward`, `video_conv_forward`).
With operator grouping the decoder runs its own forward (`video_decoder_forward`) over a FrameList.
"""
from contextlib import nullcontext
from typing import Callable

from einops import rearrange
from torch import nn

from .fetched_weights import weights_fetched_for, weights_fetched_once
from .settings import SliceSettings
from .frame_list import FrameList, run_video_block
from .slices import chunk_slices, map_slices, slice_batch_aligned, take
from ..host import derives_from, host_function, parent_forward
from .temporal import TemporalResBlockStrips

FRAME_LOCAL_MODULES = ("Upsample", "AttnBlock")  # ComfyUI classes that treat every frame on its own
# The sliced decode of n frames needs (fixed + per_frame * n) times stock's per-frame estimate,
# measured at 1, 14 and 25 frames at 576x1024 (bench/slicing_peaks.py), with 1.5x headroom: in VRAM
# 0.265 + 0.059 n; with the frames offloaded to RAM 0.29 (no growth with n).
SLICED_DECODE_COST = {False: (0.4, 0.09), True: (0.45, 0.005)}  # offload_frames -> (fixed, per_frame)


def decode_estimate(vae: nn.Module, settings: SliceSettings, stock_estimate: Callable) -> Callable:
    """ComfyUI decodes free_memory // estimate frames per batch, where the estimate is per frame and
    gets the whole latent's shape: the sliced total, spread over the frames, keeps all frames (and
    their full temporal context) in one batch whenever that total fits."""
    fixed, per_frame = SLICED_DECODE_COST[settings.offload_frames]

    def estimate(shape, dtype):
        frames = max(1, shape[0])
        return stock_estimate(shape, dtype) * (fixed + per_frame * frames) / frames
    return estimate


def decoder_video_resblock_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    spatial = parent_forward(block, "VideoResBlock")

    def forward(x, temb, skip_video=False, timesteps=None):
        batch = x.shape[0]
        h = map_slices(lambda xs, s: spatial(xs, slice_batch_aligned(temb, s, batch)),
                       x, 0, settings.frames(batch))
        if skip_video:
            return h
        h5 = h.unflatten(0, (-1, timesteps or batch)).transpose(1, 2)
        strips = settings.strips(h5.shape[4])
        temporal = TemporalResBlockStrips.of_comfy(block.time_stack, None)
        temporal.prepare(lambda: (take(h5, 4, s) for s in chunk_slices(h5.shape[4], strips)))
        alpha = block.get_alpha(bs=h5.shape[0]).to(h.device)
        out = alpha * map_slices(temporal, h5, 4, strips) + (1.0 - alpha) * h5
        return rearrange(out, "b c t h w -> (b t) c h w")
    return forward


def video_conv_forward(conv: nn.Module, settings: SliceSettings) -> Callable:
    """AE3DConv (the decoder's conv_out): its frame conv in frame chunks, its time conv in strips."""
    frame_conv = parent_forward(conv, "AE3DConv")

    def forward(x, timesteps=None, skip_video=False):
        frames = map_slices(lambda xs, s: frame_conv(xs), x, 0, settings.frames(x.shape[0]))
        if skip_video:
            return frames
        frames5 = frames.unflatten(0, (-1, timesteps or x.shape[0])).transpose(1, 2)
        out = map_slices(lambda xs, s: conv.time_mix_conv(xs), frames5, 4, settings.strips(frames5.shape[4]))
        return rearrange(out, "b c t h w -> (b t) c h w")
    return forward


def video_decoder_forward(decoder: nn.Module, settings: SliceSettings) -> Callable:
    """The decoder's own forward (same calls, same order) over a FrameList, with each upsample
    fused into the next block's frame chunks and the head (norm_out, SiLU, conv_out's frame conv)
    run per frame chunk, then conv_out's time conv in strips."""
    nonlinearity = host_function(decoder, "nonlinearity")
    frame_conv = parent_forward(decoder.conv_out, "AE3DConv")

    def run_module(module, h: FrameList, prelude=None, **kwargs):
        with weights_fetched_once(module), (weights_fetched_once(prelude.__self__) if prelude else nullcontext()):
            run_module_fetched(module, h, prelude, **kwargs)

    def run_module_fetched(module, h: FrameList, prelude=None, **kwargs):
        if derives_from(module, "VideoResBlock") and hasattr(module, "time_stack"):
            spatial = parent_forward(module, "VideoResBlock")
            temporal = None if kwargs.get("skip_video") else TemporalResBlockStrips.of_comfy(module.time_stack, None)
            alpha = module.get_alpha(bs=len(h.frames) // h.timesteps).to(h.device)
            run_video_block(h, lambda xs: spatial(xs, None), temporal,
                            lambda xs, mixed: alpha * mixed + (1.0 - alpha) * xs, settings, prelude)
            return
        if prelude is not None:
            h.map_frames(lambda xs, s: prelude(xs), settings.frames(len(h.frames)))
        if type(module).__name__ in FRAME_LOCAL_MODULES:
            h.map_frames(lambda xs, s: module(xs), settings.frames(len(h.frames)))
        else:
            h.apply_whole(lambda x: module(x, **kwargs))

    def forward(z, **kwargs):
        skip_video = kwargs.get("skip_video", False)
        h = FrameList(decoder.conv_in(z), kwargs.get("timesteps"), settings.frame_store)
        run_module(decoder.mid.block_1, h, **kwargs)
        run_module(decoder.mid.attn_1, h, **kwargs)
        run_module(decoder.mid.block_2, h, **kwargs)
        pending_upsample = None
        for level in reversed(range(decoder.num_resolutions)):
            up = decoder.up[level]
            for index, module in enumerate(up.block):
                run_module(module, h, prelude=pending_upsample, **kwargs)
                pending_upsample = None
                if len(up.attn) > 0:
                    run_module(up.attn[index], h, **kwargs)
            if level != 0:
                pending_upsample = type(up.upsample).forward.__get__(up.upsample)
        if pending_upsample is not None:
            with weights_fetched_once(pending_upsample.__self__):
                h.map_frames(lambda xs, s: pending_upsample(xs), settings.frames(len(h.frames)))
        if getattr(decoder, "give_pre_end", False):  # gone in ComfyUI 0.33 (its Decoder always runs the head)
            return h.stack()
        like = h.frames[0].new_empty(0, device=h.device)
        with weights_fetched_once(decoder, ("norm_out", "conv_out")), weights_fetched_for(decoder.conv_out, like):
            h.map_frames(lambda xs, s: frame_conv(nonlinearity(decoder.norm_out(xs))), settings.frames(len(h.frames)))
            if not skip_video:
                h.map_strips(decoder.conv_out.time_mix_conv, settings.strips(h.frames[0].shape[-1]))
        out = h.stack()
        return out.tanh() if decoder.tanh_out else out
    return forward
