"""The one mechanism that puts replacement attributes (forwards, methods) on module instances and
takes them off again, leaving whatever the instances held before (a ComfyUI ModelPatcher's
object patches included)."""
from contextlib import contextmanager

from torch import nn

_MISSING = object()


def install(model: nn.Module, patches: dict) -> list:
    """Sets every patch (attribute path from `model` -> value); returns (owner, attribute, what the
    owner's instance held before) per patch, for `restore`."""
    installed = []
    for path, value in patches.items():
        owner_path, _, attribute = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        installed.append((owner, attribute, owner.__dict__.get(attribute, _MISSING)))
        setattr(owner, attribute, value)
    return installed


def restore(installed: list) -> None:
    for owner, attribute, previous in reversed(installed):
        if previous is _MISSING:
            owner.__dict__.pop(attribute, None)
        else:
            owner.__dict__[attribute] = previous


@contextmanager
def patches_applied(model: nn.Module, patches: dict):
    """`patches` installed on `model` inside the with-block only."""
    installed = install(model, patches)
    try:
        yield model
    finally:
        restore(installed)
