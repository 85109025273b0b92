"""CMD decode against decoding the same 16 frames of 512x1024 with an image VAE frame by frame
(Stable Diffusion's, as ComfyUI builds it) and with the Wan 2.1 video VAE, in one run.

Paper-sized CMD (preset "paper"), bf16. Activation peak (live-storage tracker) and FLOPs (torch's
FlopCounterMode) at full size under fake tensors; CPU time with real tensors (random weights) at a
quarter of the size (128x256), where all three fit this machine's time. Also CMD's motion sampling
(DiT-B, 50 steps, as the paper's DDIM sampler), which a CMD video adds to its decode. Writes
bench/results/cmd_decode.json and .png."""
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, flop_counter, pyplot, write_json  # noqa: E402
from stock_peaks import BF16, GIB  # noqa: E402

FRAMES, HEIGHT, WIDTH = 16, 512, 1024
SAMPLING_STEPS = 50
SD_VAE = dict(ch=128, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=[], in_channels=3,
              resolution=256, z_channels=4)  # Stable Diffusion 1.x / 2.x VAE decoder


def cmd_config(scale: int = 1):
    from comfyui_streamline.core.cmd import PRESETS
    return dataclasses.replace(PRESETS["paper"], height=HEIGHT // scale, width=WIDTH // scale)


def workloads(scale: int) -> dict:
    """name -> (builder of the module, forward(module, dtype, device))."""
    from comfy.ldm.modules.diffusionmodules.model import Decoder
    from comfyui_streamline.core.cmd import CMDModel, sample_motion
    config, height, width = cmd_config(scale), HEIGHT // scale, WIDTH // scale

    def cmd_decode(model, dtype, device):
        content = torch.zeros(1, 3, height, width, dtype=dtype, device=device)
        return model.autoencoder.decode(content, torch.zeros(1, *config.motion_shape, dtype=dtype, device=device))

    def cmd_sample(model, dtype, device):
        content = torch.zeros(1, 3, height, width, dtype=dtype, device=device)
        noise = torch.zeros(1, *config.motion_shape, dtype=dtype, device=device)
        return sample_motion(model.motion_dit, content, noise, SAMPLING_STEPS)

    def image_vae(decoder, dtype, device):  # as VAE.decode with room for one frame at a time
        frames = torch.empty(FRAMES, 3, height, width, dtype=dtype, device=device)
        for index in range(FRAMES):
            frames[index:index + 1] = decoder(torch.zeros(1, 4, height // 8, width // 8, dtype=dtype, device=device))
        return frames

    def wan_vae(vae, dtype, device):  # 17 frames: Wan's VAE takes 4k + 1
        return vae.decode(torch.zeros(1, 16, (FRAMES - 1) // 4 + 1, height // 8, width // 8, dtype=dtype, device=device))

    return {
        "CMD decoder (content + motion -> 16 frames)": (lambda: CMDModel(config), cmd_decode),
        f"CMD motion sampling (DiT-B, {SAMPLING_STEPS} steps)": (lambda: CMDModel(config), cmd_sample),
        "image VAE (SD), frame by frame": (lambda: Decoder(**SD_VAE), image_vae),
        "Wan 2.1 VAE (17 frames)": (lambda: model_fixtures.build_wan_vae("full").first_stage_model, wan_vae),
    }


def full_size_rows(tracker_cls) -> list:
    rows = []
    for name, (build, forward) in workloads(1).items():
        with torch.device("meta"):
            meta = build().to(BF16).requires_grad_(False)
        measured = {}
        for what in ("peak", "flops"):
            twin = copy.deepcopy(meta)
            with FakeTensorMode():
                module = model_fixtures.materialize_fake(twin)
                weights = sum(p.numel() * p.element_size() for p in module.parameters())
                with torch.inference_mode(), (tracker_cls() if what == "peak" else flop_counter()) as counter:
                    forward(module, BF16, "cpu")
            measured[what] = counter.peak if what == "peak" else counter.get_total_flops()
        rows.append(dict(workload=name, peak_gib=measured["peak"] / GIB, weights_gib=weights / GIB,
                         tflops=measured["flops"] / 1e12))
        print(rows[-1], flush=True)
    return rows


def cpu_time_rows(scale: int = 4) -> list:
    rows = []
    for name, (build, forward) in workloads(scale).items():
        torch.manual_seed(0)
        module = build().eval()
        with torch.inference_mode():
            forward(module, torch.float32, "cpu")  # warm-up
            started = time.perf_counter()
            forward(module, torch.float32, "cpu")
        rows.append(dict(workload=name, size=f"{FRAMES}x{HEIGHT // scale}x{WIDTH // scale}",
                         cpu_seconds=time.perf_counter() - started))
        print(rows[-1], flush=True)
    return rows


def main():
    import_comfyui()
    import_pack()
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    machine = cpu_machine()
    full, timed = full_size_rows(LiveStorageTracker), cpu_time_rows()
    decoder = full[0]
    for row, time_row in zip(full, timed):
        row.update(cpu_seconds_quarter_size=time_row["cpu_seconds"], peak_vs_cmd=row["peak_gib"] / decoder["peak_gib"],
                   flops_vs_cmd=row["tflops"] / decoder["tflops"],
                   time_vs_cmd=time_row["cpu_seconds"] / timed[0]["cpu_seconds"])
    write_json("cmd_decode", {"machine": machine, "frames": FRAMES, "height": HEIGHT, "width": WIDTH, "dtype": "bf16",
                       "config": dataclasses.asdict(cmd_config()), "rows": full})
    plot(full, machine)


def plot(rows, machine):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    labels = [r["workload"] for r in rows]
    colours = ["#55a868", "#8fbc8f", "#4c72b0", "#c44e52"]
    for ax, key, title in zip(axes, ("peak_gib", "tflops", "cpu_seconds_quarter_size"),
                              ("activation peak (GiB), 16x512x1024", "TFLOPs, 16x512x1024",
                               "CPU seconds, 16x128x256")):
        ax.barh(labels[::-1], [r[key] for r in rows][::-1], color=colours[::-1])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"CMD decode vs image VAE frame by frame vs Wan 2.1 VAE, bf16 (fake tensors; {machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "cmd_decode.png", dpi=110)


if __name__ == "__main__":
    main()
