"""ComfyUI's SVD temporal VAE decoder (temporal_ae.VideoDecoder): sliced forwards.

Every frame keeps the full temporal context: spatial work runs in frame chunks, the time-only
convolutions in strips of the width axis with exact GroupNorm statistics.
"""
from typing import Callable, Optional

from einops import rearrange
from torch import nn

from .settings import SliceSettings
from .slices import map_slices, run_stage, slice_batch_aligned
from .temporal import TemporalResBlockStrips, host_function, parent_forward


def run_decoder_video_resblock(block: nn.Module, x, settings: SliceSettings, temb=None, skip_video=False,
                               timesteps=None, prelude: Optional[Callable] = None, consume_input=False):
    """One decoder VideoResBlock, sliced. `prelude` (grouped mode) runs a frame-local module first
    in the same frame chunks. With `consume_input`, `x` is a one-element list handing the input
    over: the spatial half overwrites it in place or drops it as soon as it is used."""
    if consume_input:
        x = x.pop()
    spatial = parent_forward(block, "VideoResBlock")
    batch = x.shape[0]
    layers = [lambda xs, s: spatial(xs, slice_batch_aligned(temb, s, batch))]
    if prelude is not None:
        layers.insert(0, lambda xs, s: prelude(xs))
    in_place = consume_input and prelude is None and block.in_channels == block.out_channels
    h = run_stage(layers, x, 0, settings.frames(batch), settings.group_ops, out=x if in_place else None)
    del x
    if skip_video:
        return h
    h5 = h.unflatten(0, (-1, timesteps or batch)).transpose(1, 2)
    strips = settings.strips(h5.shape[4])
    temporal = TemporalResBlockStrips(block.time_stack, None)
    temporal.prepare(h5, 4, strips)
    alpha = block.get_alpha(bs=h5.shape[0]).to(h.device)
    if settings.group_ops:
        out = map_slices(lambda xs, s: alpha * temporal(xs) + (1.0 - alpha) * xs, h5, 4, strips,
                         h5 if alpha.dtype == h.dtype else None)
    else:
        out = alpha * map_slices(temporal, h5, 4, strips) + (1.0 - alpha) * h5
    return rearrange(out, "b c t h w -> (b t) c h w")


def decoder_video_resblock_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    def forward(x, temb, skip_video=False, timesteps=None):
        return run_decoder_video_resblock(block, x, settings, temb, skip_video, timesteps)
    return forward


def video_decoder_forward(decoder: nn.Module, settings: SliceSettings) -> Callable:
    """The decoder's own forward (same calls, same order) with its output head (norm_out, SiLU,
    the frame conv of conv_out, then its time conv) fused and sliced, so none of the head's
    full-resolution intermediates exists at once."""
    nonlinearity = host_function(decoder, "nonlinearity")
    frame_conv = parent_forward(decoder.conv_out, "AE3DConv")
    time_conv = decoder.conv_out.time_mix_conv

    def head(h, timesteps=None, skip_video=False):
        frames = run_stage([lambda xs, s: frame_conv(nonlinearity(decoder.norm_out(xs)))],
                           h, 0, settings.frames(h.shape[0]), settings.group_ops)
        if skip_video:
            return frames
        frames5 = frames.unflatten(0, (-1, timesteps or h.shape[0])).transpose(1, 2)
        out = map_slices(lambda xs, s: time_conv(xs), frames5, 4, settings.strips(frames5.shape[4]))
        return rearrange(out, "b c t h w -> (b t) c h w")

    def run_block(module, activations, prelude=None, **kwargs):
        """Decoder-owned activations (a one-element list, so no frame keeps the old tensor alive)
        are consumed in place, and an upsample is fused into the next block's frame chunks: a
        level never holds its input and output at full size at once."""
        if settings.group_ops and _is_video_resblock(module):
            result = run_decoder_video_resblock(module, activations, settings, prelude=prelude,
                                                consume_input=True, **kwargs)
        else:
            h = activations.pop()
            result = module(prelude(h) if prelude is not None else h, None, **kwargs)
        activations.append(result)

    def forward(z, **kwargs):
        activations = [decoder.conv_in(z)]
        run_block(decoder.mid.block_1, activations, **kwargs)
        activations.append(decoder.mid.attn_1(activations.pop(), **kwargs))
        run_block(decoder.mid.block_2, activations, **kwargs)
        pending_upsample = None
        for level in reversed(range(decoder.num_resolutions)):
            up = decoder.up[level]
            for index, module in enumerate(up.block):
                run_block(module, activations, prelude=pending_upsample, **kwargs)
                pending_upsample = None
                if len(up.attn) > 0:
                    activations.append(up.attn[index](activations.pop(), **kwargs))
            if level != 0:
                pending_upsample = type(up.upsample).forward.__get__(up.upsample)
        h = activations.pop()
        if pending_upsample is not None:
            h = pending_upsample(h)
        if decoder.give_pre_end:
            return h
        h = head(h, **kwargs)
        return h.tanh() if decoder.tanh_out else h
    return forward


def _is_video_resblock(module: nn.Module) -> bool:
    return any(cls.__name__ == "VideoResBlock" for cls in type(module).__mro__) and hasattr(module, "time_stack")
