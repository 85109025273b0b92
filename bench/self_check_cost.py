"""What the self-check (issue 17) costs: the probes every patched block runs on its first call (the
host's stock forward and a sliced forward, both on a probe cut from the real call), as a fraction of
one sampling step (a whole diffusion model forward, CFG batch 2) or one VAE decode, stock.

FLOPs at full size, under fake tensors (torch's FlopCounterMode; the checkers are told to probe fake
tensors, which they otherwise skip): the first sliced call (sliced + probes) minus a later one
(sliced only), against the stock forward. CPU time at reduced sizes with real tensors (full-size
layer widths, random weights; each stock call timed twice, each probe 3 times, the least counting): the
probes' wall time against a stock call on the same input, and full-size estimates from it (`estimated`).
Writes bench/results/self_check_cost.json and .png. `--replot` recomputes the estimates and the chart
from the JSON without measuring."""
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, flop_counter, pyplot, write_json  # noqa: E402

TARGET = 0.02


def _filler(fake: bool, dtype=torch.float32):
    """torch.empty under fake tensors (their values are never read), seeded values otherwise."""
    generator = torch.Generator().manual_seed(0)
    return ((lambda *shape: torch.empty(*shape, dtype=dtype)) if fake
            else (lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)))


def svd_unet_call(frames, height, width):
    batch = 2 * frames  # classifier-free guidance: cond and uncond in one batch, as ComfyUI runs SVD

    def make(fake, dtype):
        fill = _filler(fake, dtype)
        return ((fill(batch, 8, height, width), torch.full((batch,), 0.5, dtype=dtype)),
                dict(context=fill(batch, 1, 1024), y=fill(batch, 768), num_video_frames=frames,
                     image_only_indicator=torch.zeros(2, frames, dtype=dtype)))
    return lambda module, inputs: module(*inputs[0], **inputs[1]), make


def wan_call(latent_frames, height, width, batch):
    def make(fake, dtype):
        fill = _filler(fake, dtype)
        return (fill(batch, 16, latent_frames, height, width), torch.full((batch,), 0.5, dtype=dtype),
                fill(batch, 512, 4096))
    return lambda module, inputs: module(*inputs), make


def decode_call(shape):
    return (lambda module, z: module.decode(z)), (lambda fake, dtype: _filler(fake, dtype)(*shape))


def settings_of(group_ops=True, strips=0) -> dict:
    """The slicing measured: Feature Slicer + Operator Grouper / VAE Slicer, auto counts."""
    return dict(strip_chunks=strips, group_ops=group_ops)


REPEATS = 3  # each probe is timed this many times, each stock call twice (the least counts)


@dataclass
class Workload:
    name: str
    meta: Callable  # () -> the full-size module on the meta device
    call: tuple  # (forward(module, inputs), make_inputs(fake, dtype)) at full size
    real: Callable  # () -> the module CPU time is measured on (real, random weights)
    real_meta: Callable  # () -> that module on the meta device (for its FLOPs)
    real_call: tuple
    real_size: str
    settings: dict


WORKLOADS = [
    Workload("Wan 2.1 1.3B DiT step (81f 480x832, CFG batch 2)",
             lambda: model_fixtures.build_wan("1.3B", torch.bfloat16, "meta").diffusion_model,
             wan_call(21, 60, 104, 2),
             lambda: model_fixtures.build_wan("1.3B", layers=1).diffusion_model,
             lambda: model_fixtures.build_wan("1.3B", torch.bfloat16, "meta", layers=1).diffusion_model,
             wan_call(9, 60, 104, 2), "1 of the 30 blocks (width 1536), 33f 480x832 = 14,040 tokens, CFG batch 2",
             settings_of()),
    Workload("Wan 2.1 VAE decode (81f 480x832)",
             lambda: model_fixtures.build_wan_vae("full").first_stage_model.to("meta", torch.bfloat16),
             decode_call((1, 16, 21, 60, 104)),
             lambda: model_fixtures.build_wan_vae("full").first_stage_model,
             lambda: model_fixtures.build_wan_vae("full").first_stage_model.to("meta", torch.bfloat16),
             decode_call((1, 16, 5, 30, 52)), "full VAE (dim 96), 17f 240x416", settings_of()),
    Workload("SVD UNet step (14f 576x1024, CFG batch 2)",
             lambda: model_fixtures.build_svd("full", torch.float16, "meta").diffusion_model,
             svd_unet_call(14, 72, 128),
             lambda: model_fixtures.build_svd("full").diffusion_model,
             lambda: model_fixtures.build_svd("full", torch.float16, "meta").diffusion_model,
             svd_unet_call(14, 24, 40), "full UNet (1.52 B), 14f 192x320, CFG batch 2", settings_of()),
    Workload("SVD temporal VAE decode (14f 576x1024)",
             lambda: model_fixtures.build_svd_vae().first_stage_model.to("meta", torch.float16),
             decode_call((14, 4, 72, 128)),
             lambda: model_fixtures.build_svd_vae().first_stage_model,
             lambda: model_fixtures.build_svd_vae().first_stage_model.to("meta", torch.float16),
             decode_call((14, 4, 24, 40)), "full VAE, 14f 192x320", settings_of()),
]


def count(function) -> int:
    with flop_counter() as counter:
        function()
    return counter.get_total_flops()


@contextmanager
def probing_fake_tensors():
    """Checkers probe fake tensors too, running stock and the probe's sliced forward without comparing
    them (the product never probes fake tensors), so the probes' FLOPs can be counted at full size."""
    from comfyui_streamline.core.slicing.self_check import checker
    unreal, compare = checker._unreal, checker.compare
    checker._unreal = lambda *args: False
    checker.compare = lambda *args, **kwargs: (True, "fake tensors: counted, not compared")
    try:
        yield
    finally:
        checker._unreal, checker.compare = unreal, compare


def flops(build, call, settings) -> dict:
    """Stock FLOPs and the probes' FLOPs (first sliced call minus a later one), under fake tensors."""
    from comfyui_streamline.core.slicing import apply_slicing, remove_slicing, self_check

    forward, make_inputs = call
    meta = build()
    with FakeTensorMode():
        module = model_fixtures.materialize_fake(meta)
        inputs = make_inputs(True, next(module.parameters()).dtype)
        with torch.inference_mode():
            stock = count(lambda: forward(module, inputs))
            apply_slicing(module, settings)
            since = self_check.mark()
            with probing_fake_tensors():
                first = count(lambda: forward(module, inputs))
            later = count(lambda: forward(module, inputs))
            remove_slicing(module)
    return dict(stock_flops=stock, probe_flops=first - later, sliced_flops=later,
                probes=len(probes_run(self_check, since)), flops_fraction=(first - later) / stock)


def probes_run(self_check, since) -> list:
    """The results of probes that ran (not those of blocks checked within their whole model's probe)."""
    return [r for r in self_check.results(since) if r.seconds > 0]


def cpu_time(build, call, settings) -> dict:
    """Seconds of a stock call and of the probes of the first sliced call (the least of 2 and of
    REPEATS runs), real tensors."""
    from comfyui_streamline.core.slicing import apply_slicing, remove_slicing, self_check

    forward, make_inputs = call
    module = build()
    inputs = make_inputs(False, torch.float32)
    probe_outputs, timings = self_check.Checker.probe_outputs, []

    def timed(checker, args, kwargs, members=()):
        best = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            outputs = probe_outputs(checker, args, kwargs, members)
            best = min(best, time.perf_counter() - started)
        timings.append(best)
        return outputs
    with torch.inference_mode():
        stock_seconds = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            forward(module, inputs)
            stock_seconds = min(stock_seconds, time.perf_counter() - started)
        apply_slicing(module, settings)
        since = self_check.mark()
        self_check.Checker.probe_outputs = timed
        try:
            forward(module, inputs)
        finally:
            self_check.Checker.probe_outputs = probe_outputs
            remove_slicing(module)
    results = self_check.results(since)
    assert results and all(r.outcome == self_check.PASSED for r in results), [r.message() for r in results]
    return dict(stock_seconds=stock_seconds, probe_seconds=sum(timings), probes=len(probes_run(self_check, since)),
                cpu_time_fraction=sum(timings) / stock_seconds)


def estimated(row: dict) -> dict:
    """Full-size CPU-time estimates from a row's measurements: a stock call's time grows with its FLOPs
    (from the measured size to full size); the probes' time either stays as measured per probe (they are
    bound by weights and per-op overhead: a probe on a 2x2 or an 8x8 crop of the SVD UNet takes the same
    time), or, pessimistically, grows with the probes' FLOPs."""
    full, measured = row["full_size"], row["measured_size"]
    stock_seconds = measured["stock_seconds"] * full["stock_flops"] / measured["stock_flops"]
    per_probe = measured["probe_seconds"] / measured["probes"]
    row["cpu_time_fraction_full_size"] = per_probe * full["probes"] / stock_seconds
    row["cpu_time_fraction_full_size_high"] = (measured["probe_seconds"] * full["probe_flops"]
                                               / measured["probe_flops"] / stock_seconds)
    return row


def main():
    import_comfyui()
    import_pack()
    from comfyui_streamline.core.slicing import SliceSettings

    machine = cpu_machine()
    rows = []
    for workload in WORKLOADS:
        settings = SliceSettings(**workload.settings)
        started = time.monotonic()
        full = flops(workload.meta, workload.call, settings)
        print(f"{workload.name}: probe FLOPs {full['flops_fraction']:.3%} of stock ({full['probes']} probes, "
              f"{time.monotonic() - started:.0f} s)", flush=True)
        started = time.monotonic()
        measured = {**flops(workload.real_meta, workload.real_call, settings),
                    **cpu_time(workload.real, workload.real_call, settings)}
        rows.append(estimated(dict(workload=workload.name, settings=workload.settings, full_size=full,
                                   measured_size=dict(size=workload.real_size, **measured))))
        row = rows[-1]
        print(f"  at {workload.real_size}: probes {measured['probe_seconds']:.2f} s of a "
              f"{measured['stock_seconds']:.1f} s stock call = {measured['cpu_time_fraction']:.2%} (FLOPs "
              f"{measured['flops_fraction']:.2%}); full-size CPU-time estimate {row['cpu_time_fraction_full_size']:.2%}"
              f" ({row['cpu_time_fraction_full_size_high']:.2%} with probe time growing with FLOPs) "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    write_json("self_check_cost", {"machine": machine, "target_fraction": TARGET, "rows": rows})
    plot(rows, machine)


def plot(rows, machine):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    labels = [r["workload"] for r in rows][::-1]
    series = [("FLOPs, full size (fake tensors)", lambda r: r["full_size"]["flops_fraction"], "#4c72b0"),
              ("CPU time, full size (estimate; line: if probe time grew with its FLOPs)",
               lambda r: r["cpu_time_fraction_full_size"], "#8172b2"),
              ("CPU time, measured at a reduced size (real tensors)", lambda r: r["measured_size"]["cpu_time_fraction"],
               "#55a868")]
    height = 0.8 / len(series)
    for i, (label, value, color) in enumerate(series):
        ax.barh([p + (1 - i) * height for p in range(len(labels))], [100 * value(r) for r in rows][::-1],
                height=height, color=color, label=label)
        if i == 1:
            for p, r in enumerate(rows[::-1]):
                ax.plot([100 * r["cpu_time_fraction_full_size"], 100 * r["cpu_time_fraction_full_size_high"]],
                        [p, p], color=color, linewidth=1)
    ax.axvline(100 * TARGET, color="#c44e52", linestyle="--", label=f"target {TARGET:.0%}")
    ax.set_yticks(list(range(len(labels))))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("self-check probes, % of one stock step / decode (once per patched model)")
    ax.legend(fontsize=7)
    ax.set_title(f"Cost of the self-check probes\n({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "self_check_cost.png", dpi=110)


if __name__ == "__main__":
    if "--replot" in sys.argv:
        data = json.loads((RESULTS / "self_check_cost.json").read_text())
        data["rows"] = [estimated(row) for row in data["rows"]]
        write_json("self_check_cost", data)
        plot(data["rows"], data["machine"])
    else:
        main()
