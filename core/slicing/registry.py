"""The table of supported model families and blocks, and the one mechanism that installs and
removes sliced forwards (as ComfyUI object patches, or directly on a plain torch module)."""
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .frame_local import frame_local_forward
from .settings import SliceSettings
from .svd_unet import spatial_video_transformer_forward, unet_patches, video_resblock_forward
from .svd_vae import FRAME_LOCAL_MODULES, decoder_video_resblock_forward, video_conv_forward, video_decoder_forward
from .temporal import derives_from


class UnsupportedModelError(ValueError):
    pass


def _is(class_name: str, *attributes: str) -> Callable[[nn.Module], bool]:
    """Matches instances of a class called `class_name` (or of a subclass) that have `attributes`."""
    return lambda m: derives_from(m, class_name) and all(hasattr(m, a) for a in attributes)


@dataclass(frozen=True)
class BlockRule:
    """Modules matching `matches` get the patches `make(module, settings)`: attribute path
    (relative to the module) -> replacement."""
    matches: Callable[[nn.Module], bool]
    make: Callable[[nn.Module, SliceSettings], dict]


def _forward(make_forward):
    return lambda module, settings: {"forward": make_forward(module, settings)}


@dataclass(frozen=True)
class Family:
    name: str
    signature: Callable[[nn.Module], bool]
    rules: tuple


FAMILIES = (
    Family(
        "SVD-family video UNet (ComfyUI openaimodel: VideoResBlock, SpatialVideoTransformer)",
        signature=_is("VideoResBlock", "in_layers", "time_stack"),
        rules=(
            BlockRule(_is("VideoResBlock", "in_layers", "time_stack"), _forward(video_resblock_forward)),
            BlockRule(_is("SpatialVideoTransformer", "time_stack"), _forward(spatial_video_transformer_forward)),
            BlockRule(lambda m: type(m).__name__ in ("Upsample", "Downsample") and getattr(m, "dims", None) == 2,
                      _forward(frame_local_forward)),
            BlockRule(_is("UNetModel", "out", "output_blocks"), unet_patches),
        ),
    ),
    Family(
        "SVD temporal VAE decoder (ComfyUI temporal_ae.VideoDecoder)",
        signature=_is("VideoDecoder", "conv_out", "up"),
        rules=(
            # grouped: the decoder's own forward runs every block; alone: each block is patched
            BlockRule(_is("VideoDecoder", "conv_out", "up"),
                      lambda module, settings: {"forward": video_decoder_forward(module, settings)}
                      if settings.group_ops else {}),
            BlockRule(_is("VideoResBlock", "norm1", "time_stack"), _forward(decoder_video_resblock_forward)),
            BlockRule(_is("AE3DConv", "time_mix_conv"), _forward(video_conv_forward)),
            BlockRule(lambda m: type(m).__name__ in FRAME_LOCAL_MODULES and not hasattr(m, "dims"),
                      _forward(frame_local_forward)),
        ),
    ),
)

SUPPORTED = "; ".join(f.name for f in FAMILIES)


def slicing_patches(root: nn.Module, settings: SliceSettings, prefix: str = "") -> dict:
    """Every replacement that slices `root`, keyed by attribute path from `root` (with `prefix`).

    Raises UnsupportedModelError, naming the supported families, when `root` contains none."""
    modules = list(root.named_modules())
    families = [f for f in FAMILIES if any(f.signature(m) for _, m in modules)]
    if not families:
        raise UnsupportedModelError(
            f"{type(root).__name__} has no video blocks that Streamline can slice. Supported: {SUPPORTED}.")
    patches = {}
    for path, module in modules:
        for family in families:
            rule = next((r for r in family.rules if r.matches(module)), None)
            if rule is not None:
                base = f"{prefix}{path}." if path else prefix
                for key, value in rule.make(module, settings).items():
                    # a parent's rule may already have patched this module, coordinated with itself
                    patches.setdefault(base + key, value)
                break
    return patches


_INSTALLED = "_streamline_sliced_attributes"


def apply_slicing(root: nn.Module, settings: SliceSettings) -> nn.Module:
    """Slice a plain torch module in place (for use outside ComfyUI); `remove_slicing` undoes it."""
    patches = slicing_patches(root, settings)
    remove_slicing(root)
    installed = []
    for path, value in patches.items():
        owner_path, _, attribute = path.rpartition(".")
        owner = root.get_submodule(owner_path)
        setattr(owner, attribute, value)
        installed.append((owner, attribute))
    setattr(root, _INSTALLED, installed)
    return root


def remove_slicing(root: nn.Module) -> nn.Module:
    for owner, attribute in getattr(root, _INSTALLED, ()):
        owner.__dict__.pop(attribute, None)
    root.__dict__.pop(_INSTALLED, None)
    return root
