"""ComfyUI's SVD temporal VAE decoder (temporal_ae.VideoDecoder): sliced forwards.

Every frame keeps the full temporal context: spatial work runs in frame chunks, the time-only
convolutions in strips of the width axis with exact GroupNorm statistics.
"""
from typing import Callable

from einops import rearrange
from torch import nn

from .settings import SliceSettings
from .slices import map_slices, run_stage, slice_batch_aligned
from .temporal import TemporalResBlockStrips, host_function, parent_forward


def decoder_video_resblock_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    spatial = parent_forward(block, "VideoResBlock")

    def forward(x, temb, skip_video=False, timesteps=None):
        batch = x.shape[0]
        h = run_stage([lambda xs, s: spatial(xs, slice_batch_aligned(temb, s, batch))],
                      x, 0, settings.frames(batch), settings.group_ops)
        if skip_video:
            return h
        h5 = h.unflatten(0, (-1, timesteps or batch)).transpose(1, 2)
        strips = settings.strips(h5.shape[4])
        temporal = TemporalResBlockStrips(block.time_stack, None)
        temporal.prepare(h5, 4, strips)
        alpha = block.get_alpha(bs=h5.shape[0]).to(h.device)
        if settings.group_ops:
            in_place = h5 if alpha.dtype == h.dtype else None
            out = map_slices(lambda xs, s: alpha * temporal(xs) + (1.0 - alpha) * xs, h5, 4, strips, in_place)
        else:
            out = alpha * map_slices(temporal, h5, 4, strips) + (1.0 - alpha) * h5
        return rearrange(out, "b c t h w -> (b t) c h w")
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

    def forward(z, **kwargs):
        h = decoder.conv_in(z)
        h = decoder.mid.block_1(h, None, **kwargs)
        h = decoder.mid.attn_1(h, **kwargs)
        h = decoder.mid.block_2(h, None, **kwargs)
        for level in reversed(range(decoder.num_resolutions)):
            up = decoder.up[level]
            for index, block in enumerate(up.block):
                h = block(h, None, **kwargs)
                if len(up.attn) > 0:
                    h = up.attn[index](h, **kwargs)
            if level != 0:
                h = up.upsample(h)
        if decoder.give_pre_end:
            return h
        h = head(h, **kwargs)
        return h.tanh() if decoder.tanh_out else h
    return forward
