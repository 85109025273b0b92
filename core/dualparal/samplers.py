"""The samplers of DualParal's blocks: the host's own sampler functions, one run per block.

Each block's sampler is the host's function (ComfyUI's k-diffusion samplers) running in a thread of
its own that pauses at every model call: the pipeline reads the block's model input, sends it
through the ranks, and hands the denoised prediction back, and the function carries on to its next
model call. So each block keeps its own sampler state (multistep history, noise generator), blocks
interleave as the schedule says, and with one block the run is the host's sampling itself. Only one
thread runs at a time: every hand-over waits for the other side.

The host's functions and its flow model sampling are named in tables here (data, imported on the
first rank only); a request names a sampler by its key, never by module path, so a message from the
network cannot pick what runs.

Ancestral noise: block 0 draws it as the host's sampler does for a whole latent (its seed), so one
block equals stock; each later block reuses, draw by draw, the noise the block before it drew at the
same step, reordered like the starting noise (noise.reorder): frames either side of a border get
alike noise.
"""
import importlib
import inspect
import math
import queue
import threading
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .noise import reorder
from .schedule import DualParalError

# sampler key -> (host module, function); all call the model once per step, at the step's sigma
SAMPLERS = {
    "euler": ("comfy.k_diffusion.sampling", "sample_euler"),
    "euler_ancestral": ("comfy.k_diffusion.sampling", "sample_euler_ancestral"),
    "dpmpp_2m": ("comfy.k_diffusion.sampling", "sample_dpmpp_2m"),
    "lcm": ("comfy.k_diffusion.sampling", "sample_lcm"),
    "uni_pc": ("comfy.extra_samplers.uni_pc", "sample_unipc"),
}
# Wan's model sampling: flow matching (ModelSamplingSD3 makes the same classes)
FLOW_SAMPLING = ("comfy.model_sampling", ("ModelSamplingDiscreteFlow", "CONST"))
DEFAULT_NOISE = ("comfy.k_diffusion.sampling", "default_noise_sampler")  # what the samplers draw with by default


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise DualParalError(f"sampler '{name}' is not one DualParal runs; choose one of {', '.join(SAMPLERS)}.")
    return name


def flow_spec(model_sampling) -> dict:
    """What the first rank needs to rebuild the MODEL's flow model sampling (plain numbers)."""
    classes = {c.__name__ for c in type(model_sampling).__mro__}
    if not set(FLOW_SAMPLING[1]) <= classes:
        raise DualParalError(f"the MODEL's model sampling is {type(model_sampling).__name__}, not Wan's flow matching: "
                             f"give DualParal a Wan model (ModelSamplingSD3 before it is fine).")
    spec = {"shift": float(model_sampling.shift), "multiplier": float(model_sampling.multiplier),
            "noise_scale": float(getattr(model_sampling, "noise_scale", 1.0))}
    if not all(math.isfinite(v) for v in spec.values()):
        raise DualParalError(f"the MODEL's model sampling has {spec}: give finite numbers.")
    return spec


def host_flow_sampling(spec: dict):
    """The host's flow model sampling with the MODEL's settings (on the first rank)."""
    module = importlib.import_module(FLOW_SAMPLING[0])
    flow = type("FlowSampling", tuple(getattr(module, name) for name in FLOW_SAMPLING[1]), {})
    sampling = flow()
    sampling.set_parameters(shift=float(spec["shift"]), multiplier=float(spec["multiplier"]))
    if hasattr(sampling, "set_noise_scale"):
        sampling.set_noise_scale(float(spec["noise_scale"]))
    return sampling


def host_sampler(name: str) -> Callable:
    module, function = SAMPLERS[check_sampler(name)]
    return getattr(importlib.import_module(module), function)


class _Cancelled(BaseException):
    """Ends a block's sampler thread that is waiting for a prediction that will not come."""


class BlockSampler:
    """The host's sampler function on one block, paused at each model call. `x` and `sigma`: the
    model input and sigma of the call it waits on; once `finished`, `x` is its result.

    `phases`: the sigmas of each run of the function; the next run starts from the previous one's
    result as a second KSamplerAdvanced does (no noise added, new sampler state). `noise_for(x)`: the
    noise sampler of a run starting at `x`."""

    def __init__(self, function: Callable, model_sampling, x: torch.Tensor, phases: list, seed: int,
                 noise_for: Optional[Callable] = None):
        self._requests, self._replies = queue.Queue(1), queue.Queue(1)
        self.finished, self.calls = False, 0
        inference = torch.is_inference_mode_enabled()
        patcher = SimpleNamespace(get_model_object=lambda name: model_sampling)
        model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling), model_patcher=patcher)
        caller = _ModelCall(self, model)
        takes_noise = noise_for is not None and "noise_sampler" in inspect.signature(function).parameters

        def run():
            try:
                with torch.inference_mode(inference):
                    result = x
                    for index, sigmas in enumerate(phases):
                        if index:
                            result = model_sampling.noise_scaling(sigmas[:1], torch.zeros_like(result),
                                                                  model_sampling.inverse_noise_scaling(sigmas[:1], result))
                        options = {"noise_sampler": noise_for(result)} if takes_noise else {}
                        result = function(caller, result, sigmas, extra_args={"seed": seed}, callback=None,
                                          disable=True, **options)
                self._requests.put(("done", result, None))
            except _Cancelled:
                pass
            except BaseException as error:  # handed to the pipeline, which raises it
                self._requests.put(("error", error, None))
        self._thread = threading.Thread(target=run, name="dualparal-block-sampler", daemon=True)
        self._thread.start()
        self._take()

    def _take(self) -> None:
        kind, value, sigma = self._requests.get()
        if kind == "error":
            raise value
        self.x, self.sigma, self.finished = value, sigma, kind == "done"

    def give(self, denoised: torch.Tensor) -> None:
        """The denoised prediction for the waiting call; returns at the next call or the end."""
        self._replies.put(denoised)
        self._take()

    def close(self) -> None:
        if not self.finished and self._thread.is_alive():
            self._replies.put(None)
            self._thread.join()


class _ModelCall:
    """What the host's sampler function calls as its model (with the attributes it reads)."""

    def __init__(self, block: BlockSampler, model):
        self.block, self.inner_model = block, model

    def __call__(self, x, sigma, **kwargs):
        self.block.calls += 1
        self.block._requests.put(("call", x, sigma.reshape(-1)[0]))
        denoised = self.block._replies.get()
        if denoised is None:
            raise _Cancelled()
        return denoised


class CoordinatedNoise:
    """Ancestral noise per block (see the module docstring). `sampler(block, x)` is the noise sampler of
    a block whose first model input is `x`."""

    def __init__(self, seed: int, cache_frames: int, blocks: int):
        self.seed, self.cache_frames, self.blocks = seed, cache_frames, blocks
        self._drawn = {}  # block -> its draws the next block has not reused yet, oldest first

    def sampler(self, block: int, x: torch.Tensor) -> Callable:
        if block == 0:
            module, function = DEFAULT_NOISE
            source = getattr(importlib.import_module(module), function)(x, seed=self.seed)
        else:
            generator = torch.Generator().manual_seed(self.seed + 7919 * block)
            earlier = self._drawn[block - 1]

            def source(sigma, sigma_next):
                return reorder(earlier.pop(0), x.shape[2], self.cache_frames, generator)
        draws = self._drawn.setdefault(block, []) if block + 1 < self.blocks else None

        def draw(sigma, sigma_next):
            noise = source(sigma, sigma_next)
            if draws is not None:
                draws.append(noise)
            return noise
        return draw

    def release(self, block: int) -> None:
        """Forgets a finished block's draws once the next block has finished too."""
        self._drawn.pop(block - 1, None)
