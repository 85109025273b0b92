"""GroupNorm with statistics gathered over slices, so a strip-sliced GroupNorm is exact."""
import torch
from torch import nn

from ..host import host_function
from .fetched_weights import fetches_weights


def cast_affine(norm: nn.Module, like: torch.Tensor) -> tuple:
    """A norm's weight and bias (fp32) as the host's own forward sees them: ComfyUI's plain cast
    layers (kept offloaded in low-VRAM mode, or patched on the fly) fetch them through the host's
    cast; others are moved to the input's device and dtype, with any host weight patches listed in
    `<name>_function` applied (to a copy: they patch in place)."""
    if fetches_weights(norm):
        fetched = host_function(norm, "cast_bias_weight")(norm, like)
        return tuple(None if value is None else value.float() for value in fetched)
    return tuple(_moved(norm, name, like) for name in ("weight", "bias"))


def _moved(norm: nn.Module, name: str, like: torch.Tensor):
    value = getattr(norm, name, None)
    if value is None:
        return None
    functions = getattr(norm, f"{name}_function", ())
    value = value.to(device=like.device, dtype=like.dtype, copy=bool(functions))
    for patch in functions:
        value = patch(value)
    return value.float()


class ExactGroupNorm:
    """Applies `norm` (an nn.GroupNorm) to slices of a tensor with the whole tensor's statistics.

    Statistics are merged slice by slice (Chan et al.'s parallel variance), in fp32.
    """

    def __init__(self, norm: nn.Module):
        self.norm = norm
        self.groups = norm.num_groups
        self.reset()

    def reset(self):
        self.count = 0
        self.mean = None
        self.m2 = None
        self.affine = {}  # (device, dtype) -> weight and bias, fetched once per use

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().reshape(x.shape[0], self.groups, -1)

    def accumulate(self, x: torch.Tensor):
        xg = self._grouped(x)
        n = xg.shape[-1]
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rstd = torch.rsqrt(self.m2 / self.count + self.norm.eps)
        y = (self._grouped(x) - self.mean[..., None]) * rstd[..., None]
        y = y.reshape(x.shape)
        affine_shape = (1, -1) + (1,) * (x.ndim - 2)
        key = (x.device, x.dtype)
        if key not in self.affine:
            self.affine[key] = cast_affine(self.norm, x)
        weight, bias = self.affine[key]
        if weight is not None:
            y = y * weight.reshape(affine_shape)
        if bias is not None:
            y = y + bias.reshape(affine_shape)
        return y.to(x.dtype)
