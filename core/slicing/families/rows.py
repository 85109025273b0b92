"""What a family-table row is made of (Family, Caller, BlockRule) and the rule makers the families
share."""
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from ...host import derives_from
from ..fetched_weights import fetching_once
from ..frame_local import frame_local_forward
from ..settings import SliceSettings


class UnsupportedModelError(ValueError):
    pass


def is_block(class_name: str, *attributes: str) -> Callable[[nn.Module], bool]:
    """Matches instances of a class called `class_name` (or of a subclass) that have `attributes`."""
    return lambda m: derives_from(m, class_name) and all(hasattr(m, a) for a in attributes)


@dataclass(frozen=True)


class BlockRule:
    """Modules matching `matches` get the patches `make(module, settings)`: attribute path
    (relative to the module) -> replacement."""
    matches: Callable[[nn.Module], bool]
    make: Callable[[nn.Module, SliceSettings], dict]


def fetched_forward(make_forward):
    """A block's sliced forward, with its layers' weights fetched once per call (not once per chunk)."""
    return lambda module, settings: {"forward": fetching_once(module, make_forward(module, settings))}


def frame_local_children(*names):
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
    self-check (`probes`: maker of a sliced forward -> its Probe, or UNCHECKED_PROBE), the Memory Planner (`step_inputs`, `finer_slicing`,
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
    probes: dict = field(default_factory=dict)

    def caller(self, model: nn.Module) -> Optional[Caller]:
        """The row of `model`'s own class (None: a class this family does not list)."""
        return next((c for c in self.callers if c.name == type(model).__name__), None)
