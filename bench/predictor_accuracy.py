"""The Memory Planner's dry-run predictor against measurement, in one run: predicted activation peak
(fake tensors on a weightless twin) vs the same forward with real fp32 tensors (random weights), measured
by the live-storage tracker and, independently, by the process RSS sampled at 10 Hz; plus how long a
prediction takes for full-size models. CPU (this machine); bench/slicing_gpu.py compares against
torch.cuda on a GPU. Writes bench/results/predictor_accuracy.json and .png."""
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, pyplot, write_json  # noqa: E402

GIB = 1024 ** 3
BF16, FP32 = torch.bfloat16, torch.float32  # real runs in fp32: CPU bf16 matmuls are emulated and slow


def real_workloads():
    from comfyui_streamline.core.memory_predictor import Workload, model_forward
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


def rss_peak_during(run):
    """Peak RSS above the RSS before `run`, sampled every 0.1 s by the Memory Monitor's recorder."""
    from comfyui_streamline.core.memory_recording import Recorder

    before = psutil.Process().memory_info().rss
    with Recorder("bench") as recorder:
        recorder.start_step("run", "run")
        run()
    return max(0, recorder.recording.peaks()["ram"] - before)


def accuracy_rows():
    from comfyui_streamline.core.memory_predictor import predict_peak
    from comfyui_streamline.core.memory_tracker import LiveStorageTracker
    from comfyui_streamline.core.slicing import slicing_applied

    rows = []
    for name, module, forward, ladder in real_workloads():
        for settings in ladder:
            started = time.perf_counter()
            predicted = predict_peak(module, forward, settings, "cpu")
            predict_seconds = time.perf_counter() - started
            with torch.inference_mode():
                def run():
                    with LiveStorageTracker("cpu") as tracker:
                        forward(module, "cpu")
                    run.tracked = tracker.peak
                if settings is None:
                    rss = rss_peak_during(run)
                else:
                    with slicing_applied(module, settings):
                        rss = rss_peak_during(run)
            rows.append(dict(workload=name, slicing="stock" if settings is None else "Slicer + Grouper",
                             predicted_gib=predicted / GIB, measured_tracker_gib=run.tracked / GIB,
                             measured_rss_gib=rss / GIB, error_vs_tracker=predicted / run.tracked - 1,
                             error_vs_rss=predicted / rss - 1 if rss else None, predict_seconds=predict_seconds))
            print(rows[-1], flush=True)
    return rows


def speed_rows():
    """Seconds per prediction of full-size models (81 frames at 480x832, CFG)."""
    from comfyui_streamline.core.memory_predictor import Workload, model_forward, predict_peak
    from comfyui_streamline.core.slicing import SliceSettings

    rows = []
    for size in ("1.3B", "14B"):
        model = model_fixtures.build_wan(size, BF16, "meta").diffusion_model
        forward = model_forward(model, Workload((1, 16, 21, 60, 104), 2, BF16))
        for settings in (None, SliceSettings(group_ops=True)):
            started = time.perf_counter()
            peak = predict_peak(model, forward, settings, "cuda")
            rows.append(dict(workload=f"Wan 2.1 {size} 81f 480x832 CFG", slicing="stock" if settings is None
                             else "Slicer + Grouper", predicted_gib=peak / GIB, seconds=time.perf_counter() - started))
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
    labels = [f"{r['workload']}\n{r['slicing']}" for r in rows]
    positions = range(len(rows))
    for offset, key, name in ((-0.27, "predicted_gib", "predicted (fake tensors)"),
                              (0, "measured_tracker_gib", "measured: live tensor storage"),
                              (0.27, "measured_rss_gib", "measured: process RSS (10 Hz)")):
        ax.bar([p + offset for p in positions], [r[key] for r in rows], width=0.27, label=name)
    ax.set_xticks(list(positions), labels, fontsize=7)
    ax.set_ylabel("activation peak (GiB)")
    ax.legend(fontsize=8)
    ax.set_title(f"Memory Planner predictor vs measurement ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "predictor_accuracy.png", dpi=110)


if __name__ == "__main__":
    main()
