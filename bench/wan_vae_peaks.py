"""VAE Slicer on ComfyUI's Wan 2.1 and Wan 2.2 VAE decode against stock ComfyUI 0.3.75, in one run.
Full-size VAEs under fake tensors with the live-storage tracker (bf16): activation peak and FLOPs
(torch's FlopCounterMode: the halo recompute) per strip count, on a CPU device and as if on a GPU
(fake "cuda": GPU storage only, for offload_frames); CPU time and output difference on the tiny
Wan 2.1 VAE with real tensors. Writes bench/results/wan_vae_peaks.json and .png."""
import copy
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, pyplot, write_json  # noqa: E402
from stock_peaks import BF16, GIB, measure  # noqa: E402

# name -> (builder of the meta module, latent channels, latent frames, latent height, width)
WORKLOADS = {
    "Wan 2.1 VAE 81f 480x832": (lambda: model_fixtures.build_wan_vae("full").first_stage_model, 16, 21, 60, 104),
    "Wan 2.1 VAE 81f 720x1280": (lambda: model_fixtures.build_wan_vae("full").first_stage_model, 16, 21, 90, 160),
    "Wan 2.2 VAE 121f 704x1280": (lambda: model_fixtures.build_wan22_vae("full", "meta"), 48, 31, 44, 80),
}
STRIPS = (0, 2, 8)  # 0 = auto (strips 256 output pixels wide)


def flops(meta_module, forward, prepare):
    with FakeTensorMode():
        module = model_fixtures.materialize_fake(meta_module)
        if prepare is not None:
            prepare(module)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            forward(module)
    return counter.get_total_flops()


def peak_rows(tracker_cls):
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing

    rows = []
    for name, (build, channels, frames, height, width) in WORKLOADS.items():
        meta = build().to("meta", BF16)
        methods = {"stock": None, **{f"VAE Slicer, strips {s or 'auto'}": SliceSettings(strip_chunks=s) for s in STRIPS},
                   "VAE Slicer auto, offload_frames": SliceSettings(offload_frames=True)}
        stock_flops = None
        for method, settings in methods.items():
            prepare = None if settings is None else (lambda v, s=settings: apply_slicing(v, s))
            device = "cuda" if settings is not None and settings.offload_frames else "cpu"

            def forward(vae):
                return vae.decode(torch.empty(1, channels, frames, height, width, dtype=BF16, device=device))
            started = time.monotonic()
            peak, weights = measure(copy.deepcopy(meta), forward, tracker_cls, prepare, device)
            total = flops(copy.deepcopy(meta), forward, prepare) if device == "cpu" else None
            stock_flops = stock_flops or total
            rows.append(dict(workload=name, method=method, peak_gib=peak / GIB, weights_gib=weights / GIB,
                             flops_ratio=total / stock_flops if total else None, device=device))
            print(f"{name} {method}: {peak / GIB:.2f} GiB, FLOPs x{rows[-1]['flops_ratio'] or float('nan'):.3f} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    return rows


def latency_rows():
    """CPU time and output difference of the sliced tiny Wan 2.1 VAE against stock, real tensors."""
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing

    vae = model_fixtures.build_wan_vae("tiny").first_stage_model
    z = torch.randn(1, 16, 6, 30, 52, generator=torch.Generator().manual_seed(0))  # 21 frames at 240x416
    rows = []
    with torch.inference_mode():
        started = time.perf_counter()
        reference = vae.decode(z)
        stock_seconds = time.perf_counter() - started
        for strips in (0, 2, 8):
            apply_slicing(vae, SliceSettings(strip_chunks=strips))
            started = time.perf_counter()
            output = vae.decode(z)
            seconds = time.perf_counter() - started
            remove_slicing(vae)
            rows.append(dict(part="tiny Wan 2.1 VAE 21f 240x416", strips=strips or "auto",
                             cpu_time_ratio=seconds / stock_seconds,
                             max_abs_diff=((output - reference).abs().max() / reference.abs().max()).item()))
            print(rows[-1], flush=True)
    return rows


def main():
    import_comfyui()
    import_pack()
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    machine = cpu_machine()
    rows = peak_rows(LiveStorageTracker)
    write_json("wan_vae_peaks", {"machine": machine, "rows": rows, "latency": latency_rows()})
    plot(rows, machine)


def plot(rows, machine):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(10, 6))
    labels = [f"{r['workload']}: {r['method']}" for r in rows][::-1]
    ax.barh(labels, [r["peak_gib"] for r in rows][::-1],
            color=["#c44e52" if "stock" in label else "#55a868" if "offload" in label else "#4c72b0" for label in labels])
    ax.set_xlabel("activation peak (GiB; offload_frames: GPU storage only)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"Wan VAE decode, bf16: VAE Slicer vs stock ComfyUI 0.3.75\n(fake tensors; {machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "wan_vae_peaks.png", dpi=110)


if __name__ == "__main__":
    main()
