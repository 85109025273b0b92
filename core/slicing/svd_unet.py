"""ComfyUI's SVD-family video UNet (openaimodel / attention): sliced forwards of its video blocks.

Spatial work runs in chunks of the batch*frames axis; temporal work runs in strips of the spatial
axes, where every row of frames is independent.
"""
from typing import Callable, Optional

import torch
from einops import rearrange
from torch import nn

from .fetched_weights import fetching_once
from .frame_local import frame_local_forward
from .settings import SliceSettings
from .slices import chunk_slices, map_slices, run_stage, slice_batch_aligned, take
from ..host import derives_from, host_function, parent_forward
from .temporal import TemporalResBlockStrips, blend


def unet_patches(unet: nn.Module, settings: SliceSettings) -> dict:
    """The UNet's own patches: its output head in frame chunks, and the skip concatenation of every
    output block fused into that block's first VideoResBlock.

    UNetModel._forward concatenates h and the skip at full size before each output block. Through
    ComfyUI's output_block_patch hook (run last), the pair is handed to the block instead and
    zero-channel stand-ins are concatenated; the block concatenates one frame chunk at a time and
    drops the pair once its spatial half has run."""
    handoff = []
    receivers = {i for i, block in enumerate(unet.output_blocks) if derives_from(block[0], "VideoResBlock")}
    stock_forward = type(unet).forward.__get__(unet)

    def hand_over(h, skip, transformer_options):
        if transformer_options["block"][1] not in receivers:
            return h, skip
        handoff.append((h, skip))
        stand_in = h.new_empty((h.shape[0], 0, *h.shape[2:]))
        return stand_in, stand_in

    def forward(x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        patches = dict(transformer_options.get("patches", {}))
        patches["output_block_patch"] = [*patches.get("output_block_patch", []), hand_over]
        handoff.clear()
        try:
            return stock_forward(x, timesteps, context, y, control, {**transformer_options, "patches": patches},
                                 **kwargs)
        finally:
            handoff.clear()

    patches = {"forward": forward, "out.forward": fetching_once(unet.out, frame_local_forward(unet.out, settings))}
    for i in receivers:
        receiver = unet.output_blocks[i][0]
        patches[f"output_blocks.{i}.0.forward"] = fetching_once(receiver,
                                                                video_resblock_forward(receiver, settings, handoff))
    return patches


def video_resblock_forward(block: nn.Module, settings: SliceSettings, handoff: Optional[list] = None) -> Callable:
    """With `handoff`, a zero-channel input means: take (h, skip) from it and concatenate per chunk."""
    spatial = parent_forward(block, "VideoResBlock")

    def spatial_stage(inputs, emb, batch):
        x, skip = inputs
        if skip is None:
            layer = lambda xs, s: spatial(xs, slice_batch_aligned(emb, s, batch))  # noqa: E731
        else:
            layer = lambda xs, s: spatial(torch.cat([xs, skip[s]], 1), slice_batch_aligned(emb, s, batch))  # noqa: E731
        return run_stage([layer], x, 0, settings.frames(batch, x[0].numel() + (0 if skip is None else skip[0].numel())),
                         settings.group_ops)

    def forward(x, emb, num_video_frames, image_only_indicator=None):
        batch = x.shape[0]
        h = spatial_stage(handoff.pop() if handoff and x.shape[1] == 0 else (x, None), emb, batch)
        h5 = h.unflatten(0, (-1, num_video_frames)).transpose(1, 2)
        strips = settings.strips(h5.shape[4])
        temporal = TemporalResBlockStrips.of_comfy(block.time_stack,
                                          rearrange(emb, "(b t) ... -> b t ...", t=num_video_frames))
        temporal.prepare(lambda: (take(h5, 4, s) for s in chunk_slices(h5.shape[4], strips)))
        alpha = block.time_mixer.get_alpha(image_only_indicator, h.device)
        if settings.group_ops:
            in_place = h5 if h5.dtype == h.dtype else None
            out = map_slices(lambda xs, s: blend(alpha, xs, temporal(xs)), h5, 4, strips, in_place)
        else:
            out = blend(alpha, h5, map_slices(temporal, h5, 4, strips))
        return rearrange(out, "b c t h w -> (b t) c h w")
    return forward


def spatial_video_transformer_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    def forward(x, context=None, time_context=None, timesteps=None, image_only_indicator=None,
                transformer_options={}):
        batch, channels, height, width = x.shape
        transformer_options["activations_shape"] = list(x.shape)
        frames = settings.frames(batch, x[0].numel())
        video_batch = batch // timesteps
        if block.use_spatial_context:
            time_context = (context if time_context is None else time_context)[::timesteps]
        elif time_context is not None and time_context.ndim == 2:
            time_context = time_context[:, None]

        def spatial_in(xs, s):
            xs = block.norm(xs)
            if not block.use_linear:
                xs = block.proj_in(xs)
            xs = rearrange(xs, "b c h w -> b (h w) c")
            return block.proj_in(xs) if block.use_linear else xs

        frame_index = torch.arange(timesteps, device=x.device).repeat(video_batch)
        timestep_embedding = host_function(block, "timestep_embedding")
        time_emb = block.time_pos_embed(timestep_embedding(
            frame_index, block.in_channels, repeat_only=False, max_period=block.max_time_embed_period).to(x.dtype))
        time_emb = rearrange(time_emb, "(b t) c -> b t 1 c", t=timesteps)
        alpha = block.time_mixer.get_alpha(image_only_indicator, x.device)
        if alpha.numel() == batch:
            alpha = alpha.reshape(video_batch, timesteps, 1, 1)

        # One working buffer laid out like the output (b t) c (h w), used as (b t) (h w) c: every stage,
        # and the output projection with the residual, writes it in place, slice by slice.
        h = x.new_empty((batch, channels, height * width))
        tokens = h.transpose(1, 2)
        rows_view = tokens.unflatten(0, (video_batch, timesteps))
        bands = settings.bands(height * width, channels)
        x_rows = rearrange(x, "(b t) c h w -> b t (h w) c", t=timesteps)
        depth = len(block.transformer_blocks)
        for index, (spatial_block, temporal_block) in enumerate(zip(block.transformer_blocks, block.time_stack)):
            transformer_options["block_index"] = index

            def spatial_layer(xs, s, spatial_block=spatial_block):
                return spatial_block(xs, context=slice_batch_aligned(context, s, batch),
                                     transformer_options=transformer_options)

            def temporal_layer(xs, s, temporal_block=temporal_block):
                rows = xs.shape[2]
                mixed = rearrange(xs + time_emb, "b t n c -> (b n) t c")
                rows_context = None if time_context is None else time_context.repeat_interleave(rows, dim=0)
                mixed = temporal_block(mixed, context=rows_context, transformer_options=transformer_options)
                return blend(alpha, xs, rearrange(mixed, "(b n) t c -> b t n c", b=video_batch))

            layers = [spatial_in, spatial_layer] if index == 0 else [spatial_layer]
            run_stage(layers, x if index == 0 else tokens, 0, frames, settings.group_ops, out=tokens)
            if index < depth - 1:
                run_stage([temporal_layer], rows_view, 2, bands, settings.group_ops, out=rows_view)
                continue

            def spatial_out(xs, s):
                if block.use_linear:
                    xs = block.proj_out(xs)
                else:
                    xs = rearrange(block.proj_out(rearrange(xs, "b t n c -> b c t n")), "b c t n -> b t n c")
                return xs + x_rows[:, :, s]
            run_stage([temporal_layer, spatial_out], rows_view, 2, bands, settings.group_ops, out=rows_view)
            return h.view(x.shape)
        return x
    return forward
