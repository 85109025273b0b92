"""Layer weights fetched once per sliced stage instead of once per chunk.

A ComfyUI layer that is offloaded (partial loading, --lowvram), stored in another dtype than it
computes in (manual cast), or carries low-VRAM weight patches (LoRA applied on the fly) casts,
patches and moves its weight to the compute device on every call (comfy.ops cast_bias_weight). A
sliced block calls each layer once per chunk, so while a stage runs each such layer's weight is
fetched on its first call with the host's own cast_bias_weight and handed to the host's own forward
on every later call (as a layer whose weight is already in place), then released with the stage.

The layer classes that qualify are those whose cast forward is one op on the fetched weight, each
with how it computes from it (COMPUTES_WITH_FETCHED): the plain cast classes (disable_weight_init /
manual_cast), ComfyUI 0.3.75's fp8_scaled Linear where it dequantizes (no fp8 matrix multiply: the
weight times its scale), and the quantized Linear of mixed_precision_ops (0.3.75 and 0.33: the fp8 /
quantized files) where it dequantizes (full-precision matmul, offloaded, or patched). Quantized
matmuls, fp8 matmuls and dynamic-VRAM (aimdo `_v`) layers keep fetching per call, as stock does.
"""
import functools
import inspect
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..host import host_function
from ..patching import patches_applied

PLAIN_CAST_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm", "RMSNorm")
SCALED_FP8_LINEAR = "scaled_fp8_ops.<locals>.scaled_fp8_op.Linear.forward_comfy_cast_weights"
QUANTIZED_LINEAR = "mixed_precision_ops.<locals>.MixedPrecisionOps.Linear.forward_comfy_cast_weights"


def _casts(layer: nn.Module) -> bool:
    return bool(layer.comfy_cast_weights or layer.weight_function or layer.bias_function)


def _plain(layer, input, weight, bias, *args, **kwargs):
    with weights_in_place(layer, weight, bias):
        return type(layer).forward(layer, input, *args, **kwargs)


def _scaled_fp8(layer, input, weight, bias):
    """`weight` here is already times the layer's scale (fetched_once_forward scales it once)."""
    return torch.nn.functional.linear(input, weight, bias)


def _quantized(layer, input, weight, bias):
    return layer._forward(input, weight, bias)


def _layer_kind(layer: nn.Module):
    """(how the layer computes from its fetched weight, whether that weight is scaled after the
    fetch), or None where the layer does not fetch, or fetches in a way not replicated here."""
    if getattr(layer, "weight", None) is None or hasattr(layer, "_v") or not hasattr(layer, "comfy_cast_weights"):
        return None
    cast_forward = getattr(getattr(type(layer), "forward_comfy_cast_weights", None), "__qualname__", "")
    if cast_forward in {f"disable_weight_init.{name}.forward_comfy_cast_weights" for name in PLAIN_CAST_LAYERS}:
        return (_plain, False) if _casts(layer) else None
    if cast_forward == SCALED_FP8_LINEAR:  # scale_input is set exactly where it may take the fp8 matmul
        return (_scaled_fp8, True) if _casts(layer) and getattr(layer, "scale_input", 0) is None else None
    if cast_forward == QUANTIZED_LINEAR and getattr(layer, "pre_quant_scale", None) is None:
        dequantizes = (getattr(layer, "layout_type", None) is None or getattr(layer, "_full_precision_mm", False)
                       or getattr(layer, "comfy_force_cast_weights", False) or _casts(layer))
        return (_quantized, False) if dequantizes else None
    return None


def fetches_weights(layer: nn.Module) -> bool:
    """Whether the host's layer casts or moves its weight on every call in a way fetched once here."""
    return _layer_kind(layer) is not None


def _fetch(layer: nn.Module, input: torch.Tensor, compute: Callable) -> tuple:
    """(weight, bias) as the layer's own cast forward fetches them, as tensors of their own (without
    `offloadable` the host returns no shared cast buffer)."""
    cast_bias_weight = host_function(layer, "cast_bias_weight")
    if compute is _quantized and "compute_dtype" in inspect.signature(cast_bias_weight).parameters:
        return cast_bias_weight(layer, input, compute_dtype=input.dtype)  # 0.33's quantized Linear: patches in it
    return cast_bias_weight(layer, input)


def fetched_once_forward(layer: nn.Module) -> Callable:
    compute, scaled = _layer_kind(layer)
    fetched = {}

    def forward(input, *args, **kwargs):
        key = (input.dtype, input.device)
        if key not in fetched:
            weight, bias = _fetch(layer, input, compute)
            if scaled:
                weight = weight * layer.scale_weight.to(device=weight.device, dtype=weight.dtype)
            fetched[key] = weight, bias
        return compute(layer, input, *fetched[key], *args, **kwargs)
    forward.fetches_once = True
    return forward


@contextmanager
def weights_fetched_for(layer: nn.Module, like: torch.Tensor):
    """`layer`'s weight fetched now for inputs like `like` and in place inside the with-block, for a
    caller that runs the layer's class forward directly (not its instance's)."""
    if _layer_kind(layer) is None or _layer_kind(layer)[0] is not _plain:
        yield
        return
    with weights_in_place(layer, *_fetch(layer, like, _plain)):
        yield


@contextmanager
def weights_in_place(layer: nn.Module, weight, bias):
    """`layer` holding the fetched weight and bias as a layer that needs no cast."""
    parameters = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    saved_parameters = {name: layer._parameters[name] for name in parameters}
    layer._parameters.update(parameters)
    try:
        with patches_applied(layer, {"comfy_cast_weights": False, "weight_function": [], "bias_function": []}):
            yield
    finally:
        layer._parameters.update(saved_parameters)


def weights_fetched_once(root: nn.Module, parts: tuple = ("",)):
    """Inside the with-block, each fetching layer below `root` (in its submodules named by `parts`,
    "" = all) fetches its weight on its first call only; the weights are released at the end. Layers
    that an enclosing block fetches once already keep that block's fetch."""
    return patches_applied(root, {f"{path}.forward": fetched_once_forward(layer)
                                  for path, layer in root.named_modules()
                                  if path and path.startswith(parts) and fetches_weights(layer)
                                  and not getattr(layer.__dict__.get("forward"), "fetches_once", False)})


def fetching_once(root: nn.Module, forward: Callable) -> Callable:
    """`forward` (a sliced forward of `root`) with every layer below `root` fetched once per call
    (named as `forward`, which the self-check reads its maker from)."""
    @functools.wraps(forward)
    def call(*args, **kwargs):
        with weights_fetched_once(root):
            return forward(*args, **kwargs)
    return call
