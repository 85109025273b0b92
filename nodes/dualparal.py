"""DualParal Multi-GPU Sampler: block-wise, layer-pipelined sampling of long Wan videos over ranks."""
import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io

from ..core.dualparal import (SAMPLERS, BlockPlan, DualParalError, DualParalRequest, Sampling, check_allowed,
                              check_sampler, cluster_address, flow_spec, parse_devices, read_key, run_in_process,
                              run_in_workers, run_on_cluster)
from .slicing import SETTINGS_KEY

log = logging.getLogger(__name__)

DEVICES_TOOLTIP = ("auto: every visible GPU (one CPU rank without GPUs). A list such as cuda:0,cuda:1 for those "
                   "GPUs (NCCL), or cpu:N for N CPU processes (gloo). One device matching ComfyUI's runs here, "
                   "without worker processes. torchrun://HOST:PORT: the ranks of a torchrun cluster (one or several "
                   "machines) started with dualparal_cluster.py.")


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


def _context(positive, negative, cfg: float) -> torch.Tensor:
    """[positive, negative] in one batch (positive alone at cfg 1), lengths matched by repetition
    as ComfyUI batches cross-attention conditioning."""
    texts = [_text(positive, "positive")] + ([] if cfg == 1.0 else [_text(negative, "negative")])
    length = math.lcm(*(t.shape[1] for t in texts))
    return torch.cat([t.repeat(1, length // t.shape[1], 1) for t in texts]).float()


def _image_conditioning(model, positive, negative, samples: torch.Tensor, cfg: float) -> tuple:
    """(c_concat, clip_fea) of an image-to-video Wan model, each None where absent, as ComfyUI's own
    model makes them from the conditioning (WanImageToVideo's concat_latent_image / concat_mask /
    clip_vision_output), rows [positive, negative] like the text context."""
    embedding = getattr(model.model.diffusion_model, "patch_embedding", None)
    if embedding is None:  # not a Wan model: the request's check says so
        return None, None
    sides = [positive] + ([] if cfg == 1.0 else [negative])
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


@contextmanager
def _weights_for(model, devices, in_process: bool):
    """The diffusion model with every patch applied: loaded by ComfyUI for a run here or for CPU
    workers (which share the weights); for GPU workers and torchrun clusters patched on the CPU, after
    ComfyUI has unloaded its models, so that each GPU holds only its own layers."""
    import comfy.model_management
    if in_process or all(d.type == "cpu" for d in devices) and model.load_device.type == "cpu":
        comfy.model_management.load_models_gpu([model])
        yield model.model.diffusion_model
        return
    comfy.model_management.unload_all_models()
    model.patch_model(device_to=torch.device("cpu"))
    try:
        yield model.model.diffusion_model
    finally:
        model.unpatch_model(device_to=model.offload_device)


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
    for s in stats:
        lines.append(f"rank {s.rank} {s.device}: layers {s.layers[0]}-{s.layers[1] - 1}, compute {s.compute_s:.2f} s, "
                     f"waiting {s.wait_s:.2f} s, sent {s.sent_bytes / 2**20:.1f} MiB, "
                     f"peak {s.peak_bytes / 2**20:.1f} MiB")
    return "\n".join(lines)


def sample(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, devices, frames_per_block,
           cache_frames, denoise) -> tuple:
    """(LATENT, [RankStats], seconds). Raises DualParalError for input it cannot run, before any
    process starts."""
    import comfy.model_management
    import comfy.utils

    samples = latent["samples"]
    if samples.ndim != 5:
        raise DualParalError(f"the latent has shape {tuple(samples.shape)}, not a video latent (batch, channels, "
                             f"frames, height, width): make it with EmptyHunyuanLatentVideo or a Wan video node.")
    _check_numbers(cfg=cfg, denoise=denoise)
    if "noise_mask" in latent:
        raise DualParalError("the latent carries a noise mask (inpainting), which DualParal does not apply: "
                             "remove Set Latent Noise Mask.")
    if denoise <= 0.0:
        return latent, [], 0.0  # as ComfyUI's samplers: nothing to denoise
    plan = BlockPlan(samples.shape[2], frames_per_block, cache_frames, steps)
    cluster = cluster_address(devices)
    cluster_key = _cluster_key(cluster) if cluster else None
    device_list = [] if cluster else parse_devices(devices, torch.cuda.device_count())
    model_sampling = model.get_model_object("model_sampling")
    sigmas = _sigmas(model, sampler_name, scheduler, steps, denoise)
    sampling = Sampling(sigmas=sigmas, timesteps=[float(model_sampling.timestep(s)) for s in sigmas[:-1]], cfg=cfg,
                        context=_context(positive, negative, cfg), sampler=sampler_name, seed=seed)
    sampling.image, sampling.clip = _image_conditioning(model, positive, negative, samples, cfg)
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    slicing = model.model_options.get("transformer_options", {}).get(SETTINGS_KEY)
    start = model.model.process_latent_in(samples) if torch.count_nonzero(samples) > 0 else samples  # as ComfyUI
    request = DualParalRequest(model.get_model_object("diffusion_model"), dtype, device_list, plan, sampling,
                               start.float(), seed, slicing, config=model.model.model_config.unet_config)
    request.validate(len(device_list) or 1)
    sampling.flow = flow_spec(model_sampling)  # after the check that names the model when it is not Wan
    in_process = len(device_list) == 1 and device_list[0] == comfy.model_management.get_torch_device()

    bar = comfy.utils.ProgressBar(len(plan.jobs()))

    def progress(done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    started = time.perf_counter()
    with _weights_for(model, device_list, in_process) as diffusion_model:
        request.model = diffusion_model
        if in_process:
            output, stats = run_in_process(request, progress)
        elif cluster:
            from comfy.cli_args import args
            output, stats = run_on_cluster(request, cluster, cluster_key, vars(args), bar.update_absolute,
                                           comfy.model_management.throw_exception_if_processing_interrupted)
        else:
            rendezvous = Path(tempfile.mkdtemp(prefix="streamline_dualparal_"))
            try:
                output, stats = run_in_workers(request, _host_setup(device_list[0].type == "cpu"),
                                               bar.update_absolute,
                                               comfy.model_management.throw_exception_if_processing_interrupted,
                                               str(rendezvous / "group"))
            finally:
                shutil.rmtree(rendezvous, ignore_errors=True)
    seconds = time.perf_counter() - started
    result = {**{k: v for k, v in latent.items() if k != "samples"}, "samples": model.model.process_latent_out(output)}
    return result, stats, seconds


def _schedulers() -> list:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


class DualParalSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineDualParalSampler",
            display_name="DualParal Multi-GPU Sampler",
            category="Streamline/multi-gpu",
            description="Samples a Wan text-to-video latent of any length block by block: blocks at decreasing "
                        "noise levels move through the model's layers split over several GPUs (or CPU processes), "
                        "with each layer's keys/values of the neighbouring block cached. Memory per device does not "
                        "grow with the video's length. Each block is sampled by ComfyUI's own sampler with the "
                        "MODEL's model sampling (ModelSamplingSD3 before it applies).",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 / 2.2 text-to-video model (Feature Slicer settings apply "
                                                "inside every rank)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Its length is the video's length."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=30, min=1, max=10000),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler",
                               tooltip="ComfyUI's sampler, run for each block with its own state (multistep history, "
                                       "noise)."),
                io.Combo.Input("scheduler", options=_schedulers(), default="simple"),
                io.String.Input("devices", default="auto", tooltip=DEVICES_TOOLTIP),
                io.Int.Input("frames_per_block", default=10, min=1, max=4096,
                             tooltip="Latent frames per block (4 video frames each)."),
                io.Int.Input("cache_frames", default=5, min=0, max=4095,
                             tooltip="Frames of each neighbouring block every block sees: the previous block's last "
                                     "frames as tokens and the next block's first frames through the feature cache. "
                                     "Below frames per block."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[io.Latent.Output(),
                     io.String.Output("report", tooltip="Per rank: layers, compute and waiting time, data sent, "
                                                        "peak memory.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, devices,
                frames_per_block, cache_frames, denoise) -> io.NodeOutput:
        try:
            latent, stats, seconds = sample(model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                            scheduler, devices, frames_per_block, cache_frames, denoise)
        except DualParalError as error:
            raise ValueError(f"DualParal Multi-GPU Sampler: {error}") from None
        if not stats:
            return io.NodeOutput(latent, "DualParal: denoise 0, the latent is returned unchanged")
        text = report(BlockPlan(latent_image["samples"].shape[2], frames_per_block, cache_frames, steps), stats, seconds)
        log.info(text)
        return io.NodeOutput(latent, text)
