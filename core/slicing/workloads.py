"""What one sampling step of a family's diffusion model is fed (the Memory Planner's predictor
inputs), and the slicing levels past auto for that family: rows of the family table."""
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .settings import AUTO_STRIP_WIDTH, AUTO_TOKEN_ELEMENTS, SliceSettings


@dataclass(frozen=True)
class Workload:
    """What a diffusion model is asked to denoise: the latent's shape (ComfyUI's LATENT layout,
    batch x channels x [frames x] height x width) and the conditioned batches (2 with CFG)."""
    latent_shape: tuple
    cond_batches: int = 2
    dtype: torch.dtype = torch.float16


class WorkloadError(ValueError):
    """A latent the model cannot take."""


def _check_latent(work: Workload, dims: int, layout: str, channels: int) -> None:
    shape = tuple(work.latent_shape)
    if len(shape) != dims or shape[1] != channels:
        raise WorkloadError(f"the latent has shape {list(shape)}; this model takes {layout} with {channels} channels")


def wan_step(model: nn.Module, work: Workload) -> Callable:
    _check_latent(work, 5, "a video latent of batch x channels x frames x height x width (from a Wan or "
                           "EmptyHunyuanLatentVideo latent node)", model.out_dim)
    batch, _, frames, height, width = work.latent_shape
    batch *= work.cond_batches
    channels, text_width = model.patch_embedding.in_channels, model.text_embedding[0].in_features

    def forward(twin, device):
        twin(torch.empty(batch, channels, frames, height, width, dtype=work.dtype, device=device),
             torch.empty(batch, device=device), torch.empty(batch, 512, text_width, dtype=work.dtype, device=device))
    return forward


def svd_step(model: nn.Module, work: Workload) -> Callable:
    _check_latent(work, 4, "ComfyUI's SVD latent of frames x channels x height x width (from "
                           "SVD_img2vid_Conditioning)", model.out_channels)
    frames, _, height, width = work.latent_shape  # ComfyUI's SVD latent: one row per frame
    batch = frames * work.cond_batches
    context_width = next(m.attn2.to_k.in_features for m in model.modules() if hasattr(m, "attn2"))
    vector_width = model.label_emb[0][0].in_features

    def forward(twin, device):
        empty = lambda *shape: torch.empty(*shape, dtype=work.dtype, device=device)  # noqa: E731
        twin(empty(batch, model.in_channels, height, width), torch.empty(batch, device=device),
             context=empty(batch, 1, context_width), y=empty(batch, vector_width),
             num_video_frames=frames, image_only_indicator=torch.zeros(work.cond_batches, frames, device=device))
    return forward


def finer_token_chunks(model: nn.Module, work: Workload, steps: int) -> list:
    """DiTs: 2x, 4x, ... more token chunks than auto (grouped)."""
    _, _, frames, height, width = work.latent_shape
    tokens = frames * math.ceil(height / 2) * math.ceil(width / 2)
    auto = -(-tokens * model.dim // AUTO_TOKEN_ELEMENTS)
    return [SliceSettings(frame_chunks=min(tokens, auto * 2 ** i), group_ops=True) for i in range(1, steps + 1)]


def finer_strips(model: nn.Module, work: Workload, steps: int) -> list:
    """UNets (whose spatial chunks are single frames already): 2x, 4x, ... more strips than auto."""
    width = work.latent_shape[-1]
    auto = -(-width // AUTO_STRIP_WIDTH)
    return [SliceSettings(strip_chunks=min(width, auto * 2 ** i), group_ops=True) for i in range(1, steps + 1)]
