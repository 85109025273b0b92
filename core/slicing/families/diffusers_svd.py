"""diffusers' SVD classes (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder), for the
plain-torch API: their table row and how their blocks' calls are cut into probes."""
from typing import Callable

import torch

from ..diffusers_svd import (spatio_temporal_resblock_forward, temporal_decoder_forward, time_conv_forward,
                             transformer_spatio_temporal_forward)
from ..frame_local import frame_local_forward
from ..self_check.probes import Probe, few_frames, first_video, frame_local
from .rows import BlockRule, Family, fetched_forward, frame_local_children, is_block


def diffusers_video_block(side: tuple) -> Callable:
    """diffusers' SpatioTemporalResBlock and TransformerSpatioTemporalModel (frames from image_only_indicator)."""
    def cut(owner, call):
        indicator = call.get("image_only_indicator")
        return None if indicator is None else first_video(call, "hidden_states", indicator.shape[-1], side)
    return cut


def diffusers_temporal_decoder(owner, call):
    """TemporalDecoder forward(sample, image_only_indicator, num_frames)."""
    frames = call.get("num_frames")
    call, count = few_frames(call, "sample", frames)
    call.set("num_frames", count)
    indicator = call.get("image_only_indicator")
    if isinstance(indicator, torch.Tensor) and indicator.ndim == 2:
        call.set("image_only_indicator", indicator[:1, :count])
    return call


def time_conv(owner, call):
    """A time-only Conv3d on b c t h w."""
    return few_frames(call, call.first, None, time_dim=2)[0]


FAMILIES = (
    Family(
        "diffusers SVD (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder)",
        signature=is_block("SpatioTemporalResBlock", "spatial_res_block", "temporal_res_block"), input="diffusers",
        rules=(
            BlockRule(is_block("SpatioTemporalResBlock", "spatial_res_block", "temporal_res_block"),
                      fetched_forward(spatio_temporal_resblock_forward)),
            BlockRule(is_block("TransformerSpatioTemporalModel", "temporal_transformer_blocks"),
                      fetched_forward(transformer_spatio_temporal_forward)),
            BlockRule(lambda m: type(m).__name__ in ("Upsample2D", "Downsample2D"), fetched_forward(frame_local_forward)),
            BlockRule(is_block("MidBlockTemporalDecoder", "attentions"), frame_local_children("attentions")),
            BlockRule(is_block("TemporalDecoder", "time_conv_out"),
                      lambda m, s: {"forward": temporal_decoder_forward(m, s)} if s.group_ops else {
                          **frame_local_children("conv_norm_out", "conv_out")(m, s),
                          "time_conv_out.forward": time_conv_forward(m.time_conv_out, s)}),
            BlockRule(is_block("UNetSpatioTemporalConditionModel", "conv_norm_out"),
                      frame_local_children("conv_norm_out", "conv_out")),
        ),
        probes={
            "spatio_temporal_resblock_forward": Probe(diffusers_video_block(("temb",))),
            "transformer_spatio_temporal_forward": Probe(diffusers_video_block(("encoder_hidden_states",))),
            "frame_local_forward": Probe(frame_local),
            "temporal_decoder_forward": Probe(diffusers_temporal_decoder),
            "time_conv_forward": Probe(time_conv),
        },
    ),
)
