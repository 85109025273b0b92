"""diffusers' SVD blocks (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder): sliced
forwards with the same exact scheme as ComfyUI's: spatial work in frame chunks, temporal work in
width strips (ResNet) or bands of positions (transformer), GroupNorm statistics of the whole tensor."""
import itertools
from typing import Callable

import torch
from torch import nn

from .frame_list import FrameList, run_video_block
from .settings import SliceSettings
from .slices import chunk_slices, map_slices, run_stage, slice_batch_aligned, take
from ..host import host_function
from .temporal import TemporalResBlockStrips


def spatio_temporal_resblock_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    def forward(hidden_states, temb=None, image_only_indicator=None):
        frames = image_only_indicator.shape[-1]
        batch = hidden_states.shape[0]
        h = run_stage([lambda xs, s: block.spatial_res_block(xs, slice_batch_aligned(temb, s, batch))],
                      hidden_states, 0,
                      settings.frames(batch, hidden_states[0].numel()), settings.group_ops)
        h5 = h.unflatten(0, (-1, frames)).transpose(1, 2)
        strips = settings.strips(h5.shape[4])
        temporal = TemporalResBlockStrips.of_diffusers(
            block.temporal_res_block, None if temb is None else temb.reshape(h5.shape[0], frames, -1))
        temporal.prepare(lambda: (take(h5, 4, s) for s in chunk_slices(h5.shape[4], strips)))

        def mix(spatial, temporal_out):
            return block.time_mixer(x_spatial=spatial, x_temporal=temporal_out, image_only_indicator=image_only_indicator)
        if settings.group_ops:
            out = map_slices(lambda xs, s: mix(xs, temporal(xs)), h5, 4, strips)
        else:
            out = mix(h5, map_slices(temporal, h5, 4, strips))
        return out.transpose(1, 2).flatten(0, 1)
    return forward


def transformer_spatio_temporal_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    def forward(hidden_states, encoder_hidden_states=None, image_only_indicator=None, return_dict=True):
        batch, channels, height, width = hidden_states.shape
        frames = image_only_indicator.shape[-1]
        video_batch = batch // frames
        first_context = encoder_hidden_states.reshape(video_batch, frames, -1, encoder_hidden_states.shape[-1])[:, 0]
        frame_index = torch.arange(frames, device=hidden_states.device).repeat(video_batch)
        emb = block.time_pos_embed(block.time_proj(frame_index).to(hidden_states.dtype))[:, None, :]

        # One working buffer laid out like the output b c (h w), used as b (h w) c and written in place.
        h = hidden_states.new_empty((batch, channels, height * width))
        tokens = h.transpose(1, 2)
        rows_view = tokens.unflatten(0, (video_batch, frames))
        residual_rows = hidden_states.flatten(2).transpose(1, 2).unflatten(0, (video_batch, frames))
        bands = settings.bands(height * width, channels)

        def spatial_in(xs, s):
            return block.proj_in(block.norm(xs).flatten(2).transpose(1, 2))

        depth = len(block.transformer_blocks)
        for index, (spatial_block, temporal_block) in enumerate(zip(block.transformer_blocks,
                                                                  block.temporal_transformer_blocks)):
            def spatial_layer(xs, s, spatial_block=spatial_block):
                return spatial_block(xs, encoder_hidden_states=slice_batch_aligned(encoder_hidden_states, s, batch))

            def temporal_layer(xs, s, temporal_block=temporal_block):
                positions = xs.shape[2]
                flat = xs.flatten(0, 1)
                context = first_context[:, None].expand(-1, positions, -1, -1).flatten(0, 1)
                mixed = temporal_block(flat + emb, num_frames=frames, encoder_hidden_states=context)
                out = block.time_mixer(x_spatial=flat, x_temporal=mixed, image_only_indicator=image_only_indicator)
                return out.unflatten(0, (video_batch, frames))

            layers = [spatial_in, spatial_layer] if index == 0 else [spatial_layer]
            run_stage(layers, hidden_states if index == 0 else tokens, 0,
                      settings.frames(batch, hidden_states[0].numel()),
                      settings.group_ops, out=tokens)
            temporal_layers = [temporal_layer]
            if index == depth - 1:
                temporal_layers.append(lambda xs, s: block.proj_out(xs) + residual_rows[:, :, s])
            run_stage(temporal_layers, rows_view, 2, bands, settings.group_ops, out=rows_view)
        output = h.view(hidden_states.shape)
        if not return_dict:
            return (output,)
        return host_function(block, "TransformerTemporalModelOutput")(sample=output)
    return forward


def temporal_decoder_forward(decoder: nn.Module, settings: SliceSettings) -> Callable:
    """TemporalDecoder's own forward (same calls, same order) over a FrameList: upsamplers fused
    into the next block's frame chunks, the head (norm, SiLU, conv_out) per frame chunk, then
    time_conv_out in strips."""
    frame_local = settings.frames

    def run_resblock(block, h, image_only_indicator, prelude):
        temporal = TemporalResBlockStrips.of_diffusers(block.temporal_res_block, None)
        run_video_block(h, lambda xs: block.spatial_res_block(xs, None), temporal,
                        lambda xs, mixed: block.time_mixer(x_spatial=xs, x_temporal=mixed,
                                                           image_only_indicator=image_only_indicator),
                        settings, prelude)

    def forward(sample, image_only_indicator, num_frames=1):
        h = FrameList(decoder.conv_in(sample), num_frames, settings.frame_store)
        mid = decoder.mid_block
        run_resblock(mid.resnets[0], h, image_only_indicator, None)
        for resnet, attention in zip(mid.resnets[1:], mid.attentions):
            h.map_frames(lambda xs, s, attention=attention: attention(xs), frame_local(len(h.frames)))
            run_resblock(resnet, h, image_only_indicator, None)
        upscale_dtype = next(itertools.chain(decoder.up_blocks.parameters(), decoder.up_blocks.buffers())).dtype
        h.map_frames(lambda xs, s: xs.to(upscale_dtype), frame_local(len(h.frames)))
        pending = []  # upsamplers waiting to run inside the next block's frame chunks
        for up_block in decoder.up_blocks:
            for resnet in up_block.resnets:
                prelude = nn.Sequential(*pending) if pending else None
                pending = []
                run_resblock(resnet, h, image_only_indicator, prelude)
            pending = list(up_block.upsamplers or ())
        modules = [*pending, decoder.conv_norm_out, decoder.conv_act, decoder.conv_out]
        head = nn.Sequential(*modules)
        h.map_frames(lambda xs, s: head(xs), frame_local(len(h.frames)))
        h.map_strips(decoder.time_conv_out, settings.strips(h.frames[0].shape[-1]))
        return h.stack()
    return forward


def time_conv_forward(conv: nn.Module, settings: SliceSettings) -> Callable:
    """A Conv3d whose kernel only spans time (k, 1, 1), on b c t h w: in strips of the width axis."""
    stock_forward = type(conv).forward.__get__(conv)
    return lambda x: map_slices(lambda xs, s: stock_forward(xs), x, 4, settings.strips(x.shape[4]))
