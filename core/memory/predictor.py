"""Dry-run memory prediction: a model's forward (or a VAE decode) for a latent shape runs under
FakeTensorMode on a weightless twin of the model, with the live-storage tracker counting the
activation peak on the target device. No memory of the model's size is used, so full-size models
are predicted on any CPU in seconds; the twin shares nothing with the model, which stays untouched.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .tracker import LiveStorageTracker
from ..slicing import SliceSettings, apply_slicing
from ..slicing.registry import diffusion_family, family_of
from ..slicing.workloads import Workload, WorkloadError  # noqa: F401  (the planner's inputs)


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
    family = family_of(twin)
    if family is not None and family.repeated_stack:
        setattr(twin, family.repeated_stack, getattr(twin, family.repeated_stack)[:2])
    with FakeTensorMode(allow_non_fake_inputs=True):
        materialize_fake(twin, device)
        if settings is not None:
            apply_slicing(twin, settings)
        with torch.inference_mode(), LiveStorageTracker(device) as tracker:
            forward(twin, device)
    return tracker.peak


def model_forward(model: nn.Module, work: Workload) -> Callable:
    """The forward of one sampling step of `model` on `work`, for predict_peak."""
    return diffusion_family(model).step_inputs(model, work)


def slicing_ladder(model: nn.Module, work: Workload, steps: int = 3) -> list[Optional[SliceSettings]]:
    """Settings from the least slicing to the finest: stock (None), Feature Slicer, Slicer + Operator
    Grouper (auto), then the family's finer levels (2x, 4x, ... more chunks than auto along the axis
    that bounds its peak)."""
    finer = diffusion_family(model).finer_slicing(model, work, steps)
    return [None, SliceSettings(), SliceSettings(group_ops=True)] + list(dict.fromkeys(finer))
