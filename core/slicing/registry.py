"""The table of supported model families and blocks, and the one mechanism that installs and
removes sliced forwards (as ComfyUI object patches, or directly on a plain torch module)."""
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .diffusers_svd import (spatio_temporal_resblock_forward, temporal_decoder_forward, time_conv_forward,
                            transformer_spatio_temporal_forward)
from .fetched_weights import fetching_once
from .frame_local import frame_local_forward
from .settings import SliceSettings
from .svd_unet import spatial_video_transformer_forward, unet_patches, video_resblock_forward
from . import self_check, svd_vae, wan_vae, workloads
from .svd_vae import FRAME_LOCAL_MODULES, decoder_video_resblock_forward, video_conv_forward, video_decoder_forward
from ..host import derives_from
from ..patching import install, patches_applied
from .wan import vace_block_forward, wan_block_forward
from .whole_model import caller_forward


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
    """A block's sliced forward, with its layers' weights fetched once per call (not once per chunk)."""
    return lambda module, settings: {"forward": fetching_once(module, make_forward(module, settings))}


def _frame_local_children(*names):
    """Patches for child modules (or numbered children of a ModuleList) that are frame-local."""
    def make(module, settings):
        patches = {}
        for name in names:
            child = getattr(module, name)
            children = child.named_children() if isinstance(child, nn.ModuleList) else [("", child)]
            for index, grandchild in children:
                path = f"{name}.{index}" if index else name
                patches[f"{path}.forward"] = frame_local_forward(grandchild, settings)
        return patches
    return make


@dataclass(frozen=True)
class Caller:
    """A root model class of a family, as it calls the family's blocks.

    title: the model as ComfyUI users know it (its templates' name).
    keeps_inputs: paths of the blocks whose input tensor the root reads again after the block ran
        (VACE's first block: x_orig); a sliced block writes its output into its input only where the
        root drops it, i.e. in every other block of the root.
    between_blocks: what the root adds to the stream between blocks ("" = nothing), which Step Rehash
        would cache and add again; it refuses such roots with this reason.
    refused: why the slicer refuses the root ("" = it slices every block stack)."""
    name: str
    title: str
    keeps_inputs: tuple = ()
    between_blocks: str = ""
    refused: str = ""


@dataclass(frozen=True)
class Family:
    """A row of the table every part of the pack reads: the slicer (`signature`, `rules`), the
    self-check (the rules' probes), the Memory Planner (`step_inputs`, `finer_slicing`,
    `repeated_stack`, `decode_estimate`) and DualParal (`pipeline_parts`, `pipeline_classes`).

    root: class name of the whole model the family's blocks live in (model-level rows need it).
    callers: the root classes (the root and its subclasses) the family knows, as Caller rows; a root
        class the family does not list is refused (a variant whose forward was not read).
    block: the class every block of a listed stack derives from; each must be patched.
    decode_estimate(vae, settings, stock_estimate), for VAE families: the memory estimate ComfyUI
        sizes decode batches with, for the sliced decode.
    step_inputs(model, Workload) -> forward(twin, device): one sampling step, for the predictor.
    finer_slicing(model, Workload, steps) -> SliceSettings past auto, coarsest first.
    repeated_stack: the attribute holding alike blocks that pass one fixed-size tensor along, so the
        predictor runs two of them.
    pipeline_parts: what a DualParal rank stage uses of the model (empty: DualParal refuses it);
    pipeline_classes: the host classes (module.Class) a cluster rank may rebuild from a request.
    step_rehash: how Step Rehash finds the deep blocks it skips ("unet": the mirrored input / output
        blocks around the middle block; "dit": the stack of `repeated_stack`; "": it refuses the family).
    input: the ComfyUI input type a node slices the family through (MODEL or VAE; "diffusers": the
        plain-torch API only)."""
    name: str
    signature: Callable[[nn.Module], bool]
    rules: tuple
    root: str = ""
    callers: tuple = ()
    block: str = ""
    decode_estimate: Optional[Callable] = None
    step_inputs: Optional[Callable] = None
    finer_slicing: Optional[Callable] = None
    repeated_stack: str = ""
    pipeline_parts: tuple = ()
    pipeline_classes: tuple = ()
    input: str = "MODEL"
    step_rehash: str = ""

    def caller(self, model: nn.Module) -> Optional[Caller]:
        """The row of `model`'s own class (None: a class this family does not list)."""
        return next((c for c in self.callers if c.name == type(model).__name__), None)


def _wan_vae_decode(vae: nn.Module, settings: SliceSettings) -> dict:
    try:
        return {"decode": wan_vae.wan_vae_decode(vae, settings)}
    except wan_vae.UnsupportedDecoderError as error:
        raise UnsupportedModelError(f"this Wan VAE's decoder cannot be sliced exactly: {error}") from None


WAN_CALLERS = (
    Caller("WanModel", "Wan 2.1 / 2.2 (text / image-to-video, Fun, Bernini-R, InfiniteTalk)"),
    Caller("CameraWanModel", "Wan Fun Camera"),
    Caller("VaceWanModel", "Wan VACE", keeps_inputs=("blocks.0",),
           between_blocks="VACE adds its control hints to the stream after its blocks"),
    Caller("WanModel_S2V", "Wan 2.2 S2V", between_blocks="S2V injects audio into the stream between its blocks"),
    Caller("AnimateWanModel", "Wan 2.2 Animate",
           between_blocks="Animate adds its face adapter's output after every fifth block"),
    Caller("SCAILWanModel", "Wan SCAIL"),
    Caller("SCAIL2WanModel", "Wan SCAIL 2"),
    Caller("WanDancerModel", "WanDancer", between_blocks="WanDancer injects music into the stream between its blocks"),
    Caller("HumoWanModel", "Wan HuMo", refused="its blocks run an audio cross-attention of their own "
           "(WanAttentionBlockAudio), not covered yet"),
    Caller("WanAnimate2Model", "Wan Animate 2", refused="its blocks run separate pose and generation branches "
           "(forward_pose / forward_gen), not covered yet"),
    Caller("CausalWanModel", "Wan Causal Forcing", refused="its blocks keep a causal key/value cache "
           "across calls, not covered yet"),
)

FAMILIES = (
    Family(
        "SVD-family video UNet (ComfyUI openaimodel: VideoResBlock, SpatialVideoTransformer)",
        signature=_is("VideoResBlock", "in_layers", "time_stack"),
        root="UNetModel", step_inputs=workloads.svd_step, finer_slicing=workloads.finer_strips, step_rehash="unet",
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
        decode_estimate=svd_vae.decode_estimate, input="VAE",
    ),
    Family(
        "Wan 2.1 / 2.2 VAE (ComfyUI wan/vae.py, wan/vae2_2.py: WanVAE)",
        signature=_is("WanVAE", "decoder", "conv2"), root="WanVAE",
        rules=(BlockRule(_is("WanVAE", "decoder", "conv2"), _wan_vae_decode),),
        decode_estimate=wan_vae.decode_estimate, input="VAE",
    ),
    Family(
        "Wan 2.1 / 2.2 DiT (ComfyUI wan/model.py: WanAttentionBlock)",
        signature=_is("WanAttentionBlock", "self_attn", "cross_attn", "ffn", "modulation"),
        root="WanModel", block="WanAttentionBlock", callers=WAN_CALLERS,
        step_inputs=workloads.wan_step, finer_slicing=workloads.finer_token_chunks,
        repeated_stack="blocks", step_rehash="dit",
        pipeline_parts=("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head",
                        "rope_encode", "unpatchify", "patch_size", "freq_dim", "dim"),
        pipeline_classes=("comfy.ldm.wan.model.WanModel",),
        rules=(  # each block fetches its weights stage by stage
            BlockRule(lambda m: type(m).__name__ == "WanAttentionBlock",
                      lambda module, settings: {"forward": wan_block_forward(module, settings)}),
            BlockRule(lambda m: type(m).__name__ == "VaceWanAttentionBlock" and hasattr(m, "after_proj"),
                      lambda module, settings: {"forward": vace_block_forward(module, settings)}),
            # the whole model, so that a block exact alone but wrong in its caller falls back (self-check)
            BlockRule(lambda m: derives_from(m, "WanModel") and hasattr(m, "blocks"), caller_forward),
        ),
    ),
    Family(
        "diffusers SVD (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder)",
        signature=_is("SpatioTemporalResBlock", "spatial_res_block", "temporal_res_block"), input="diffusers",
        rules=(
            BlockRule(_is("SpatioTemporalResBlock", "spatial_res_block", "temporal_res_block"),
                      _forward(spatio_temporal_resblock_forward)),
            BlockRule(_is("TransformerSpatioTemporalModel", "temporal_transformer_blocks"),
                      _forward(transformer_spatio_temporal_forward)),
            BlockRule(lambda m: type(m).__name__ in ("Upsample2D", "Downsample2D"), _forward(frame_local_forward)),
            BlockRule(_is("MidBlockTemporalDecoder", "attentions"), _frame_local_children("attentions")),
            BlockRule(_is("TemporalDecoder", "time_conv_out"),
                      lambda m, s: {"forward": temporal_decoder_forward(m, s)} if s.group_ops else {
                          **_frame_local_children("conv_norm_out", "conv_out")(m, s),
                          "time_conv_out.forward": time_conv_forward(m.time_conv_out, s)}),
            BlockRule(_is("UNetSpatioTemporalConditionModel", "conv_norm_out"),
                      _frame_local_children("conv_norm_out", "conv_out")),
        ),
    ),
)

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
                for key, value in self_check.checked(module, rule.make, block_settings, base).items():
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
