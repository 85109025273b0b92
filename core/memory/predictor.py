"""Dry-run memory prediction: a model's forward (or a VAE decode) for a latent shape runs under
FakeTensorMode on a weightless twin of the model, with the live-storage tracker counting the
activation peak on the target device. No memory of the model's size is used, so full-size models
are predicted on any CPU in seconds; the twin shares nothing with the model, which stays untouched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .tracker import LiveStorageTracker
from ..slicing import SliceSettings, UnsupportedModelError, apply_slicing
from ..slicing.settings import AUTO_STRIP_WIDTH, AUTO_TOKEN_ELEMENTS
from ..host import derives_from


# Models whose block stack passes one tensor of fixed size from block to block, with nothing kept
# across blocks: the stack peaks alike inside any block, so the prediction runs two of them.
REPEATED_STACKS = {"WanModel": "blocks"}


def meta_twin(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device (no data copied)."""
    memo = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        twin = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(twin, requires_grad=False) if isinstance(tensor, nn.Parameter) else twin
    return copy.deepcopy(module, memo)


def materialize_fake(module: nn.Module, device: str = "cpu") -> nn.Module:
    """Gives a meta module fake weights on `device`. Call inside a FakeTensorMode: shapes, dtypes
    and storage sizes are real, memory is not used (fake "cuda" tensors need no GPU)."""
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def predict_peak(module: nn.Module, forward: Callable[[nn.Module, str], object],
                 settings: Optional[SliceSettings] = None, device: str = "cuda") -> int:
    """Activation peak in bytes of `forward(model, device)` on a fake twin of `module` on `device`
    (only that device's storage is counted), sliced with `settings` when given."""
    twin = meta_twin(module)
    stack = REPEATED_STACKS.get(type(twin).__name__)
    if stack is not None:
        setattr(twin, stack, getattr(twin, stack)[:2])
    with FakeTensorMode(allow_non_fake_inputs=True):
        materialize_fake(twin, device)
        if settings is not None:
            apply_slicing(twin, settings)
        with torch.inference_mode(), LiveStorageTracker(device) as tracker:
            forward(twin, device)
    return tracker.peak


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


def _wan_forward(model: nn.Module, work: Workload) -> Callable:
    _check_latent(work, 5, "a video latent of batch x channels x frames x height x width (from a Wan or "
                           "EmptyHunyuanLatentVideo latent node)", model.out_dim)
    batch, _, frames, height, width = work.latent_shape
    batch *= work.cond_batches
    channels, text_width = model.patch_embedding.in_channels, model.text_embedding[0].in_features

    def forward(twin, device):
        twin(torch.empty(batch, channels, frames, height, width, dtype=work.dtype, device=device),
             torch.empty(batch, device=device), torch.empty(batch, 512, text_width, dtype=work.dtype, device=device))
    return forward


def _svd_forward(model: nn.Module, work: Workload) -> Callable:
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


def model_forward(model: nn.Module, work: Workload) -> Callable:
    """The forward of one sampling step of `model` on `work`, for predict_peak."""
    if derives_from(model, "WanModel"):
        return _wan_forward(model, work)
    if _is_svd_unet(model):
        return _svd_forward(model, work)
    raise UnsupportedModelError(f"{type(model).__name__}: the memory planner knows Wan (WanModel) and SVD "
                                f"(UNetModel with VideoResBlocks) diffusion models")


def _is_svd_unet(model: nn.Module) -> bool:
    return derives_from(model, "UNetModel") and any(type(m).__name__ == "VideoResBlock" for m in model.modules())


def slicing_ladder(model: nn.Module, work: Workload, steps: int = 3) -> list[Optional[SliceSettings]]:
    """Settings from the least slicing to the finest: stock (None), Feature Slicer, Slicer + Operator
    Grouper (auto), then the grouped slicing with 2x, 4x, ... more chunks than auto along the axis
    that bounds the peak (token chunks for DiTs, strips for UNets, whose spatial chunks are single
    frames already)."""
    ladder = [None, SliceSettings(), SliceSettings(group_ops=True)]
    if derives_from(model, "WanModel"):
        batch, _, frames, height, width = work.latent_shape
        tokens = frames * math.ceil(height / 2) * math.ceil(width / 2)
        auto = -(-tokens * model.dim // AUTO_TOKEN_ELEMENTS)
        finer = [SliceSettings(frame_chunks=min(tokens, auto * 2 ** i), group_ops=True) for i in range(1, steps + 1)]
    else:
        width = work.latent_shape[-1]
        auto = -(-width // AUTO_STRIP_WIDTH)
        finer = [SliceSettings(strip_chunks=min(width, auto * 2 ** i), group_ops=True) for i in range(1, steps + 1)]
    return ladder + list(dict.fromkeys(finer))
