"""Running a function slice by slice along one axis into a preallocated output."""
from typing import Callable, Optional, Sequence

import torch

SliceFn = Callable[[torch.Tensor, slice], torch.Tensor]


def chunk_slices(length: int, chunks: int) -> list[slice]:
    """`chunks` contiguous slices covering range(length), sizes differing by at most one."""
    chunks = max(1, min(chunks, length))
    base, extra = divmod(length, chunks)
    slices, start = [], 0
    for i in range(chunks):
        stop = start + base + (1 if i < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def take(x: torch.Tensor, dim: int, s: slice) -> torch.Tensor:
    return x[(slice(None),) * dim + (s,)]


def map_slices(fn: SliceFn, x: torch.Tensor, dim: int, chunks: int,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[..., s, ...] = fn(x[..., s, ...], s) for each slice s along `dim`.

    fn must keep the size of `dim`. `out` may be `x` itself (in place): each slice is read
    completely before it is written. Without `out`, it is allocated from the first result.
    """
    for s in chunk_slices(x.shape[dim], chunks):
        y = fn(take(x, dim, s), s)
        if out is None:
            shape = list(y.shape)
            shape[dim] = x.shape[dim]
            out = y.new_empty(shape)
        take(out, dim, s).copy_(y)
        del y
    return out


def chain(layers: Sequence[SliceFn]) -> SliceFn:
    def run(xs, s):
        for layer in layers:
            xs = layer(xs, s)
        return xs
    return run


def run_stage(layers: Sequence[SliceFn], x: torch.Tensor, dim: int, chunks: int, grouped: bool,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run consecutive layers that slice along the same axis.

    Grouped (Operator Grouper): the whole chain runs per slice, so only one slice of each
    intermediate exists. Otherwise (Feature Slicer alone) each layer runs sliced on its own and
    hands a full tensor to the next.
    """
    if grouped:
        return map_slices(chain(layers), x, dim, chunks, out)
    for i, layer in enumerate(layers):
        x = map_slices(layer, x, dim, chunks, out if i == len(layers) - 1 else None)
    return x


def slice_batch_aligned(value, s: slice, batch: int):
    """The rows of a per-sample side input (embedding, context) that belong to slice s."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[s]
    return value
