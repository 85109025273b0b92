"""The whole diffusion model as the self-check's caller probe: a block can be exact alone and wrong
in its caller (a caller that reads a tensor the block wrote into). The model's forward is patched
with a pass-through whose probe (self_check.Probe caller=True) runs the whole model stock and with
every sliced block inside it on a probe-sized input; where the two differ, every block inside falls
back to stock."""
from torch import nn

from .settings import SliceSettings


def caller_forward(model: nn.Module, settings: SliceSettings) -> dict:
    stock = type(model).forward.__get__(model)

    def forward(*args, **kwargs):
        return stock(*args, **kwargs)
    return {"forward": forward}
