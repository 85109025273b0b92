"""Layer weights fetched once per sliced stage instead of once per chunk.

A ComfyUI layer that is offloaded (partial loading, --lowvram), stored in another dtype than it
computes in (manual cast), or carries low-VRAM weight patches (LoRA applied on the fly) casts,
patches and moves its weight to the compute device on every call (comfy.ops cast_bias_weight). A
sliced block calls each layer once per chunk, so while a stage runs each such layer's weight is
fetched on its first call with the host's own cast_bias_weight and handed to the host's own forward
on every later call (as a layer whose weight is already in place), then released with the stage.

Only the host's plain cast layers qualify (the disable_weight_init / manual_cast classes, whose
cast forward is the plain op on the fetched weight); fp8, quantized and dynamic-VRAM (aimdo `_v`)
layers keep fetching per call, as stock does.
"""
import functools
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..host import host_function
from ..patching import patches_applied

PLAIN_CAST_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm", "RMSNorm")


def fetches_weights(layer: nn.Module) -> bool:
    """Whether the host's layer casts or moves its weight on every call, by its plain cast."""
    if getattr(layer, "weight", None) is None or hasattr(layer, "_v") or not hasattr(layer, "comfy_cast_weights"):
        return False
    if not (layer.comfy_cast_weights or layer.weight_function or layer.bias_function):
        return False
    cast_forward = getattr(type(layer), "forward_comfy_cast_weights", None)
    return getattr(cast_forward, "__qualname__", "") in {
        f"disable_weight_init.{name}.forward_comfy_cast_weights" for name in PLAIN_CAST_LAYERS}


def fetched_once_forward(layer: nn.Module) -> Callable:
    cast_bias_weight = host_function(layer, "cast_bias_weight")
    fetched = {}

    def forward(input, *args, **kwargs):
        key = (input.dtype, input.device)
        if key not in fetched:
            # without `offloadable` the host returns tensors of its own, not a shared cast buffer
            fetched[key] = cast_bias_weight(layer, input)
        with weights_in_place(layer, *fetched[key]):
            return type(layer).forward(layer, input, *args, **kwargs)
    forward.fetches_once = True
    return forward


@contextmanager
def weights_fetched_for(layer: nn.Module, like: torch.Tensor):
    """`layer`'s weight fetched now for inputs like `like` and in place inside the with-block, for a
    caller that runs the layer's class forward directly (not its instance's)."""
    if not fetches_weights(layer):
        yield
        return
    with weights_in_place(layer, *host_function(layer, "cast_bias_weight")(layer, like)):
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
