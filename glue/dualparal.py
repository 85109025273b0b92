"""The DualParal Multi-GPU Sampler's work: ComfyUI's MODEL, conditioning and latent turned into a
DualParalRequest, the runner chosen (this process, worker processes, a cluster), and the report."""
import logging
import math
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from ..core.dualparal import (BlockPlan, DualParalError, DualParalRequest, Sampling, check_allowed,
                              check_sampler, cluster_address, expert_phases, flow_spec, parse_devices, rank_weight_bytes,
                              read_key, run_in_process, run_in_workers, run_on_cluster, WorkerError)
from .dualparal_guidance import check_guidance, host_guidance, needs_unconditional
from .planner import OOM_RETRY_KEY
from .slicing import SETTINGS_KEY

log = logging.getLogger(__name__)

EXPERT_PLACEMENTS = ("auto", "both resident", "swap per phase")
RESIDENT_SHARE = 0.5  # of a GPU's memory both experts' layers may take in auto (the rest: activations, messages)


def _sigmas(model, sampler_name: str, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler takes for these settings, from the MODEL's own model sampling (so
    ModelSamplingSD3 before DualParal applies)."""
    import comfy.samplers
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise DualParalError(f"scheduler '{scheduler}' is not one of this ComfyUI's: "
                             f"{', '.join(comfy.samplers.KSampler.SCHEDULERS)}.")
    return comfy.samplers.KSampler(model, steps, "cpu", check_sampler(sampler_name), scheduler, denoise).sigmas.float()


def _text(conditioning, side: str) -> torch.Tensor:
    if len(conditioning) != 1:
        raise DualParalError(f"the {side} conditioning holds {len(conditioning)} entries; DualParal takes one text "
                             f"conditioning per side: remove Conditioning (Combine / Set Area) before it.")
    return conditioning[0][0]


def _context(positive, negative, both_sides: bool) -> torch.Tensor:
    """[positive, negative] in one batch (positive alone without `both_sides`), lengths matched by
    repetition as ComfyUI batches cross-attention conditioning."""
    texts = [_text(positive, "positive")] + ([_text(negative, "negative")] if both_sides else [])
    length = math.lcm(*(t.shape[1] for t in texts))
    return torch.cat([t.repeat(1, length // t.shape[1], 1) for t in texts]).float()


# conditioning entries a plain Wan model takes that the ranks are not sent
UNSENT_CONDITIONING = {"context_latents": "Bernini-R's in-context references (context_latents)",
                       "reference_latents": "reference latents (reference_latents)"}


def _image_conditioning(model, positive, negative, samples: torch.Tensor, both_sides: bool) -> tuple:
    """(c_concat, clip_fea) of an image-to-video Wan model, each None where absent, as ComfyUI's own
    model makes them from the conditioning (WanImageToVideo's concat_latent_image / concat_mask /
    clip_vision_output), rows [positive, negative] like the text context."""
    embedding = getattr(model.model.diffusion_model, "patch_embedding", None)
    if embedding is None:  # not a Wan model: the request's check says so
        return None, None
    sides = [positive] + ([negative] if both_sides else [])
    unsent = sorted({key for side in sides for key in UNSENT_CONDITIONING if key in side[0][1]})
    if unsent:
        raise DualParalError(f"the conditioning carries {', '.join(UNSENT_CONDITIONING[k] for k in unsent)}, which "
                             f"DualParal's ranks do not take yet (the result would ignore them): use KSampler for it.")
    try:
        conds = [model.model.extra_conds(noise=torch.zeros_like(samples), latent_image=samples,
                                         device=torch.device("cpu"), **side[0][1]) for side in sides]
    except RuntimeError as error:
        raise DualParalError(f"the image conditioning does not fit the latent of shape {tuple(samples.shape)} "
                             f"({error}): make both with the same WanImageToVideo node.") from None
    if embedding.in_channels == samples.shape[1] and any(
            "concat_latent_image" in side[0][1] for side in sides):
        raise DualParalError("the conditioning carries a start image (WanImageToVideo), but this is a text-to-video "
                             "model, which would ignore it: load a Wan image-to-video model, or remove the image.")
    found = []
    for key in ("c_concat", "clip_fea"):
        values = [cond[key].cond for cond in conds if key in cond]
        if values and len(values) != len(conds):
            raise DualParalError(f"only one side of the conditioning carries {key}: give positive and negative the "
                                 f"same image conditioning (one WanImageToVideo node).")
        found.append(torch.cat(values).detach().float() if values else None)
    return tuple(found)


def _denoise_mask(model, latent: dict, start: torch.Tensor) -> tuple:
    """(mask, each frame's timestep factor or None) of a latent with a noise mask, as ComfyUI's sampler
    prepares them, for models that keep the masked-out part at the input latent (Wan 2.2 TI2V-5B's
    start image: WAN22's scale_latent_inpaint); an inpainting mask on other models is refused."""
    if "noise_mask" not in latent:
        return None, None
    import comfy.sampler_helpers
    mask = comfy.sampler_helpers.prepare_mask(latent["noise_mask"], start.shape, "cpu").detach().float()
    kept = model.model.scale_latent_inpaint(x=start, sigma=torch.ones(1), noise=torch.ones_like(start),
                                            latent_image=start, denoise_mask=mask)
    if not torch.equal(kept, start):
        raise DualParalError("the latent carries a noise mask (inpainting), which DualParal applies only for models "
                             "that keep the masked part at the input latent (Wan 2.2 TI2V-5B's start image): remove "
                             "Set Latent Noise Mask.")
    factors = model.model.process_timestep(torch.ones(1), x=start, denoise_mask=mask)
    return mask, ([float(f) for f in factors.flatten()] if factors.numel() == start.shape[2] else None)


@contextmanager
def _weights_for(models: list, devices, in_process: bool):
    """Each MODEL's diffusion model with every patch applied: loaded by ComfyUI (together) for a run
    here or for CPU workers (which share the weights); for GPU workers and torchrun clusters patched on
    the CPU, after ComfyUI has unloaded its models, so that each GPU holds only its own layers."""
    import comfy.model_management
    if in_process or all(d.type == "cpu" for d in devices) and all(m.load_device.type == "cpu" for m in models):
        comfy.model_management.load_models_gpu(models)
        yield [model.model.diffusion_model for model in models]
        return
    comfy.model_management.unload_all_models()
    with ExitStack() as stack:
        for model in models:
            model.patch_model(device_to=torch.device("cpu"))
            stack.callback(model.unpatch_model, device_to=model.offload_device)
        yield [model.model.diffusion_model for model in models]


# What a MODEL can carry that changes a sampling step beyond its weights and that DualParal's ranks
# do not run (Python callables around the model call, and a rank runs the layers alone): refused
# rather than ignored. CFG patches (GUIDANCE_PATCHES) run in this process: guidance.py.
SAMPLER_PATCHES = ("sampler_calc_cond_batch_function", "model_function_wrapper", "denoise_mask_function")
TRANSFORMER_PATCHES = ("patches", "patches_replace", "optimized_attention_override")
OWN_HOOKS = {OOM_RETRY_KEY}  # the Memory Planner's retry: its slicing settings travel to the ranks


def _check_no_unapplied_patches(model, name: str) -> None:
    options = model.model_options
    found = [key for key in SAMPLER_PATCHES if options.get(key)]
    found += [f"transformer_options {key}" for key in TRANSFORMER_PATCHES
              if options.get("transformer_options", {}).get(key)]
    for kind in ("wrappers", "callbacks"):
        for hook_type, keyed in getattr(model, kind, {}).items():
            found += [f"{kind[:-1]} {hook_type} ({key})" for key, hooks in keyed.items()
                      if hooks and key not in OWN_HOOKS]
    if found:
        raise DualParalError(f"the {name} carries patches that DualParal's ranks do not run ({', '.join(found)}), so "
                             f"its output would differ from what they ask for: remove the nodes that add them "
                             f"(attention, model-wrapping or caching patches such as PerturbedAttentionGuidance, "
                             f"SkipLayerGuidance, EasyCache) before DualParal, or sample with KSampler.")


def _low_noise_expert(model, low_noise_model, from_step: int, steps: int, dtype) -> int:
    """The step from which `low_noise_model` runs (0 without one), after checking that the two
    experts sample alike: the same model sampling, compute dtype and Feature Slicer settings."""
    if low_noise_model is None:
        return 0
    if from_step < 1:
        raise DualParalError(f"low_noise_from_step is {from_step}: the low-noise expert would run every step; set it "
                             f"between 1 and {steps - 1} (ComfyUI's Wan 2.2 A14B workflows switch halfway).")
    specs = []
    for name, expert in (("model", model), ("low_noise_model", low_noise_model)):
        try:
            specs.append(flow_spec(expert.get_model_object("model_sampling")))
        except DualParalError as error:
            raise DualParalError(f"{name}: {error}") from None
    high, low = specs
    if high != low:
        raise DualParalError(f"the experts' model sampling differs (high noise {high}, low noise {low}): give both the "
                             f"same ModelSamplingSD3 shift, as ComfyUI's Wan 2.2 workflows do.")
    low_dtype = low_noise_model.model.manual_cast_dtype or low_noise_model.model.get_dtype()
    if low_dtype != dtype:
        raise DualParalError(f"the experts compute in {dtype} and {low_dtype}: load both with the same weight dtype.")
    settings = [m.model_options.get("transformer_options", {}).get(SETTINGS_KEY) for m in (model, low_noise_model)]
    if settings[0] != settings[1]:
        raise DualParalError("the experts have different Feature Slicer settings (or only one is sliced): give both "
                             "the same Feature Slicer node settings, or slice neither.")
    return from_step


def _host_setup(cpu: bool) -> list:
    """ComfyUI's command-line settings for the workers (they choose its attention kernel)."""
    from comfy.cli_args import args
    return [("comfy.cli_args", "args", {**vars(args), "cpu": args.cpu or cpu})]


def _cluster_key(address: tuple) -> bytes:
    """The key for a cluster this ComfyUI's owner allowed (a workflow alone cannot pick a host):
    both from the environment or from files in ComfyUI's user folder."""
    import folder_paths
    folder = Path(folder_paths.get_user_directory()) / "streamline"
    check_allowed(address, folder / "dualparal_clusters.txt")
    return read_key(folder / "dualparal.key")


def _check_numbers(**values) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise DualParalError(f"{name} is {value}; give a finite number.")


def report(plan: BlockPlan, stats, seconds: float) -> str:
    lines = [f"DualParal: {len(plan.blocks)} blocks of {plan.frames_per_block} latent frames (cache "
             f"{plan.cache_frames}), {plan.steps} steps, {len(plan.jobs())} block forwards in {plan.iterations} "
             f"iterations, {seconds:.1f} s"]
    if plan.expert_switch:
        steps = (f"experts: high noise for steps 0-{plan.expert_switch - 1}, low noise for steps "
                 f"{plan.expert_switch}-{plan.steps - 1}; ")
        lines.append(steps + ("swapped per phase: each rank held one expert's layers at a time (every block sampled "
                              "to the switch by the high-noise expert, then the ranks loaded the low-noise one)"
                              if any(s.phase for s in stats) else
                              "both resident on every rank (blocks on either side of the switch are in flight at "
                              "once), each rank holding its layers of both"))
    for s in stats:
        phase = f"[{s.phase}] " if s.phase else ""
        lines.append(f"{phase}rank {s.rank} {s.device}: layers {s.layers[0]}-{s.layers[1] - 1}, compute {s.compute_s:.2f} s, "
                     f"waiting {s.wait_s:.2f} s, sent {s.sent_bytes / 2**20:.1f} MiB, "
                     f"peak {s.peak_bytes / 2**20:.1f} MiB")
    return "\n".join(lines)


def sample(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, devices, frames_per_block,
           cache_frames, denoise, low_noise_model=None, low_noise_from_step=0, experts_on_ranks="auto") -> tuple:
    """(LATENT, [RankStats], seconds). Raises DualParalError for input it cannot run, before any
    process starts."""
    import comfy.model_management
    import comfy.utils

    samples = latent["samples"]
    if samples.ndim != 5:
        raise DualParalError(f"the latent has shape {tuple(samples.shape)}, not a video latent (batch, channels, "
                             f"frames, height, width): make it with EmptyHunyuanLatentVideo or a Wan video node.")
    _check_numbers(cfg=cfg, denoise=denoise)
    if denoise <= 0.0:
        return latent, [], 0.0  # as ComfyUI's samplers: nothing to denoise
    _check_no_unapplied_patches(model, "MODEL")
    if low_noise_model is not None:
        _check_no_unapplied_patches(low_noise_model, "low_noise_model")
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    switch = _low_noise_expert(model, low_noise_model, low_noise_from_step, steps, dtype)
    plan = BlockPlan(samples.shape[2], frames_per_block, cache_frames, steps, switch)
    cluster = cluster_address(devices)
    cluster_key = _cluster_key(cluster) if cluster else None
    device_list = [] if cluster else parse_devices(devices, torch.cuda.device_count())
    model_sampling = model.get_model_object("model_sampling")
    sigmas = _sigmas(model, sampler_name, scheduler, steps, denoise)
    experts = [model] + ([low_noise_model] if switch else [])
    both_sides = needs_unconditional(experts, cfg)
    sampling = Sampling(sigmas=sigmas, timesteps=[float(model_sampling.timestep(s)) for s in sigmas[:-1]], cfg=cfg,
                        context=_context(positive, negative, both_sides), sampler=sampler_name, seed=seed)
    sampling.image, sampling.clip = _image_conditioning(model, positive, negative, samples, both_sides)
    guide = host_guidance(experts, positive, negative, cfg)
    if guide is not None:
        block_shape = (1, samples.shape[1], plan.frames_per_block, *samples.shape[3:])
        check_guidance(guide, block_shape, sigmas, sampling.batch, len(plan.blocks), len(experts))
        sampling.host_guidance = True
    slicing = model.model_options.get("transformer_options", {}).get(SETTINGS_KEY)
    start = model.model.process_latent_in(samples) if torch.count_nonzero(samples) > 0 else samples  # as ComfyUI
    start = start.detach().float()
    sampling.mask, sampling.frame_scale = _denoise_mask(model, latent, start)
    request = DualParalRequest(model.get_model_object("diffusion_model"), dtype, device_list, plan, sampling,
                               start, seed, slicing, config=model.model.model_config.unet_config)
    if switch:
        request.low_noise_model = low_noise_model.get_model_object("diffusion_model")
        request.low_noise_config = low_noise_model.model.model_config.unet_config
    request.validate(len(device_list) or 1)
    sampling.flow = flow_spec(model_sampling)  # after the check that names the model when it is not Wan
    in_process = len(device_list) == 1 and device_list[0] == comfy.model_management.get_torch_device()
    if _swap_experts(experts_on_ranks, request, device_list):
        phases = list(zip(expert_phases(request), ([e] for e in experts), ("high noise", "low noise")))
    else:
        phases = [(request, experts, "")]
    for phase, _, _ in phases:
        phase.validate(len(device_list) or 1)

    bar = comfy.utils.ProgressBar(sum(len(phase.plan.jobs()) for phase, _, _ in phases))
    started, output, stats, done_before = time.perf_counter(), start, [], 0
    for index, (phase, phase_models, name) in enumerate(phases):
        phase.latent = output
        if guide is not None and name:  # one expert per run: its index among all experts
            phase_guide = lambda x, sigma, denoised, expert, index=index: guide(x, sigma, denoised, index)
        else:
            phase_guide = guide

        def progress(done, total, offset=done_before):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(offset + done, bar.total)
        output, phase_stats = _run(phase, phase_models, device_list, in_process, cluster, cluster_key, phase_guide,
                                   progress)
        stats += [replace(s, phase=name) for s in phase_stats]
        done_before += len(phase.plan.jobs())
    seconds = time.perf_counter() - started
    result = {**{k: v for k, v in latent.items() if k != "samples"}, "samples": model.model.process_latent_out(output)}
    return result, stats, seconds


def _swap_experts(placement: str, request: DualParalRequest, device_list: list) -> bool:
    """Whether Wan 2.2 A14B's experts run one after the other (expert_phases) rather than both
    resident: as chosen, or in auto where both experts' layers of a rank would take more than
    RESIDENT_SHARE of its GPU's memory. CPU ranks share ComfyUI's copy of the weights, and a
    cluster's memory is not known here: both resident in auto."""
    if placement not in EXPERT_PLACEMENTS:
        raise DualParalError(f"experts_on_ranks '{placement}' is not one of {', '.join(EXPERT_PLACEMENTS)}.")
    if not request.plan.expert_switch:
        return False
    if placement != "auto":
        return placement == "swap per phase"
    if not device_list or any(device.type != "cuda" for device in device_list):
        return False
    for rank, (device, need) in enumerate(zip(device_list, rank_weight_bytes(request, len(device_list)))):
        total = torch.cuda.get_device_properties(device).total_memory
        if need > RESIDENT_SHARE * total:
            log.info("DualParal: rank %d (%s) would hold %.1f GiB of both experts' layers, over %.0f%% of its "
                     "%.1f GiB: the experts are swapped per phase", rank, device, need / 2**30, RESIDENT_SHARE * 100,
                     total / 2**30)
            return True
    return False


def _run(request: DualParalRequest, models: list, device_list: list, in_process: bool, cluster, cluster_key,
         guide, progress) -> tuple:
    """(latent, [RankStats]) of one run of `request` with `models` (its experts) loaded."""
    import comfy.model_management
    with _weights_for(models, device_list, in_process) as diffusion_models:
        request.model = diffusion_models[0]
        if len(diffusion_models) > 1:
            request.low_noise_model = diffusion_models[1]
        if in_process:
            return run_in_process(request, progress, guide)
        if cluster:
            from comfy.cli_args import args
            return run_on_cluster(request, cluster, cluster_key, vars(args), progress,
                                  comfy.model_management.throw_exception_if_processing_interrupted, guide)
        rendezvous = Path(tempfile.mkdtemp(prefix="streamline_dualparal_"))
        try:
            return run_in_workers(request, _host_setup(device_list[0].type == "cpu"), progress,
                                  comfy.model_management.throw_exception_if_processing_interrupted,
                                  str(rendezvous / "group"), guide)
        finally:
            shutil.rmtree(rendezvous, ignore_errors=True)


def sample_with_report(model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, devices,
                       frames_per_block, cache_frames, denoise, low_noise_model, low_noise_from_step,
                       experts_on_ranks) -> tuple:
    """(latent, report text); errors are ValueErrors naming the node and the fix."""
    try:
        latent, stats, seconds = sample(model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                        scheduler, devices, frames_per_block, cache_frames, denoise,
                                        low_noise_model, low_noise_from_step, experts_on_ranks)
    except (DualParalError, WorkerError) as error:  # shown with the node's name, not the internal type
        raise ValueError(f"DualParal Multi-GPU Sampler: {error}") from None
    if not stats:
        return latent, "DualParal: denoise 0, the latent is returned unchanged"
    plan = BlockPlan(latent_image["samples"].shape[2], frames_per_block, cache_frames, steps,
                     low_noise_from_step if low_noise_model is not None else 0)
    text = report(plan, stats, seconds)
    log.info(text)
    return latent, text
