"""Modules that treat every frame of a (batch*frames, C, H, W) tensor on its own."""
from typing import Callable

from torch import nn

from .settings import SliceSettings
from .slices import map_slices


def frame_local_forward(module: nn.Module, settings: SliceSettings) -> Callable:
    stock_forward = type(module).forward.__get__(module)

    def forward(x, *args, **kwargs):
        return map_slices(lambda xs, s: stock_forward(xs, *args, **kwargs),
                          x, 0, settings.frames(x.shape[0], x[0].numel()))
    return forward
