"""The table of supported model families and blocks, and the one mechanism that installs and
removes sliced forwards (as ComfyUI object patches, or directly on a plain torch module)."""
from typing import Callable, Optional

from torch import nn

from . import self_check
from ..host import derives_from
from ..patching import install, patches_applied
from .families import FAMILIES
from .families.rows import Caller, Family, UnsupportedModelError
from .settings import SliceSettings


def short_name(family: Family) -> str:
    return family.name.split(" (")[0]


def supported(input_type: str) -> str:
    """The families a node taking `input_type` (MODEL or VAE) slices, in users' words."""
    return ", ".join(short_name(f) for f in FAMILIES if f.input == input_type)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family whose whole model `model` is (its root class, holding the family's blocks)."""
    modules = list(model.modules())
    return next((f for f in FAMILIES if f.root and derives_from(model, f.root)
                 and any(f.signature(m) for m in modules)), None)


def caller_of(model: nn.Module) -> tuple:
    """(family, its Caller row of `model`'s class) of a root model whose family lists callers, or
    (family, None) / (None, None) where it lists none or `model` is no family's root."""
    family = family_of(model)
    return family, (family.caller(model) if family and family.callers else None)


def refusal(model: nn.Module, input_type: str = "MODEL") -> str:
    """Why a model gets no slicing, in one or two sentences naming the model and what to do, or ""."""
    family, caller = caller_of(model)
    if family is not None and family.callers:
        if caller is None:
            return (f"{type(model).__name__} is a {short_name(family)} variant Streamline does not know yet, so it "
                    f"cannot show slicing it is exact; it runs stock without this node.")
        if caller.refused:
            return (f"{caller.title} ({caller.name}) is not supported: {caller.refused}. It runs stock without "
                    f"this node.")
    if family is None and not any(f.signature(m) for m in model.modules() for f in FAMILIES):
        kind = "MODEL" if input_type == "MODEL" else "VAE"
        return (f"this {kind} is {type(model).__name__}, which Streamline cannot slice (it slices "
                f"{supported(input_type)}); it runs stock without this node.")
    return ""


def plain_root(family: Family, caller: Optional[Caller]) -> bool:
    """Whether the model is the family's own root class, not a variant whose forward takes inputs of
    its own (what the planner's dry run and DualParal's ranks make)."""
    return not family.callers or (caller is not None and caller.name == family.root)


def rehash_refusal(family: Family, caller: Optional[Caller]) -> str:
    """Why Step Rehash cannot skip this root's deep blocks ("": it can)."""
    if not family.step_rehash:
        return "not a family Step Rehash knows"
    if family.callers and caller is None:
        return "a variant the family table does not list"
    return caller.refused or caller.between_blocks if caller is not None else ""


def diffusion_family(model: nn.Module) -> Family:
    """The family of a diffusion model the Memory Planner can predict."""
    family, caller = caller_of(model)
    if family is None or family.step_inputs is None or (family.callers and caller is None):
        known = ", ".join(short_name(f) for f in FAMILIES if f.step_inputs)
        raise UnsupportedModelError(f"this MODEL is {type(model).__name__}, which the Memory Planner cannot "
                                    f"predict (it predicts {known}); plan without it, or add Feature Slicer + "
                                    f"Operator Grouper by hand.")
    if not plain_root(family, caller):
        raise UnsupportedModelError(f"{caller.title} ({caller.name}) takes inputs of its own that the Memory "
                                    f"Planner's dry run does not make; add Feature Slicer + Operator Grouper by "
                                    f"hand instead (they slice it).")
    return family


def slicing_patches(root: nn.Module, settings: SliceSettings, prefix: str = "", input_type: str = "MODEL") -> dict:
    """Every replacement that slices `root`, keyed by attribute path from `root` (with `prefix`).

    Raises UnsupportedModelError, saying why and what to do, when `root` is not sliced whole: no
    family's blocks, a root class the family refuses or does not list, a block of a listed stack no
    rule patches, or nothing to patch at all."""
    reason = refusal(root, input_type)
    if reason:
        raise UnsupportedModelError(reason)
    modules = list(root.named_modules())
    families = [f for f in FAMILIES if any(f.signature(m) for _, m in modules)]
    _, caller = caller_of(root)
    patches = {}
    for path, module in modules:
        for family in families:
            rule = next((r for r in family.rules if r.matches(module)), None)
            if rule is None and family.block and derives_from(module, family.block):
                raise UnsupportedModelError(
                    f"{type(root).__name__} holds a {type(module).__name__} at {path}, a block Streamline does not "
                    f"slice yet; the model runs stock without this node.")
            if rule is not None:
                base = f"{prefix}{path}." if path else prefix
                block_settings = settings
                if caller is not None and family.block and derives_from(module, family.block):
                    block_settings = settings.merged(caller_drops_input=path not in caller.keeps_inputs)
                for key, value in self_check.checked(module, rule.make, block_settings, base, family.probes).items():
                    # a parent's rule may already have patched this module, coordinated with itself
                    patches.setdefault(base + key, value)
                break
    if not patches:
        raise UnsupportedModelError(f"{type(root).__name__} has nothing Streamline can slice with these settings; "
                                    f"it runs stock without this node.")
    self_check.link_groups(patches.values())
    return patches


def decode_estimate(vae: nn.Module, settings: SliceSettings, stock_estimate: Callable) -> Callable:
    """The decode memory estimate of `vae` sliced with `settings` (stock's where no family has one)."""
    family = next((f for f in FAMILIES if f.decode_estimate and any(f.signature(m) for m in vae.modules())), None)
    return family.decode_estimate(vae, settings, stock_estimate) if family else stock_estimate


_INSTALLED = "_streamline_sliced_attributes"


def _models(target) -> list:
    """The torch modules of `target`: itself, or the model components of a diffusers pipeline."""
    if isinstance(target, nn.Module):
        return [target]
    components = getattr(target, "components", None)
    if isinstance(components, dict):
        return [m for m in components.values() if isinstance(m, nn.Module)]
    raise TypeError(f"expected a torch module or a diffusers pipeline, got {type(target).__name__}")


def apply_slicing(target, settings: SliceSettings):
    """Slice a plain torch module, or every supported model of a diffusers pipeline (its UNet and
    VAE), in place, for use outside ComfyUI; `remove_slicing` undoes it. Nothing is patched when
    the target holds no supported model."""
    plans = []
    for model in _models(target):
        try:
            plans.append((model, slicing_patches(model, settings)))
        except UnsupportedModelError:
            if model is target:
                raise
    if not plans:
        raise UnsupportedModelError(
            f"{type(target).__name__} has no model with video blocks that Streamline can slice (it slices "
            f"{supported('MODEL')}, {supported('VAE')}, {supported('diffusers')}).")
    for model, patches in plans:
        remove_slicing(model)
        setattr(model, _INSTALLED, [(owner, attribute) for owner, attribute, _ in install(model, patches)])
    return target


def remove_slicing(target):
    for model in _models(target):
        for owner, attribute in getattr(model, _INSTALLED, ()):
            owner.__dict__.pop(attribute, None)
        model.__dict__.pop(_INSTALLED, None)
    return target


def slicing_applied(model: nn.Module, settings: SliceSettings):
    """`model` sliced with `settings` inside the with-block only; afterwards every attribute it
    patched is as it was, including forwards that others (a ComfyUI ModelPatcher) had installed."""
    return patches_applied(model, slicing_patches(model, settings))
