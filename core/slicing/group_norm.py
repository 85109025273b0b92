"""GroupNorm with statistics gathered over slices, so a strip-sliced GroupNorm is exact."""
import torch
from torch import nn


def cast_affine(norm: nn.Module, name: str, like: torch.Tensor):
    """A norm's weight or bias (fp32) as the host's own forward sees it: cast to the input's device
    and dtype, then host weight patches applied (ComfyUI keeps weights offloaded in low-VRAM mode and
    lists patches in `<name>_function`; they patch in place, so they get a copy)."""
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
        weight, bias = cast_affine(self.norm, "weight", x), cast_affine(self.norm, "bias", x)
        if weight is not None:
            y = y * weight.reshape(affine_shape)
        if bias is not None:
            y = y + bias.reshape(affine_shape)
        return y.to(x.dtype)
