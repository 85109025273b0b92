"""DualParal for image-to-video and for Wan 2.2 A14B's two experts, at full size (14B, bf16, 480x832,
CFG, fake tensors, live-storage tracker), 4 ranks, against stock ComfyUI sampling in one forward.

- Wan 2.1 I2V 14B: the 20 image channels concatenated to the input and 257 CLIP image tokens in
  every cross-attention.
- Wan 2.2 A14B T2V: high-noise expert for the first half of the steps, low-noise one for the rest;
  every rank holds its layers of both (blocks on either side of the switch are in flight at once).

Per rank: activation peak (replayed rank by rank with fabricated messages, as bench/dualparal.py),
weights held, and the N-GPU time modelled from the FLOPs of every block forward (the same pipeline
simulation as bench/dualparal.py). Writes bench/results/dualparal_experts.json and .png
(`--plot`: redraws the plot from the JSON)."""
import json
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from devkit import model_fixtures  # noqa: E402
from dualparal import (CACHE_FRAMES, FRAMES_PER_BLOCK, GPU_TFLOPS, HEIGHT, LINK_GBPS, RANKS, STEPS, WIDTH,  # noqa: E402
                       FabricatedFirstRank, FabricatedRing, job_flops, latent_frames, simulate)
from reporting import RESULTS, cpu_machine, flop_counter, pyplot, write_json  # noqa: E402
from stock_peaks import BF16, GIB  # noqa: E402

FRAMES = [int(f) for f in sys.argv[1:] if f.isdigit()] or [81, 161]
CLIP_TOKENS, IMAGE_CHANNELS = 257, 20  # ViT-H penultimate tokens; mask (4) + image latent (16)
WORKLOADS = {  # name -> (Wan variant, experts)
    "Wan 2.1 I2V 14B": ("2.1 i2v", 1),
    "Wan 2.2 A14B T2V (two experts)": ("2.1 t2v", 2),
}


def sampling(steps, image_to_video, frames):
    from comfyui_streamline.core.dualparal import Sampling
    sigmas = [1.0 - i / steps for i in range(steps + 1)]  # memory and FLOPs do not depend on them
    return Sampling(sigmas=sigmas, timesteps=[s * 1000 for s in sigmas[:-1]], cfg=5.0,
                    context=torch.zeros(2, 512, model_fixtures.WAN_TEXT_DIM, dtype=BF16),
                    image=torch.zeros(2, IMAGE_CHANNELS, frames, HEIGHT, WIDTH) if image_to_video else None,
                    clip=torch.zeros(2, CLIP_TOKENS, 1280, dtype=BF16) if image_to_video else None)


def rank_peak(meta_models, plan, rank, ranks, image_to_video):
    """(activation peak, weights held, bytes sent) of `rank` holding its layers of every expert."""
    from comfyui_streamline.core.dualparal import RankStats, layer_ranges
    from comfyui_streamline.core.dualparal.pipeline import run_rank
    from comfyui_streamline.core.dualparal.wan_stage import WanStage, rank_model, rank_prepared

    layers = layer_ranges(len(meta_models[0].blocks), ranks)[rank]
    with FakeTensorMode():
        models = [rank_model(model_fixtures.materialize_fake(m), layers, rank == 0, rank == ranks - 1)
                  for m in meta_models]
        weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
        stages = [WanStage(m, BF16, torch.device("cpu"), HEIGHT, WIDTH) for m in models]
        stats = RankStats(rank, "cpu", (layers.start, layers.stop))
        settings = sampling(plan.steps, image_to_video, plan.frames)
        channels = 16 + (IMAGE_CHANNELS if image_to_video else 0)
        first = FabricatedFirstRank(channels, HEIGHT, WIDTH) if rank == 0 else None
        with torch.inference_mode(), rank_prepared([m.blocks for m in models], None, torch.device("cpu"), stats):
            run_rank(stages, plan, settings, stats, FabricatedRing(torch.device("cpu"), stats) if ranks > 1 else None,
                     first)
    return stats.peak_bytes, weights, stats.sent_bytes


def stock(meta_model, frames, image_to_video):
    """(activation peak, FLOPs) of one stock forward over the whole latent (CFG batch 2)."""
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    with FakeTensorMode():
        model = model_fixtures.materialize_fake(meta_model)
        channels = 16 + (IMAGE_CHANNELS if image_to_video else 0)
        clip = {"clip_fea": torch.empty(2, CLIP_TOKENS, 1280, dtype=BF16)} if image_to_video else {}
        with torch.inference_mode(), LiveStorageTracker() as tracker, flop_counter() as counter:
            model(torch.empty(2, channels, frames, HEIGHT, WIDTH, dtype=BF16), torch.empty(2, dtype=BF16),
                  torch.empty(2, 512, 4096, dtype=BF16), **clip)
    return tracker.peak, counter.get_total_flops()


def rows():
    from comfyui_streamline.core.dualparal import BlockPlan

    found = []
    for name, (variant, experts) in WORKLOADS.items():
        meta_models = [model_fixtures.build_wan("14B", BF16, "meta", variant=variant).diffusion_model
                       for _ in range(experts)]
        image_to_video = variant != "2.1 t2v"
        for frames in FRAMES:
            latent = latent_frames(frames)
            plan = BlockPlan(latent, FRAMES_PER_BLOCK, CACHE_FRAMES, STEPS, STEPS // 2 if experts == 2 else 0)
            peaks = [rank_peak(meta_models, plan, rank, RANKS, image_to_video) for rank in range(RANKS)]
            stock_peak, stock_flops = stock(meta_models[0], latent, image_to_video)
            flops = job_flops(meta_models[0], plan, lambda: sampling(plan.steps, image_to_video, plan.frames),
                              16 + (IMAGE_CHANNELS if image_to_video else 0))  # one expert: both have its shape
            hidden_bytes = 2 * (FRAMES_PER_BLOCK + CACHE_FRAMES) * HEIGHT * WIDTH // 4 * meta_models[0].dim * 2
            weights = sum(p.numel() * p.element_size() for m in meta_models for p in m.parameters())
            row = dict(workload=name, frames=frames, latent_frames=latent, blocks=len(plan.blocks),
                       experts=experts, weights_gib=weights / GIB, stock_peak_gib=stock_peak / GIB,
                       # stock ComfyUI loads one expert at a time (its two KSamplerAdvanced nodes swap them)
                       stock_weights_gib=weights / experts / GIB,
                       dualparal_rank_peaks_gib=[p[0] / GIB for p in peaks],
                       dualparal_rank_weights_gib=[p[1] / GIB for p in peaks],
                       sent_gib_per_rank=[p[2] / GIB for p in peaks],
                       stock_time_s=STEPS * stock_flops / (GPU_TFLOPS * 1e12),
                       dualparal_1_gpu_time_s=simulate(plan, flops, 1, hidden_bytes),
                       dualparal_time_s=simulate(plan, flops, RANKS, hidden_bytes))
            row["speedup_vs_stock"] = row["stock_time_s"] / row["dualparal_time_s"]
            found.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return found


def main():
    if "--plot" in sys.argv:  # redraw from the written results
        results = json.loads((RESULTS / "dualparal_experts.json").read_text())
        return plot(results["rows"], results["machine"])
    import_comfyui()
    import_pack()
    machine = cpu_machine()
    found = rows()
    write_json("dualparal_experts", {"machine": machine, "settings": dict(
        ranks=RANKS, frames_per_block=FRAMES_PER_BLOCK, cache_frames=CACHE_FRAMES, steps=STEPS,
        expert_switch=STEPS // 2, gpu_tflops=GPU_TFLOPS, link_gbps=LINK_GBPS), "rows": found})
    plot(found, machine)


def plot(found, machine):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(12, 4.5))
    for axis, name in zip(axes, WORKLOADS):
        mine = [r for r in found if r["workload"] == name]
        labels = [f"{r['frames']}f" for r in mine]
        x = range(len(mine))
        stock_held = [r["stock_peak_gib"] + r["stock_weights_gib"] for r in mine]
        axis.bar([i - 0.2 for i in x], stock_held, 0.4, color="#c44e52",
                 label="stock, 1 GPU (weights of one expert + activations)")
        held = [max(w + p for w, p in zip(r["dualparal_rank_weights_gib"], r["dualparal_rank_peaks_gib"]))
                for r in mine]
        axis.bar([i + 0.2 for i in x], held, 0.4, color="#4c72b0",
                 label=f"DualParal, largest of {RANKS} ranks (weights share + activations)")
        for i, r in enumerate(mine):
            axis.text(i + 0.2, held[i], f"{r['speedup_vs_stock']:.2f}x faster", ha="center", va="bottom", fontsize=8)
        axis.set_ylim(0, 1.4 * max(stock_held + held))
        axis.set_xticks(list(x), labels)
        axis.set_ylabel("GiB per device")
        axis.set_title(name, fontsize=9)
        axis.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"DualParal, 14B bf16 480x832, CFG; time modelled at {GPU_TFLOPS:.0f} TFLOPS "
                 f"(fake tensors; {machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "dualparal_experts.png", dpi=110)


if __name__ == "__main__":
    main()
