"""DualParal Multi-GPU Sampler against stock ComfyUI 0.3.75 sampling of long Wan videos.

Full size (Wan 2.1 1.3B, bf16, 480x832, CFG, fake tensors, live-storage tracker): every rank's
peak replayed on its own (its messages are fabricated: memory does not depend on their values) for
videos of 81 to 1,025 frames, against stock KSampler (one forward over all frames) and stock
context windows (WanContextWindowsManual, 81-frame windows); FLOPs (FlopCounterMode) of each block
forward, and the N-GPU time modelled by simulating the pipeline (per-rank compute from the FLOPs,
messages over PCIe) including its bubble.
Measured on CPU ranks (gloo, real tensors, the tiny Wan with 4 layers): per-rank compute, waiting
and data sent, and wall time against stock KSampler and stock context windows on the same latent.
Writes bench/results/dualparal.json and .png."""
import sys
import time
from collections import deque
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from devkit import model_fixtures  # noqa: E402
from reporting import RESULTS, cpu_machine, flop_counter, pyplot, write_json  # noqa: E402
from stock_peaks import BF16, GIB, wan  # noqa: E402

FRAMES = [int(f) for f in sys.argv[1:] if f.isdigit()] or [81, 161, 321, 641]
RANKS = 4
FRAMES_PER_BLOCK, CACHE_FRAMES, STEPS = 10, 5, 4  # latent frames; memory stops growing at STEPS blocks
SLICED = dict(frame_chunks=4, group_ops=True)  # inside every rank: 4 token chunks (auto would take 31)
SLICED_FRAMES = (81, 321)  # the sliced replay is slow under fake tensors
WINDOW_FRAMES, WINDOW_OVERLAP = 81, 30  # stock context windows (video frames)
GPU_TFLOPS, LINK_GBPS = 80.0, 20.0  # modelled GPU: sustained bf16 throughput, PCIe 4.0 x16
HEIGHT, WIDTH = 60, 104  # latent of 480x832


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


class FabricatedRing:
    """A ring whose receives return fresh tensors and whose sends stay in flight as the real ring's
    do: one rank's memory, replayed alone."""

    def __init__(self, device, stats):
        self.device, self.stats, self._in_flight = device, stats, deque()

    def send(self, tensor):
        self._in_flight.append(tensor.contiguous())
        self.stats.sent_bytes += tensor.numel() * tensor.element_size()
        while len(self._in_flight) > 2:
            self._in_flight.popleft()

    def post_receive(self, shape, dtype):
        return None, torch.empty(shape, dtype=dtype, device=self.device)

    def wait(self, posted):
        return posted[1]

    def receive(self, shape, dtype):
        return self.wait(self.post_receive(shape, dtype))

    def close(self):
        self._in_flight.clear()


class FabricatedFirstRank:
    """The first rank's latent blocks and samplers, fabricated: each job's input is a fresh tensor
    (of the model's input channels), predictions are dropped. Their state (a few latent blocks, MBs)
    is left out of the replayed peak; the host's samplers cannot run on fake tensors."""

    def __init__(self, channels, height, width, batch=2):
        self.channels, self.height, self.width, self.batch = channels, height, width, batch

    def input(self, job):
        return torch.zeros(self.batch, self.channels, job.context_frames + job.frames, self.height, self.width)

    def update(self, job, prediction):
        pass

    def close(self):
        pass


def sampling(steps, batch=2):
    from comfyui_streamline.core.dualparal import Sampling
    sigmas = [1.0 - i / steps for i in range(steps + 1)]  # memory and FLOPs do not depend on them
    return Sampling(sigmas=sigmas, timesteps=[s * 1000 for s in sigmas[:-1]], cfg=5.0,
                    context=torch.zeros(batch, 512, model_fixtures.WAN_TEXT_DIM, dtype=BF16))


def rank_peak(meta_model, plan, rank, ranks, sliced=False):
    """Peak live storage of `rank` for `plan` (fake tensors), with its share of the weights; `sliced`:
    the rank's layers run with Feature Slicer + Operator Grouper (SLICED)."""
    from comfyui_streamline.core.slicing import SliceSettings
    from comfyui_streamline.core.dualparal import RankStats, layer_ranges
    from comfyui_streamline.core.dualparal.pipeline import run_rank
    from comfyui_streamline.core.dualparal.wan_stage import WanStage, rank_model, rank_prepared

    layers = layer_ranges(len(meta_model.blocks), ranks)[rank]
    with FakeTensorMode():
        model = rank_model(model_fixtures.materialize_fake(meta_model), layers, rank == 0, rank == ranks - 1)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        stage = WanStage(model, BF16, torch.device("cpu"), HEIGHT, WIDTH)
        stats = RankStats(rank, "cpu", (layers.start, layers.stop))
        first = FabricatedFirstRank(16, HEIGHT, WIDTH) if rank == 0 else None
        settings = SliceSettings(**SLICED) if sliced else None
        with torch.inference_mode(), rank_prepared([model.blocks], settings, torch.device("cpu"), stats):
            run_rank([stage], plan, sampling(plan.steps), stats, FabricatedRing(torch.device("cpu"), stats)
                     if ranks > 1 else None, first)
    return stats.peak_bytes, weights, stats.sent_bytes


def job_flops(meta_model, plan, make_sampling=None, channels=16):
    """FLOPs of every job of `plan` through the whole model (fake tensors), counted once per job
    shape; a job that appends cached frames is preceded by an uncounted job that keeps them.
    `make_sampling()`: the run's Sampling (text context and CLIP tokens; made inside the fake mode),
    `channels`: the model's input channels."""
    from comfyui_streamline.core.dualparal.schedule import Job
    from comfyui_streamline.core.dualparal.wan_stage import WanStage, feature_cache_installed

    by_shape = {}
    with FakeTensorMode():
        settings = make_sampling() if make_sampling else sampling(plan.steps)
        model = model_fixtures.materialize_fake(meta_model)
        with torch.inference_mode(), feature_cache_installed(model.blocks):
            for job in plan.jobs():
                key = (job.context_frames, job.frames, job.appended_frames)
                if key in by_shape:
                    continue
                stage = WanStage(model, BF16, torch.device("cpu"), HEIGHT, WIDTH)
                context = stage.text(settings.context, settings.clip)
                e, e0 = stage.time(500.0, 2)
                if job.appended_frames:
                    keeper = Job(0, 1, 0, 0, job.appended_frames, 0, job.appended_frames)
                    stage.layers(stage.embed(torch.empty(2, channels, keeper.frames, HEIGHT, WIDTH)), keeper, e0,
                                 context)
                latents = torch.empty(2, channels, job.context_frames + job.frames, HEIGHT, WIDTH)
                with flop_counter() as counter:
                    stage.head(stage.layers(stage.embed(latents), job, e0, context), job, e)
                by_shape[key] = counter.get_total_flops()
    return [by_shape[(j.context_frames, j.frames, j.appended_frames)] for j in plan.jobs()]


def stock_flops(meta_model, frames):
    with FakeTensorMode():
        model = model_fixtures.materialize_fake(meta_model)
        with torch.inference_mode(), flop_counter() as counter:
            model(torch.empty(2, 16, frames, HEIGHT, WIDTH, dtype=BF16), torch.empty(2, dtype=BF16),
                  torch.empty(2, 512, 4096, dtype=BF16))
    return counter.get_total_flops()


def simulate(plan, flops, ranks, message_bytes):
    """Makespan (s) of the pipeline: a job enters the first rank once the predictions it reads are
    back (its block's and the previous block's, from the previous iteration); each rank runs its
    share of the job's FLOPs after the previous rank's hidden states have crossed the link."""
    link = message_bytes / (LINK_GBPS * 1e9) if ranks > 1 else 0.0
    free = [0.0] * ranks
    returned = {}
    for job, total in zip(plan.jobs(), flops):
        arrival = max(returned.get((job.iteration - 1, b), 0.0) for b in (job.block, job.block - 1))
        for rank in range(ranks):
            free[rank] = max(arrival, free[rank]) + total / ranks / (GPU_TFLOPS * 1e12)
            arrival = free[rank] + link
        returned[(job.iteration, job.block)] = arrival
    return max(returned.values())


def full_size_rows():
    from comfyui_streamline.core.dualparal import BlockPlan

    meta_model = model_fixtures.build_wan("1.3B", BF16, "meta").diffusion_model
    window = latent_frames(WINDOW_FRAMES)
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    window_peak, weights = wan("1.3B", WINDOW_FRAMES, 2, LiveStorageTracker)
    window_flops = stock_flops(meta_model, window)
    rows = []
    for frames in FRAMES:
        latent = latent_frames(frames)
        plan = BlockPlan(latent, FRAMES_PER_BLOCK, CACHE_FRAMES, STEPS)
        peaks = [rank_peak(meta_model, plan, rank, RANKS) for rank in range(RANKS)]
        single = rank_peak(meta_model, plan, 0, 1)
        sliced = ([rank_peak(meta_model, plan, rank, RANKS, sliced=True) for rank in range(RANKS)]
                  if frames in SLICED_FRAMES else [])
        stock_peak, _ = wan("1.3B", frames, 2, LiveStorageTracker)
        flops = job_flops(meta_model, plan)
        hidden_bytes = 2 * (FRAMES_PER_BLOCK + CACHE_FRAMES) * HEIGHT * WIDTH // 4 * meta_model.dim * 2
        stride = window - latent_frames(WINDOW_OVERLAP)
        windows = 1 if latent <= window else 1 + -(-(latent - window) // stride)
        stock_s = STEPS * stock_flops(meta_model, latent) / (GPU_TFLOPS * 1e12)
        row = dict(frames=frames, latent_frames=latent, blocks=len(plan.blocks), jobs=len(plan.jobs()),
                   weights_gib=weights / GIB,
                   stock_peak_gib=stock_peak / GIB, context_windows_peak_gib=window_peak / GIB,
                   dualparal_1_rank_peak_gib=single[0] / GIB,
                   dualparal_rank_peaks_gib=[p[0] / GIB for p in peaks],
                   dualparal_sliced_rank_peaks_gib=[p[0] / GIB for p in sliced] or None,
                   dualparal_rank_weights_gib=[p[1] / GIB for p in peaks],
                   sent_gib_per_rank=[p[2] / GIB for p in peaks],
                   stock_time_s=stock_s, context_windows_time_s=STEPS * windows * window_flops / (GPU_TFLOPS * 1e12),
                   dualparal_1_gpu_time_s=simulate(plan, flops, 1, hidden_bytes),
                   dualparal_time_s=simulate(plan, flops, RANKS, hidden_bytes),
                   dualparal_ideal_time_s=sum(flops) / RANKS / (GPU_TFLOPS * 1e12))
        row["bubble"] = 1 - row["dualparal_ideal_time_s"] / row["dualparal_time_s"]
        row["speedup_vs_stock"] = row["stock_time_s"] / row["dualparal_time_s"]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def cpu_rows():
    """Real runs on this machine's CPU: the tiny Wan with 4 layers, 33 latent frames at 192x320."""
    import nodes
    from comfy_extras.nodes_context_windows import WanContextWindowsManualNode
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker
    from comfyui_streamline.glue.dualparal import sample
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    model = comfy.model_patcher.ModelPatcher(model_fixtures.build_wan("tiny", layers=4), device, device)
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 32, model_fixtures.WAN_TEXT_DIM, generator=generator), {}]]
    negative = [[torch.randn(1, 32, model_fixtures.WAN_TEXT_DIM, generator=generator), {}]]
    latent = {"samples": torch.zeros(1, 16, 33, 24, 40)}
    steps, shift, cfg = 4, 5.0, 5.0
    rows = []
    shifted = ModelSamplingSD3().patch(model, shift)[0]
    windowed = WanContextWindowsManualNode.execute(shifted, 33, 16, "standard_static", 1, False, "pyramid").result[0]
    for name, sampler_model in [("stock KSampler", shifted), ("stock context windows (33f, overlap 16)", windowed)]:
        started = time.perf_counter()
        with LiveStorageTracker() as tracker:
            nodes.common_ksampler(sampler_model, 0, steps, cfg, "euler", "simple", positive, negative, latent)
        rows.append(dict(method=name, seconds=time.perf_counter() - started, peak_mib=[tracker.peak / 2**20]))
        print(rows[-1], flush=True)
    for devices in ("cpu:1", "cpu:2", "cpu:4"):
        _, stats, seconds = sample(shifted, positive, negative, latent, 0, steps, cfg, "euler", "simple", devices, 8, 4,
                                   1.0)
        rows.append(dict(method=f"DualParal {devices}", seconds=seconds, peak_mib=[s.peak_bytes / 2**20 for s in stats],
                         compute_s=[s.compute_s for s in stats], wait_s=[s.wait_s for s in stats],
                         sent_mib=[s.sent_bytes / 2**20 for s in stats], jobs=stats[0].jobs))
        print(rows[-1], flush=True)
    return rows


def main():
    import_comfyui()
    import_pack()
    machine = cpu_machine()
    full = full_size_rows()
    cpu = cpu_rows()
    write_json("dualparal", {"machine": machine, "settings": dict(
        ranks=RANKS, frames_per_block=FRAMES_PER_BLOCK, cache_frames=CACHE_FRAMES, steps=STEPS,
        window_frames=WINDOW_FRAMES, window_overlap=WINDOW_OVERLAP, gpu_tflops=GPU_TFLOPS, link_gbps=LINK_GBPS),
        "full_size": full, "cpu_runs": cpu})
    plot(full, machine)


def plot(rows, machine):
    plt = pyplot()
    fig, (memory, seconds) = plt.subplots(1, 2, figsize=(12, 5))
    frames = [r["frames"] for r in rows]
    memory.plot(frames, [r["stock_peak_gib"] for r in rows], "o-", color="#c44e52", label="stock KSampler")
    memory.plot(frames, [r["context_windows_peak_gib"] for r in rows], "s--", color="#dd8452",
                label="stock context windows (81f)")
    memory.plot(frames, [r["dualparal_1_rank_peak_gib"] for r in rows], "^-", color="#55a868", label="DualParal, 1 rank")
    memory.plot(frames, [max(r["dualparal_rank_peaks_gib"]) for r in rows], "v-", color="#4c72b0",
                label=f"DualParal, largest of {RANKS} ranks")
    sliced = [r for r in rows if r["dualparal_sliced_rank_peaks_gib"]]
    memory.plot([r["frames"] for r in sliced], [max(r["dualparal_sliced_rank_peaks_gib"]) for r in sliced], "D-",
                color="#8172b2", label=f"DualParal + Feature Slicer/Grouper (4 chunks), largest of {RANKS} ranks")
    memory.set_xlabel("video frames")
    memory.set_ylabel("activation peak per device (GiB)")
    memory.legend(fontsize=8)
    memory.set_title("Wan 2.1 1.3B 480x832 bf16, CFG: memory", fontsize=9)
    seconds.plot(frames, [r["stock_time_s"] for r in rows], "o-", color="#c44e52", label="stock KSampler, 1 GPU")
    seconds.plot(frames, [r["context_windows_time_s"] for r in rows], "s--", color="#dd8452",
                 label="stock context windows, 1 GPU")
    seconds.plot(frames, [r["dualparal_1_gpu_time_s"] for r in rows], "^-", color="#55a868", label="DualParal, 1 GPU")
    seconds.plot(frames, [r["dualparal_time_s"] for r in rows], "v-", color="#4c72b0", label=f"DualParal, {RANKS} GPUs")
    seconds.set_xlabel("video frames")
    seconds.set_ylabel(f"modelled time, {STEPS} steps (s)")
    seconds.legend(fontsize=8)
    seconds.set_title(f"modelled from FLOPs at {GPU_TFLOPS:.0f} TFLOPS, {LINK_GBPS:.0f} GB/s links", fontsize=9)
    fig.suptitle(f"DualParal vs stock ComfyUI 0.3.75 (fake tensors; {machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "dualparal.png", dpi=110)


if __name__ == "__main__":
    main()
