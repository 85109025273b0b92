"""What core knows of the host library (ComfyUI, diffusers) without importing it: classes are
recognised by name, and the host's own helper functions and forwards are taken from the modules
that define its classes, so replacements compute exactly what the host's code does."""
import sys
from typing import Callable

from torch import nn


def derives_from(module: nn.Module, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(module).__mro__)


def parent_forward(module: nn.Module, class_name: str) -> Callable:
    """The forward of the class that `class_name` extends, bound to `module` (the spatial half of
    a video block that subclasses an image block)."""
    for cls in type(module).__mro__:
        if cls.__name__ == class_name:
            return super(cls, module).forward
    raise TypeError(f"{type(module).__name__} does not derive from {class_name}")


def host_function(module: nn.Module, name: str) -> Callable:
    """A helper function of the host library, taken from the module that defines `module`'s class
    (or a base class), so the sliced forward computes exactly what the stock one does."""
    for cls in type(module).__mro__:
        function = getattr(sys.modules[cls.__module__], name, None)
        if function is not None:
            return function
    raise TypeError(f"no {name} next to {type(module).__name__}")
