"""The Memory Planner's work: a predicted peak per slicing level, the least slicing that fits the
budget applied, and a retry with finer slicing on a real out-of-memory error. Finer slicing costs
time (smaller chunks run less efficiently), so a level is only taken, or retried with, where its
predicted peak is lower than every coarser level's."""
import logging

import comfy.model_management as mm
import torch
from comfy.patcher_extension import WrappersMP

from ..core.memory.readings import GIB
from ..core.memory.predictor import Workload, WorkloadError, model_forward, predict_peak, slicing_ladder
from ..core.slicing import UnsupportedModelError, slicing_applied
from .slicing import sliced_model

log = logging.getLogger(__name__)
OOM_RETRY_KEY = "streamline_oom_retry"


def describe(settings) -> str:
    if settings is None:
        return "stock (no slicing)"
    name = "Feature Slicer + Operator Grouper" if settings.group_ops else "Feature Slicer"
    counts = ", ".join(f"{field}={value}" for field, value in (("frame_chunks", settings.frame_chunks),
                                                                 ("strip_chunks", settings.strip_chunks)) if value)
    return f"{name} ({counts or 'auto chunks'})"


def oom_retry(finer):
    """An APPLY_MODEL wrapper: after an out-of-memory error, this and every later step of the
    planned model (also in later prompts) run with the diffusion model sliced with `finer` (the
    input model's own forwards are back in place after each step)."""
    state = {"finer": False}

    def wrapper(executor, *args, **kwargs):
        if not state["finer"]:
            try:
                return executor(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                if finer is None:
                    raise
            state["finer"] = True
            log.warning("Memory Planner: out of memory; retrying the step with %s", describe(finer))
            mm.soft_empty_cache(True)
        with slicing_applied(executor.class_obj.diffusion_model, finer):
            return executor(*args, **kwargs)
    return wrapper


def planned_model(model, latent, budget_gib: float, cfg: bool) -> tuple:
    """(clone with the chosen slicing and the retry, the plan as text); a ValueError naming the fix
    where nothing fits."""
    diffusion_model = model.get_model_object("diffusion_model")
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    work = Workload(tuple(latent["samples"].shape), 2 if cfg else 1, dtype)
    try:
        forward = model_forward(diffusion_model, work)
    except (UnsupportedModelError, WorkloadError) as error:
        raise ValueError(f"Memory Planner: {error}") from None
    device = mm.get_torch_device()
    budget = budget_gib * GIB or mm.get_free_memory(device) + model.loaded_size()
    weights = model.model_size()
    ladder = slicing_ladder(diffusion_model, work)
    target = "cuda" if device.type == "cuda" else "cpu"
    peaks = {}

    def peak_of(index):
        if index not in peaks:
            peaks[index] = predict_peak(diffusion_model, forward, ladder[index], target)
        return peaks[index]

    lines = [f"budget {budget / GIB:.2f} GiB, weights {weights / GIB:.2f} GiB, latent {list(work.latent_shape)}"]
    lowest = None  # the coarsest level with the lowest peak so far
    for index, settings in enumerate(ladder):
        peak = peak_of(index)
        if lowest is not None and peak >= peak_of(lowest):  # finer slicing costs time: only for less memory
            lines.append(f"{describe(settings)}: activations {peak / GIB:.3f} GiB, no less than coarser "
                         "slicing: skipped")
            continue
        lowest = index
        fits = weights + peak <= budget
        lines.append(f"{describe(settings)}: activations {peak / GIB:.3f} GiB" + (" <- fits" if fits else ""))
        if fits:
            finer = next((ladder[i] for i in range(index + 1, len(ladder)) if peak_of(i) < peak), None)
            clone = model.clone() if settings is None else sliced_model(model, "Memory Planner", **vars(settings))
            clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, OOM_RETRY_KEY, oom_retry(finer))
            plan = "\n".join(lines)
            log.info("Memory Planner:\n%s", plan)
            return clone, plan
    settings, peak = ladder[lowest], peak_of(lowest)
    raise ValueError(f"Memory Planner: no slicing fits {budget / GIB:.2f} GiB. The smallest peak reachable is "
                     f"{(weights + peak) / GIB:.2f} GiB (weights {weights / GIB:.2f} + activations "
                     f"{peak / GIB:.2f} with {describe(settings)}): raise budget_gib, or use fewer frames, a "
                     f"smaller resolution, or a smaller / quantized model.")
