"""What slicing costs (issue 21): the work one diffusion model forward does, stock against Feature
Slicer + Operator Grouper at auto counts and at the finest level the Memory Planner picks (8x auto).

- FLOPs and weight bytes fetched, at full size under fake tensors: torch's FlopCounterMode, and the
  bytes of every weight ComfyUI's cast_bias_weight fetches with every layer offloaded (as its
  low-VRAM loading leaves a layer that does not fit: `comfy_cast_weights` set). The first sliced call
  (it runs the self-check's probes) is left out. Wan's blocks are all alike, so Wan is counted with 1
  and 2 blocks and extrapolated to its 30 / 40 (exact: F(L) = F(1) + (L - 1) (F(2) - F(1))).
- Peak accelerator memory with every layer offloaded (weights in host memory, compute on the meta
  device as a stand-in accelerator; LiveStorageTracker, fake tensors, 2 of the model's blocks): stock,
  sliced with each layer fetching at every call (as before issue 21), and sliced fetching once.
- CPU time with real tensors at reduced sizes (full-size layer widths, random weights), on 1 and 2
  threads, the least of 3 calls, as a ratio to stock in the same run.

Writes bench/results/slicing_cost.json and .png.

    .venv/bin/python bench/slicing_cost.py [--part counts|peak|time]
"""
import argparse
import json
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
from self_check_cost import svd_unet_call, wan_call  # noqa: E402

WAN_LAYERS = {"1.3B": 30, "14B": 40}
COUNTED = [  # name, model, latent frames, (height, width), CFG batch
    ("Wan 2.1 1.3B, 81 frames 480x832", "1.3B", 21, (60, 104)),
    ("Wan 2.1 1.3B, 321 frames 480x832", "1.3B", 81, (60, 104)),
    ("Wan 2.1 14B, 81 frames 480x832", "14B", 21, (60, 104)),
    ("Wan 2.1 14B, 321 frames 480x832", "14B", 81, (60, 104)),
    ("SVD-XT, 14 frames 576x1024", "svd", 14, (72, 128)),
]
TIMED = [  # reduced sizes, real tensors
    ("Wan 2.1 1.3B width (1 block), 17 frames 480x832", "1.3B", 5, (60, 104)),
    ("SVD-XT, 14 frames 128x192", "svd", 14, (16, 24)),
]


def levels(model, work) -> dict:
    """stock, auto and the finest level of the Memory Planner's ladder for `work`."""
    from comfyui_streamline.core.memory.predictor import slicing_ladder
    ladder = slicing_ladder(model, work)
    return {"stock": None, "auto": ladder[2], "finest": ladder[-1]}


def workload(kind, frames, size):
    from comfyui_streamline.core.memory.predictor import Workload
    shape = (frames, 8, *size) if kind == "svd" else (1, 16, frames, *size)
    return Workload(shape, 2, torch.float32), (svd_unet_call(frames, *size) if kind == "svd"
                                               else wan_call(frames, *size, 2))


def full_size_dtype(kind):
    return torch.float16 if kind == "svd" else torch.bfloat16


def build(kind, layers=None, device="meta", dtype=None):
    if kind == "svd":
        return model_fixtures.build_svd("full", dtype or full_size_dtype(kind), device).diffusion_model
    return model_fixtures.build_wan(kind, dtype or full_size_dtype(kind), device, layers=layers).diffusion_model


def counts(meta, call, settings, dtype) -> dict:
    """FLOPs and weight bytes fetched by a forward with every layer offloaded, under fake tensors."""
    from comfyui_streamline.core.slicing import apply_slicing

    forward, make_inputs = call
    with FakeTensorMode():
        module = model_fixtures.materialize_fake(meta)
        model_fixtures.offload_every_layer(module)
        inputs = make_inputs(True, dtype)
        with torch.inference_mode():
            if settings is not None:
                apply_slicing(module, settings)
                forward(module, inputs)  # the self-check's probes run in the first call
            with model_fixtures.counted_weight_fetches() as fetched, flop_counter() as counter:
                forward(module, inputs)
    return dict(flops=counter.get_total_flops(), weight_bytes=sum(fetched.values()))


def counted_rows() -> list:
    rows = []
    for name, kind, frames, size in COUNTED:
        work, call = workload(kind, frames, size)
        metas = [build(kind)] if kind == "svd" else [build(kind, layers) for layers in (1, 2)]
        for level, settings in levels(metas[0], work).items():
            measured = [counts(meta, call, settings, full_size_dtype(kind)) for meta in metas]
            if kind != "svd":  # extrapolated from 1 and 2 alike blocks
                measured = {key: measured[0][key] + (WAN_LAYERS[kind] - 1) * (measured[1][key] - measured[0][key])
                            for key in measured[0]}
            else:
                measured = measured[0]
            rows.append(dict(workload=name, level=level, settings=repr(settings), **measured))
            print(rows[-1], flush=True)
    for row in rows:
        stock = next(r for r in rows if r["workload"] == row["workload"] and r["level"] == "stock")
        row.update(flops_ratio=row["flops"] / stock["flops"], bytes_ratio=row["weight_bytes"] / stock["weight_bytes"])
    return rows


PEAKED = COUNTED[0], COUNTED[2]
ACCELERATOR = "meta"


def offloaded_peak(meta, call, settings, dtype) -> int:
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker
    from comfyui_streamline.core.slicing import apply_slicing

    forward, make_inputs = call
    with FakeTensorMode():
        module = model_fixtures.materialize_fake(meta, "cpu")
        model_fixtures.offload_every_layer(module)
        inputs = [value.to(ACCELERATOR) for value in make_inputs(True, dtype)]
        with torch.inference_mode():
            if settings is not None:
                apply_slicing(module, settings)
                forward(module, inputs)
            with LiveStorageTracker(ACCELERATOR) as tracker:
                forward(module, inputs)
    return tracker.peak


def peak_rows() -> list:
    from comfyui_streamline.core.slicing import SliceSettings, fetched_weights

    rows = []
    fetches_weights = fetched_weights.fetches_weights
    for name, kind, frames, size in PEAKED:
        work, call = workload(kind, frames, size)
        meta = build(kind, layers=2)
        for label, settings, fetch_once in (("stock", None, True), ("auto, fetched at every call", SliceSettings(group_ops=True), False),
                                            ("auto, fetched once", SliceSettings(group_ops=True), True)):
            fetched_weights.fetches_weights = fetches_weights if fetch_once else (lambda layer: False)
            try:
                peak = offloaded_peak(meta, call, settings, full_size_dtype(kind))
            finally:
                fetched_weights.fetches_weights = fetches_weights
            rows.append(dict(workload=name, level=label, peak_gib=peak / 2 ** 30))
            print(rows[-1], flush=True)
    return rows


def timed_rows() -> list:
    from comfyui_streamline.core.slicing import apply_slicing, remove_slicing

    rows = []
    for name, kind, frames, size in TIMED:
        work, (forward, make_inputs) = workload(kind, frames, size)
        module = build(kind, layers=1, device="cpu", dtype=torch.float32)
        inputs = make_inputs(False, torch.float32)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seconds = {}
            for level, settings in levels(module, work).items():
                if settings is not None:
                    apply_slicing(module, settings)
                with torch.inference_mode():
                    forward(module, inputs)  # warm-up (and the self-check's probes)
                    calls = []
                    for _ in range(3):
                        start = time.perf_counter()
                        forward(module, inputs)
                        calls.append(time.perf_counter() - start)
                remove_slicing(module)
                seconds[level] = min(calls)
                rows.append(dict(workload=name, threads=threads, level=level, settings=repr(settings),
                                 seconds=seconds[level], ratio=seconds[level] / seconds["stock"]))
                print(rows[-1], flush=True)
        del module
    return rows


def plot(data: dict) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    counted = data.get("counts", [])
    names = list(dict.fromkeys(r["workload"] for r in counted))
    for offset, level in enumerate(("auto", "finest")):
        values = [next(r for r in counted if r["workload"] == n and r["level"] == level) for n in names]
        positions = [i + (offset - 0.5) * 0.35 for i in range(len(names))]
        axes[0].bar([p - 0.08 for p in positions], [v["flops_ratio"] for v in values], 0.16, label=f"FLOPs, {level}")
        axes[0].bar([p + 0.08 for p in positions], [v["bytes_ratio"] for v in values], 0.16,
                    label=f"weight bytes fetched, {level}")
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=7)
    axes[0].set_ylabel("sliced / stock (full size, every layer offloaded)")
    axes[0].legend(fontsize=7)
    timed = data.get("time", [])
    labels = [f"{r['workload'].split(',')[0]}\n{r['threads']} thread(s), {r['level']}" for r in timed
              if r["level"] != "stock"]
    axes[1].bar(range(len(labels)), [r["ratio"] for r in timed if r["level"] != "stock"])
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_xticks(range(len(labels)), labels, fontsize=6, rotation=60, ha="right")
    axes[1].set_ylabel("CPU time, sliced / stock")
    figure.suptitle(f"What slicing costs: {data['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(RESULTS / "slicing_cost.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("counts", "peak", "time", "all"), default="all")
    part = parser.parse_args().part
    import_comfyui()
    import_pack()
    path = RESULTS / "slicing_cost.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if part in ("counts", "all"):
        data["counts"] = counted_rows()
    if part in ("peak", "all"):
        data["peak"] = peak_rows()
    if part in ("time", "all"):
        data["time"] = timed_rows()
    data["machine"] = cpu_machine()
    write_json("slicing_cost", data)
    plot(data)


if __name__ == "__main__":
    main()
