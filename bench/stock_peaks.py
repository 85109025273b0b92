"""Activation peaks of stock ComfyUI 0.3.75 on full-size models, measured under fake tensors with the
dispatch-level live-storage tracker (weights excluded). These are the baselines the slicing nodes are
compared against. Writes bench/results/stock_peaks.json and .png."""
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, pyplot, write_json  # noqa: E402

GIB = 1024 ** 3
FP16, BF16 = torch.float16, torch.bfloat16


def measure(meta_module, forward, tracker_cls, prepare=None, device="cpu"):
    """(activation peak, weight bytes) of `forward(module)` on fake copies of a meta-built module on
    `device`, after `prepare(module)` (e.g. installing slicing) when given. On "cuda" (fake tensors
    need no GPU) only GPU storage is counted, as torch.cuda's peak statistics would."""
    with FakeTensorMode():
        module = model_fixtures.materialize_fake(meta_module, device)
        if prepare is not None:
            prepare(module)
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        with torch.inference_mode(), tracker_cls(device if device != "cpu" else None) as tracker:
            forward(module)
    return tracker.peak, weights


def svd_unet(frames, tracker_cls, prepare=None):
    batch = 2 * frames  # classifier-free guidance

    def forward(unet):
        unet(torch.empty(batch, 8, 72, 128, dtype=FP16), torch.empty(batch, dtype=FP16),  # 576x1024
             torch.empty(batch, 1, 1024, dtype=FP16), torch.empty(batch, 768, dtype=FP16),
             num_video_frames=frames, image_only_indicator=torch.zeros(2, frames, dtype=FP16))
    return measure(model_fixtures.build_svd("full", FP16, "meta").diffusion_model, forward, tracker_cls, prepare)


def svd_vae_decode(frames, tracker_cls, prepare=None, device="cpu"):
    vae = model_fixtures.build_svd_vae().first_stage_model.to("meta", FP16)
    return measure(vae, lambda v: v.decode(torch.empty(frames, 4, 72, 128, dtype=FP16, device=device)),
                   tracker_cls, prepare, device)


def wan(size, frames, batch, tracker_cls, prepare=None):
    def forward(model):
        model(torch.empty(batch, 16, (frames - 1) // 4 + 1, 60, 104, dtype=BF16),  # 480x832
              torch.empty(batch, dtype=BF16), torch.empty(batch, 512, 4096, dtype=BF16))
    return measure(model_fixtures.build_wan(size, BF16, "meta").diffusion_model, forward, tracker_cls, prepare)


WORKLOADS = {
    "SVD UNet 14f 576x1024 fp16, CFG batch 2": lambda t: svd_unet(14, t),
    "SVD UNet 25f 576x1024 fp16, CFG batch 2": lambda t: svd_unet(25, t),
    "SVD temporal VAE decode 14f at once": lambda t: svd_vae_decode(14, t),
    "SVD temporal VAE decode 7f batch": lambda t: svd_vae_decode(7, t),
    "SVD temporal VAE decode 1f batch": lambda t: svd_vae_decode(1, t),
    "Wan 2.1 1.3B 81f 480x832 bf16, batch 1": lambda t: wan("1.3B", 81, 1, t),
    "Wan 2.1 1.3B 81f 480x832 bf16, batch 2": lambda t: wan("1.3B", 81, 2, t),
    "Wan 2.1 14B 81f 480x832 bf16, batch 1": lambda t: wan("14B", 81, 1, t),
}


def main():
    import_pack()
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    rows = []
    for name, run in WORKLOADS.items():
        started = time.monotonic()
        peak, weights = run(LiveStorageTracker)
        rows.append({"workload": name, "activation_peak_gib": round(peak / GIB, 3),
                     "weights_gib": round(weights / GIB, 3), "seconds": round(time.monotonic() - started, 1)})
        print(f"{name}: {peak / GIB:.2f} GiB activations over {weights / GIB:.2f} GiB weights")
    machine = cpu_machine() + ", fake tensors"
    write_json("stock_peaks", {"machine": machine, "rows": rows})
    plot(rows, machine)


def plot(rows, machine):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r["workload"] for r in rows][::-1]
    ax.barh(names, [r["activation_peak_gib"] for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel("activation peak (GiB)")
    ax.set_title(f"Stock ComfyUI 0.3.75 activation peaks ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "stock_peaks.png", dpi=110)


if __name__ == "__main__":
    main()
