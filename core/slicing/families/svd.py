"""The SVD family in ComfyUI: the video UNet (openaimodel's VideoResBlock, SpatialVideoTransformer)
and the temporal VAE decoder: their table rows and how their blocks' calls are cut into probes."""
from typing import Callable

from .. import workloads
from ..frame_local import frame_local_forward
from ..self_check.probes import Probe, few_frames, first_rows, first_video, frame_local
from ..svd_unet import spatial_video_transformer_forward, unet_patches, video_resblock_forward
from ..svd_vae import (FRAME_LOCAL_MODULES, decode_estimate, decoder_video_resblock_forward, video_conv_forward,
                       video_decoder_forward)
from .rows import BlockRule, Family, fetched_forward, is_block


# the whole SVD UNet's probe (its blocks sliced too) keeps at least 4 x 16 latents: after its three


# downsamplings still 2 positions wide, so the deepest blocks' strips and bands have a border to cross


UNET_MIN_SIDES = (4, 16)


def comfy_video_block(frames_name: str, side: tuple) -> Callable:
    """ComfyUI's VideoResBlock (frames: num_video_frames) and SpatialVideoTransformer (timesteps)."""
    return lambda owner, call: first_video(call, "x", call.get(frames_name), side)


def svd_unet(owner, call):
    """The whole SVD UNet (its skip fusion and head, and its blocks): the first video, all frames, a small crop."""
    if call.get("control") is not None:  # ControlNet residuals are full-size: check on a later call
        return None
    x = call.get("x")
    return first_video(call, "x", call.get("num_video_frames") or x.shape[0],
                        ("timesteps", "context", "y", "time_context"), UNET_MIN_SIDES)


def svd_decoder(owner, call):
    """ComfyUI's VideoDecoder forward(z, **kwargs): a 5-frame video, a small crop."""
    timesteps = call.get("timesteps")
    call, count = few_frames(call, "z", timesteps)
    if isinstance(timesteps, int):
        call.set("timesteps", count)
    return call


def svd_decoder_block(x_name: str) -> Callable:
    """ComfyUI's decoder VideoResBlock (x, temb, skip_video, timesteps) and AE3DConv (input, timesteps, ...)."""
    def cut(owner, call):
        timesteps = call.get("timesteps")
        batch = call.get(x_name).shape[0]
        call, count = few_frames(call, x_name, timesteps)
        call.set("temb", first_rows(call.get("temb"), slice(0, count), batch))
        if isinstance(timesteps, int):
            call.set("timesteps", count)
        return call
    return cut


FAMILIES = (
    Family(
        "SVD-family video UNet (ComfyUI openaimodel: VideoResBlock, SpatialVideoTransformer)",
        signature=is_block("VideoResBlock", "in_layers", "time_stack"),
        root="UNetModel", step_inputs=workloads.svd_step, finer_slicing=workloads.finer_strips, step_rehash="unet",
        rules=(
            BlockRule(is_block("VideoResBlock", "in_layers", "time_stack"), fetched_forward(video_resblock_forward)),
            BlockRule(is_block("SpatialVideoTransformer", "time_stack"), fetched_forward(spatial_video_transformer_forward)),
            BlockRule(lambda m: type(m).__name__ in ("Upsample", "Downsample") and getattr(m, "dims", None) == 2,
                      fetched_forward(frame_local_forward)),
            BlockRule(is_block("UNetModel", "out", "output_blocks"), unet_patches),
        ),
        probes={
            "unet_patches": Probe(svd_unet, group=True),
            "video_resblock_forward": Probe(comfy_video_block("num_video_frames", ("emb",))),
            "spatial_video_transformer_forward": Probe(comfy_video_block("timesteps", ("context", "time_context"))),
            "frame_local_forward": Probe(frame_local),
        },
    ),
    Family(
        "SVD temporal VAE decoder (ComfyUI temporal_ae.VideoDecoder)",
        signature=is_block("VideoDecoder", "conv_out", "up"),
        rules=(
            # grouped: the decoder's own forward runs every block; alone: each block is patched
            BlockRule(is_block("VideoDecoder", "conv_out", "up"),
                      lambda module, settings: {"forward": video_decoder_forward(module, settings)}
                      if settings.group_ops else {}),
            BlockRule(is_block("VideoResBlock", "norm1", "time_stack"), fetched_forward(decoder_video_resblock_forward)),
            BlockRule(is_block("AE3DConv", "time_mix_conv"), fetched_forward(video_conv_forward)),
            BlockRule(lambda m: type(m).__name__ in FRAME_LOCAL_MODULES and not hasattr(m, "dims"),
                      fetched_forward(frame_local_forward)),
        ),
        decode_estimate=decode_estimate, input="VAE",
        probes={
            "video_decoder_forward": Probe(svd_decoder),
            "decoder_video_resblock_forward": Probe(svd_decoder_block("x")),
            "video_conv_forward": Probe(svd_decoder_block("input")),
            "frame_local_forward": Probe(frame_local),
        },
    ),
)
