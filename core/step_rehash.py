"""Step Rehash (FME, Sec. 4.3): a video model's deep features change little between nearby denoising
steps, so they are computed on refresh steps and reused on the steps between. Features are kept
once per kind of model call (cond / uncond batch and shape).

UNets (SVD family): on a refresh step the UNet runs whole and the output of the deepest output block
the shallow path reads (`output_blocks[n - shallow - 1]`) is kept. On a reusing step only the shallow
path runs: the first `shallow` input blocks, the last `shallow` output blocks and the head. Every
deeper layer returns an empty stand-in (zero channels, which the UNet's skip concatenations and
hand-overs pass along untouched) and the kept output takes the place of the deepest one.

DiTs (Wan): the first and last `shallow` transformer blocks run on every step; a refresh step keeps
what the blocks between add to the hidden state (their residual), a reusing step adds it back in
place of running them.

The blocks are found by structure, and each patched forward wraps whatever forward the layer had (a
Feature Slicer's sliced one included), so slicing runs inside refresh steps and the cache is stored
once, not per slice.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .slicing.registry import FAMILIES, caller_of, family_of, rehash_refusal, short_name


WRAPPED = "__rehash_wraps__"  # on each patched forward: the forward it runs on refresh steps


class UnsupportedRehashError(ValueError):
    """A model or settings Step Rehash cannot run; the message names the fix."""


@dataclass(frozen=True)
class RehashSettings:
    interval: int = 3  # a refresh step, then interval - 1 steps that reuse its deep features
    shallow_blocks: int = 3  # input blocks (and as many output blocks) that run on every step
    full_first_steps: int = 2  # always refreshed, as are the last ones
    full_last_steps: int = 1

    def refreshes(self, step: int, steps: int) -> bool:
        if step < self.full_first_steps or step >= steps - self.full_last_steps:
            return True
        return (step - self.full_first_steps) % self.interval == 0


@dataclass
class RehashState:
    """What the patched layers read during one model call, and the features kept between calls."""
    reusing: Optional[tuple] = None  # the cache key of the call that reuses, None on a full call
    recording: Optional[tuple] = None  # the cache key a full call keeps its deep features under
    cache: dict = field(default_factory=dict)
    deep_input: Optional[torch.Tensor] = None  # DiTs: the hidden state entering the deep blocks of a full call
    full_calls: int = 0
    reused_calls: int = 0

    def begin(self, key: tuple, refresh: bool) -> None:
        if refresh or key not in self.cache:
            self.reusing, self.recording = None, key
            self.full_calls += 1
        else:
            self.reusing, self.recording = key, None
            self.reused_calls += 1

    def end(self) -> None:
        self.reusing = self.recording = self.deep_input = None

    def reset(self) -> None:
        self.end()
        self.cache.clear()
        self.full_calls = self.reused_calls = 0


def step_index(sigma: torch.Tensor, sample_sigmas: torch.Tensor) -> Optional[int]:
    """The sampling step whose sigma `sigma` is, None for a sigma between steps (a sampler's
    intermediate call, which then runs whole)."""
    schedule = sample_sigmas[:-1].float().cpu()
    current = float(sigma.reshape(-1)[0])
    distances = (schedule - current).abs()
    index = int(distances.argmin())
    return index if float(distances[index]) <= 1e-5 * max(1.0, abs(current)) else None


def _check_settings(settings: RehashSettings) -> None:
    for name in ("interval", "full_first_steps", "full_last_steps"):
        least = 1 if name == "interval" else 0
        if getattr(settings, name) < least:
            raise UnsupportedRehashError(f"{name} is {getattr(settings, name)}; give at least {least}.")


def _deep_unet_blocks(unet: nn.Module, shallow: int) -> list:
    blocks = len(unet.input_blocks)
    if len(unet.output_blocks) != blocks or unet.middle_block is None:
        raise UnsupportedRehashError(f"{type(unet).__name__} has {blocks} input and {len(unet.output_blocks)} output "
                                     f"blocks and {'no' if unet.middle_block is None else 'a'} middle block; Step "
                                     f"Rehash needs mirrored blocks around a middle block.")
    if not 1 <= shallow < blocks:
        raise UnsupportedRehashError(f"shallow_blocks is {shallow}; this UNet has {blocks} input blocks: set it "
                                     f"between 1 and {blocks - 1}.")
    return [*(f"input_blocks.{i}" for i in range(shallow, blocks)), "middle_block",
            *(f"output_blocks.{i}" for i in range(blocks - shallow))]


def _deep_dit_blocks(dit: nn.Module, stack: str, shallow: int) -> list:
    blocks = len(getattr(dit, stack))
    if not 1 <= shallow or 2 * shallow >= blocks:
        raise UnsupportedRehashError(f"shallow_blocks is {shallow}; this DiT has {blocks} blocks, of which the first "
                                     f"and last shallow_blocks run every step: set it between 1 and "
                                     f"{(blocks - 1) // 2}.")
    return [f"{stack}.{i}" for i in range(shallow, blocks - shallow)]


def _check_dit_caller(model: nn.Module) -> None:
    """Refuses a DiT whose root adds to the stream between its blocks (a reused residual would hold
    that and it would be added again) or that the family table does not list or refuses."""
    family, caller = caller_of(model)
    if caller is None:
        raise UnsupportedRehashError(f"{type(model).__name__} is a Wan variant Step Rehash does not know, so it cannot "
                                     f"show that skipping its blocks is sound: remove the node for it.")
    reason = rehash_refusal(family, caller)
    if reason:
        raise UnsupportedRehashError(f"Step Rehash does not run on {caller.title} ({caller.name}): {reason}, which "
                                     f"reusing the deep blocks' residual would get wrong. Remove the node for it.")


def rehash_patches(model: nn.Module, settings: RehashSettings, state: RehashState,
                   current: Callable[[str], Callable], prefix: str = "") -> dict:
    """{attribute path: forward} for every layer of the deep part; `current(path)` is the forward
    the layer has now (stock, another patch's, or an earlier Step Rehash wrapper, whose inner
    forward is taken: patches made after Step Rehash get wrapped by calling this again)."""
    _check_settings(settings)

    def inner(path):
        return getattr(current(path), WRAPPED, current(path))
    family = family_of(model)
    kind = family.step_rehash if family is not None else ""
    if kind == "unet":
        deep = _deep_unet_blocks(model, settings.shallow_blocks)
        patches = {}
        for block in deep:
            layers = [name for name, _ in model.get_submodule(block).named_children()]
            for name in layers:
                path = f"{prefix}{block}.{name}.forward"
                keeps = block == deep[-1] and name == layers[-1]
                patches[path] = _kept_forward(inner(path), state) if keeps else _deep_forward(inner(path), state)
        return patches
    if kind == "dit":
        _check_dit_caller(model)
        deep = _deep_dit_blocks(model, family.repeated_stack, settings.shallow_blocks)
        return {f"{prefix}{block}.forward": _residual_forward(inner(f"{prefix}{block}.forward"), state,
                                                              first=block == deep[0], last=block == deep[-1])
                for block in deep}
    raise UnsupportedRehashError(f"Step Rehash runs on ComfyUI's {rehash_families()}; this model is "
                                 f"{type(model).__name__}: remove the node for it.")


def rehash_families() -> str:
    return " and ".join(short_name(f) for f in FAMILIES if f.step_rehash)


def _stand_in(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], 0, *(1 for _ in x.shape[2:])))


def _deep_forward(forward: Callable, state: RehashState) -> Callable:
    def deep(x, *args, **kwargs):
        if state.reusing is not None:
            return _stand_in(x)
        return forward(x, *args, **kwargs)
    setattr(deep, WRAPPED, forward)
    return deep


def _residual_forward(forward: Callable, state: RehashState, first: bool, last: bool) -> Callable:
    """A deep DiT block: the first adds the kept residual on a reusing call, the others pass through."""
    def deep(x, *args, **kwargs):
        if state.reusing is not None:
            return x + state.cache[state.reusing] if first else x
        if first and state.recording is not None:
            state.deep_input = x.detach().clone()  # sliced blocks may write their output in place
        output = forward(x, *args, **kwargs)
        if last and state.recording is not None:
            state.cache[state.recording] = output.detach() - state.deep_input
            state.deep_input = None
        return output
    setattr(deep, WRAPPED, forward)
    return deep


def _kept_forward(forward: Callable, state: RehashState) -> Callable:
    def kept(x, *args, **kwargs):
        if state.reusing is not None:
            return state.cache[state.reusing]
        output = forward(x, *args, **kwargs)
        if state.recording is not None:
            state.cache[state.recording] = output.detach()
        return output
    setattr(kept, WRAPPED, forward)
    return kept
