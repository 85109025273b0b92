"""What Step Rehash saves and what it costs.

FLOPs at full size by counting (`flops`): SVD-XT's UNet (1.52 B parameters, fp16) at 14 frames of
576x1024 (latent 72x128) and Wan 2.1 1.3B at 81 frames of 832x480, CFG batch 2, under fake tensors
(torch's FlopCounterMode): one refresh step (the whole model; keeping the deep features adds no
FLOPs) and one reusing step for each shallow block count, with the node's own patched forwards. A sampling's FLOPs for an interval follow from which
steps refresh (RehashSettings). Writes bench/results/step_rehash.json and .png.

Quality on the two sprite models trained here (`quality`): the Wan 2.1 T2V model
(scripts/train_video_models.py, through ComfyUI's UNETLoader / VAELoader; each of the 12 prompts) and
the SVD I2V model (scripts/train_svd_sprites.py; the first frames of 12 held-out clips), each sampled
with the same seed by stock KSampler, by Step Rehash at several intervals and shallow block counts, and
by ComfyUI's EasyCache at several thresholds; per setting the sampling's FLOPs (counted) and CPU time
(measured, as a ratio to stock in the same run), the decoded video's PSNR against stock's, and the
motion measures (devkit/video_metrics). Writes bench/results/step_rehash_quality.json and .png.

    .venv/bin/python bench/step_rehash.py [flops] [quality]      (flops by default)
"""
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import cpu_machine, pyplot, write_json  # noqa: E402
from self_check_cost import count, svd_unet_call, wan_call  # noqa: E402

FRAMES, HEIGHT, WIDTH = 14, 72, 128
STEPS = 25
INTERVALS = (1, 2, 3, 4, 5)
WORKLOADS = {  # name -> (full-size model on the meta device, (forward, inputs), dtype, shallow block counts)
    "SVD-XT UNet, 14 frames 576x1024, CFG batch 2": (
        lambda: model_fixtures.build_svd("full", torch.float16, "meta").diffusion_model,
        svd_unet_call(FRAMES, HEIGHT, WIDTH), torch.float16, (1, 3, 6)),
    "Wan 2.1 1.3B DiT, 81 frames 832x480, CFG batch 2": (
        lambda: model_fixtures.build_wan("1.3B", torch.bfloat16, "meta").diffusion_model,
        wan_call(21, 60, 104, 2), torch.bfloat16, (2, 5, 10)),
}


def step_flops(build, call, dtype, shallow_blocks: tuple) -> dict:
    """FLOPs of a refresh step and of a reusing step per shallow block count."""
    from comfyui_streamline.core.patching import install, restore
    from comfyui_streamline.core.step_rehash import RehashSettings, RehashState, rehash_patches

    forward, make_inputs = call
    meta = build()
    reusing = {}
    with FakeTensorMode():
        model = model_fixtures.materialize_fake(meta)
        inputs = make_inputs(True, dtype)
        with torch.inference_mode():
            full = count(lambda: forward(model, inputs))
            for shallow in shallow_blocks:
                state = RehashState()
                patches = rehash_patches(model, RehashSettings(shallow_blocks=shallow), state,
                                         lambda path: model.get_submodule(path.rpartition(".")[0]).forward)
                installed = install(model, patches)
                try:
                    state.begin(("call",), refresh=True)
                    forward(model, inputs)  # keeps the deep features
                    state.begin(("call",), refresh=False)
                    reusing[shallow] = count(lambda: forward(model, inputs))
                finally:
                    state.end()
                    restore(installed)
    return {"refresh_step": full, "reusing_step": reusing}


def sampling_fractions(workload: str, flops: dict, steps: int = STEPS) -> list:
    """Per interval and shallow block count: the sampling's FLOPs over stock's (default first/last steps)."""
    from comfyui_streamline.core.step_rehash import RehashSettings

    rows = []
    for shallow, reusing in flops["reusing_step"].items():
        for interval in INTERVALS:
            settings = RehashSettings(interval=interval, shallow_blocks=shallow)
            refreshes = sum(settings.refreshes(step, steps) for step in range(steps))
            total = refreshes * flops["refresh_step"] + (steps - refreshes) * reusing
            rows.append(dict(workload=workload, shallow_blocks=shallow, interval=interval, refresh_steps=refreshes,
                             flops_fraction=total / (steps * flops["refresh_step"])))
    return rows


def plot(rows: list, machine: str) -> None:
    plt = pyplot()
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5))
    for axis, workload in zip(axes, workloads):
        for shallow in sorted({r["shallow_blocks"] for r in rows if r["workload"] == workload}):
            series = [r for r in rows if r["workload"] == workload and r["shallow_blocks"] == shallow]
            axis.plot([r["interval"] for r in series], [r["flops_fraction"] for r in series], marker="o",
                      label=f"shallow_blocks {shallow}")
        axis.set_xlabel("interval (a refresh step, then interval - 1 reusing steps)")
        axis.set_ylabel("sampling FLOPs / stock")
        axis.set_ylim(0, 1.05)
        axis.set_title(f"{workload}, {STEPS} steps", fontsize=9)
        axis.legend(fontsize=8)
    fig.text(0.01, 0.01, f"Step Rehash (first 2 and last step full); FLOPs counted under fake tensors ({machine})",
             fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "results" / "step_rehash.png", dpi=110)


def flops_at_full_size() -> None:
    step, rows = {}, []
    for workload, (build, call, dtype, shallow) in WORKLOADS.items():
        step[workload] = step_flops(build, call, dtype, shallow)
        rows += sampling_fractions(workload, step[workload])
    machine = cpu_machine()
    write_json("step_rehash", {"machine": machine, "steps": STEPS, "step_flops": step, "sampling": rows})
    plot(rows, machine)
    for row in rows:
        print(row)


QUALITY_SEED = 7
# (interval, shallow_blocks) per trained model: the Wan DiT has 4 blocks (1: blocks 1-2 reused); the SVD
# UNet 4 input blocks (1: all but the input convolution reused, 2: the 8x8 level, 3: its second half)
REHASH_SETTINGS = {"wan": [(2, 1), (3, 1), (4, 1), (6, 1)],
                   "svd": [(2, 2), (3, 2), (4, 2), (6, 2), (3, 1), (3, 3)]}
EASYCACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean().clamp_min(1e-10)))


def _timed(sample) -> tuple:
    """(latent, seconds, FLOPs) of one sampling: timed on its own, then counted in a second run (the
    counter's per-op overhead would otherwise weigh on the setting with more, smaller ops)."""
    import time
    from reporting import flop_counter
    started = time.perf_counter()
    samples = sample()
    seconds = time.perf_counter() - started
    counter = flop_counter()
    with counter:
        sample()
    return samples, seconds, counter.get_total_flops()


def wan_jobs() -> tuple:
    """(model, decode, [(label, prompt text, sample(model))]) for the Wan 2.1 sprite model: every prompt."""
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from devkit.fixture_nodes import TextEmbedding
    from devkit.sprite_videos import PROMPTS
    from devkit.sprite_workflows import (CFG, FRAMES, HEIGHT, SAMPLER, SCHEDULER, SHIFT, SPRITE_MODELS_DIR, STEPS,
                                         TEXT_TOKENS, TEXT_WIDTH, WIDTH)
    from train_video_models import load_with_comfy_nodes

    model, vae = load_with_comfy_nodes(SPRITE_MODELS_DIR)
    negative = TextEmbedding().encode("", TEXT_TOKENS, TEXT_WIDTH)[0]
    latent = {"samples": torch.zeros(1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)}

    def job(text):
        positive = TextEmbedding().encode(text, TEXT_TOKENS, TEXT_WIDTH)[0]
        return lambda patched: nodes.common_ksampler(patched, QUALITY_SEED, STEPS, CFG, SAMPLER, SCHEDULER, positive,
                                                     negative, latent)[0]["samples"]

    def decode(latents):
        return vae.decode(torch.cat(latents)).permute(0, 1, 4, 2, 3).clamp(0, 1).float()
    settings = dict(model="Wan 2.1 T2V sprite model trained here", steps=STEPS, cfg=CFG, sampler=SAMPLER,
                    scheduler=SCHEDULER, shift=SHIFT)
    return (ModelSamplingSD3().patch(model, SHIFT)[0], decode, [(text, text, job(text)) for text in PROMPTS],
            settings)


def svd_jobs() -> tuple:
    """The same for the SVD sprite model: the first frames of 12 held-out clips (one per prompt)."""
    import nodes
    from comfy_extras.nodes_video_model import SVD_img2vid_Conditioning, VideoLinearCFGGuidance
    from devkit.fixture_nodes import TinyCLIPVision, load_small_svd_checkpoint
    from devkit.sprite_videos import PROMPT_HELD_OUT_SEEDS, prompt_of, prompt_video
    from devkit.sprite_workflows import HEIGHT, SPRITE_MODELS_DIR, SVD_FILE, SVD_FRAMES, SVD_SAMPLING, WIDTH

    model, vae = load_small_svd_checkpoint(str(SPRITE_MODELS_DIR / SVD_FILE))
    clip_vision = TinyCLIPVision().load(0)[0]
    steps = SVD_SAMPLING["steps"]

    def job(seed):
        frame = prompt_video(seed, frames=1)[0][0].permute(1, 2, 0)[None]
        positive, negative, latent = SVD_img2vid_Conditioning().encode(
            clip_vision, frame, vae, WIDTH, HEIGHT, SVD_FRAMES, SVD_SAMPLING["motion_bucket_id"], SVD_SAMPLING["fps"], 0.0)
        return lambda patched: nodes.common_ksampler(
            patched, QUALITY_SEED, steps, SVD_SAMPLING["cfg"], SVD_SAMPLING["sampler"], SVD_SAMPLING["scheduler"],
            positive, negative, latent)[0]["samples"]

    def decode(latents):
        return torch.stack([vae.decode(latent).permute(0, 3, 1, 2).clamp(0, 1).float() for latent in latents])
    seeds = list(PROMPT_HELD_OUT_SEEDS[:12])
    settings = dict(model="SVD image-to-video sprite model trained here", **SVD_SAMPLING)
    return (VideoLinearCFGGuidance().patch(model, SVD_SAMPLING["min_cfg"])[0], decode,
            [(f"held-out clip {seed}", prompt_of(seed), job(seed)) for seed in seeds], settings)


def quality_of(name: str, jobs) -> list:
    from comfy_extras.nodes_easycache import EasyCacheNode
    from comfyui_streamline.core.step_rehash import RehashSettings
    from comfyui_streamline.glue.step_rehash import rehashed_model
    from devkit.video_metrics import motion_measures

    model, decode, items, settings = jobs
    runs = [("stock KSampler", "stock", model)]
    runs += [(f"Step Rehash interval {i}, shallow {k}", "Step Rehash", rehashed_model(model, RehashSettings(i, k)))
             for i, k in REHASH_SETTINGS[name]]
    runs += [(f"EasyCache threshold {t}", "EasyCache", EasyCacheNode.execute(model, t, 0.15, 0.95, False).result[0])
             for t in EASYCACHE_THRESHOLDS]
    items[0][2](model)  # warm-up: first-call costs out of the timings
    results = {run: {"latents": [], "seconds": 0.0, "flops": 0} for run, _, _ in runs}
    for _, _, sample in items:  # settings interleaved per item: a busy machine slows them alike
        for run, _, patched in runs:
            latent, seconds, flops = _timed(lambda: sample(patched))
            results[run]["latents"].append(latent)
            results[run]["seconds"] += seconds
            results[run]["flops"] += flops
    texts = [text for _, text, _ in items]
    rows, stock_videos = [], None
    for run, method, _ in runs:
        videos = decode(results[run]["latents"])
        stock_videos = videos if stock_videos is None else stock_videos
        measures = motion_measures(videos, texts)
        rows.append(dict(model=name, run=run, method=method, seconds=results[run]["seconds"],
                         flops=results[run]["flops"], psnr_vs_stock=psnr(videos, stock_videos),
                         **{k: v for k, v in measures.items() if k != "per_clip"}))
    for row in rows:
        row["time_ratio"], row["flops_ratio"] = row["seconds"] / rows[0]["seconds"], row["flops"] / rows[0]["flops"]
        print(row, flush=True)
    return [dict(settings=settings, items=[label for label, _, _ in items], seed=QUALITY_SEED)] + rows


def quality() -> None:
    results = {"wan": quality_of("wan", wan_jobs()), "svd": quality_of("svd", svd_jobs())}
    machine = cpu_machine()
    write_json("step_rehash_quality", {"machine": machine, **{
        name: {"settings": rows[0], "rows": rows[1:]} for name, rows in results.items()}})
    plot_quality({name: rows[1:] for name, rows in results.items()}, machine)


def plot_quality(rows_of: dict, machine: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    colours = {"stock": "#333333", "Step Rehash": "#4c72b0", "EasyCache": "#dd8452"}
    titles = {"wan": "Wan 2.1 T2V sprite model", "svd": "SVD I2V sprite model"}
    for (name, rows), (by_flops, by_time) in zip(rows_of.items(), axes):
        for axis, key, label in ((by_flops, "flops_ratio", "sampling FLOPs / stock (counted)"),
                                 (by_time, "time_ratio", "sampling CPU time / stock (measured)")):
            for row in rows[1:]:
                axis.scatter(row[key], row["psnr_vs_stock"], color=colours[row["method"]])
                axis.annotate(row["run"].replace("Step Rehash ", "").replace("EasyCache ", "EC "),
                              (row[key], row["psnr_vs_stock"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            axis.set_xlabel(label)
            axis.set_ylabel("PSNR of the video vs stock (dB)")
            axis.set_title(f"{titles[name]}: 12 videos, 20 steps", fontsize=9)
        for method, colour in colours.items():
            by_flops.scatter([], [], color=colour, label=method)
        by_flops.legend(fontsize=8)
    fig.suptitle("Step Rehash vs ComfyUI's EasyCache on the models trained here", fontsize=10)
    fig.text(0.01, 0.01, machine, fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "results" / "step_rehash_quality.png", dpi=110)


def main() -> None:
    import_comfyui()
    import_pack()
    parts = set(sys.argv[1:]) or {"flops"}  # quality needs models/sprites (scripts/train_video_models.py)
    if "flops" in parts:
        flops_at_full_size()
    if "quality" in parts:
        quality()


if __name__ == "__main__":
    main()
