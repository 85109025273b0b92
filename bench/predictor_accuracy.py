"""The Memory Planner's dry-run predictor against measurement, in one run: predicted activation peak
(fake tensors on a weightless twin) vs the same forward with real fp32 tensors (random weights),
measured by the live-storage tracker; plus how long a prediction takes for full-size models. CPU (this
machine; process RSS is no check here: the allocator keeps freed memory, so RSS rises only with new
highs of the whole process); bench/slicing_gpu.py compares against torch.cuda on a GPU.
Writes bench/results/predictor_accuracy.json and .png."""
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, pyplot, write_json  # noqa: E402

GIB = 1024 ** 3
BF16, FP32 = torch.bfloat16, torch.float32  # real runs in fp32: CPU bf16 matmuls are emulated and slow


def real_workloads():
    from comfyui_streamline.core.memory.predictor import Workload, model_forward
    from comfyui_streamline.core.slicing import SliceSettings

    wan = model_fixtures.build_wan("1.3B", FP32).diffusion_model
    work = Workload((1, 16, 3, 20, 36), 2, FP32)  # 9 frames at 160x288, CFG
    yield "Wan 2.1 1.3B 9f 160x288 CFG", wan, model_forward(wan, work), [None, SliceSettings(group_ops=True)]
    del wan
    svd = model_fixtures.build_svd("full", FP32).diffusion_model
    work = Workload((4, 8, 32, 48), 2, FP32)  # 4 frames at 256x384, CFG
    yield "SVD UNet 4f 256x384 CFG", svd, model_forward(svd, work), [None, SliceSettings(group_ops=True)]
    del svd
    vae = model_fixtures.build_wan_vae("full").first_stage_model
    decode = lambda v, device: v.decode(torch.zeros(1, 16, 2, 20, 36, device=device))  # noqa: E731
    yield "Wan 2.1 VAE decode 5f 160x288", vae, decode, [None, SliceSettings()]


def accuracy_rows():
    from comfyui_streamline.core.memory.predictor import predict_peak
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker
    from comfyui_streamline.core.slicing import slicing_applied
    from comfyui_streamline.glue.planner import describe

    rows = []
    for name, module, forward, ladder in real_workloads():
        for settings in ladder:
            started = time.perf_counter()
            predicted = predict_peak(module, forward, settings, "cpu")
            predict_seconds = time.perf_counter() - started
            with torch.inference_mode(), slicing_applied(module, settings) if settings else nullcontext(), \
                    LiveStorageTracker("cpu") as measured:
                forward(module, "cpu")
            rows.append(dict(workload=name, slicing=describe(settings), predicted_gib=predicted / GIB,
                             measured_gib=measured.peak / GIB, error=predicted / measured.peak - 1,
                             predict_seconds=predict_seconds))
            print(rows[-1], flush=True)
    return rows


def speed_rows():
    """Seconds per prediction of full-size models (81 frames at 480x832, CFG)."""
    from comfyui_streamline.core.memory.predictor import Workload, model_forward, predict_peak
    from comfyui_streamline.core.slicing import SliceSettings
    from comfyui_streamline.glue.planner import describe

    rows = []
    for size in ("1.3B", "14B"):
        model = model_fixtures.build_wan(size, BF16, "meta").diffusion_model
        forward = model_forward(model, Workload((1, 16, 21, 60, 104), 2, BF16))
        for settings in (None, SliceSettings(group_ops=True)):
            started = time.perf_counter()
            peak = predict_peak(model, forward, settings, "cuda")
            rows.append(dict(workload=f"Wan 2.1 {size} 81f 480x832 CFG", slicing=describe(settings),
                             predicted_gib=peak / GIB, seconds=time.perf_counter() - started))
            print(rows[-1], flush=True)
    return rows


def main():
    import_comfyui()
    import_pack()
    machine = cpu_machine()
    accuracy = accuracy_rows()
    write_json("predictor_accuracy", {"machine": machine, "accuracy": accuracy, "speed": speed_rows()})
    plot(accuracy, machine)


def plot(rows, machine):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [textwrap.fill(r["workload"], 18) + ("\nstock" if r["slicing"].startswith("stock") else "\nsliced")
              for r in rows]
    positions = range(len(rows))
    for offset, key, name in ((-0.2, "predicted_gib", "predicted (fake tensors, weightless twin)"),
                              (0.2, "measured_gib", "measured (real tensors, live tensor storage)")):
        ax.bar([p + offset for p in positions], [r[key] for r in rows], width=0.4, label=name)
    ax.set_xticks(list(positions), labels, fontsize=7)
    ax.set_ylabel("activation peak (GiB)")
    ax.legend(fontsize=8)
    ax.set_title(f"Memory Planner predictor vs measurement ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "predictor_accuracy.png", dpi=110)


if __name__ == "__main__":
    main()
