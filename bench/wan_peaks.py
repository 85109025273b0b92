"""Feature Slicer / Operator Grouper on ComfyUI's Wan 2.1 DiT against stock ComfyUI 0.3.75 and
against a peer-style feed-forward chunk patch (KJNodes' WanChunkFeedForward idea: only the FFN runs
in token chunks), in one run. Activation peaks of full-size models at 480x832 bf16 under fake
tensors with the live-storage tracker (SDPA attention); the stock Wan VAE decode peak for
comparison; CPU time and output difference on the tiny Wan with real tensors.
Writes bench/results/wan_peaks.json and .png."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from devkit import model_fixtures  # noqa: E402
from reporting import RESULTS, cpu_machine, pyplot, write_json  # noqa: E402
from stock_peaks import BF16, GIB, measure, wan  # noqa: E402

WORKLOADS = [("1.3B", 81, 1), ("1.3B", 81, 2), ("1.3B", 321, 1), ("1.3B", 321, 2), ("14B", 81, 1)]
VAE_SIZES = {"480x832": (60, 104), "720x1280": (90, 160)}
FFN_CHUNK_TOKENS = 1024


def ffn_chunk_patch(model):
    """The peer baseline: each block's FFN over token chunks, written into a preallocated output."""
    def chunked(ffn):
        def forward(x):
            out = None
            for start in range(0, x.shape[1], FFN_CHUNK_TOKENS):
                y = type(ffn).forward(ffn, x[:, start:start + FFN_CHUNK_TOKENS])
                out = y.new_empty((*x.shape[:2], y.shape[2])) if out is None else out
                out[:, start:start + FFN_CHUNK_TOKENS] = y
            return out
        return forward
    for block in model.blocks:
        block.ffn.forward = chunked(block.ffn)


def methods():
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing
    return {"stock": None, "FFN chunks only (peer-style)": ffn_chunk_patch,
            "Feature Slicer (auto)": lambda m: apply_slicing(m, SliceSettings()),
            "Slicer + Operator Grouper (auto)": lambda m: apply_slicing(m, SliceSettings(group_ops=True))}


def vae_rows(tracker_cls):
    """Stock ComfyUI Wan 2.1 VAE decode of 81 frames (21 latent frames, one at a time, causal cache)."""
    rows = []
    for name, (height, width) in VAE_SIZES.items():
        vae = model_fixtures.build_wan_vae("full").first_stage_model.to("meta", BF16)
        peak, weights = measure(vae, lambda v: v.decode(torch.empty(1, 16, 21, height, width, dtype=BF16)), tracker_cls)
        rows.append(dict(part=f"Wan VAE decode 81f {name}", method="stock", peak_gib=peak / GIB, weights_gib=weights / GIB))
        print(f"Wan VAE decode 81f {name} stock: {peak / GIB:.2f} GiB")
    return rows


def latency_rows():
    """CPU time and output difference of the sliced tiny Wan against stock, real tensors."""
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing

    model = model_fixtures.build_wan("tiny").diffusion_model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 21, 30, 52, generator=generator)  # 81 frames at 240x416: 8,190 tokens
    context = torch.randn(1, 64, model_fixtures.WAN_TEXT_DIM, generator=generator)
    rows = []
    with torch.inference_mode():
        run = lambda: model(x, torch.tensor([0.5]), context)  # noqa: E731
        run()
        started = time.perf_counter()
        reference = run()
        stock_seconds = time.perf_counter() - started
        for method, settings in [("Feature Slicer (auto)", SliceSettings()),
                                 ("Slicer + Operator Grouper (auto)", SliceSettings(group_ops=True))]:
            apply_slicing(model, settings)
            run()
            started = time.perf_counter()
            output = run()
            seconds = time.perf_counter() - started
            remove_slicing(model)
            rows.append(dict(part="tiny Wan 81f 240x416", method=method, cpu_time_ratio=seconds / stock_seconds,
                             max_abs_diff=((output - reference).abs().max() / reference.abs().max()).item()))
            print(rows[-1])
    return rows


def main():
    import_comfyui()
    import_pack()
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    rows = []
    for size, frames, batch in WORKLOADS:
        for method, prepare in methods().items():
            peak, weights = wan(size, frames, batch, LiveStorageTracker, prepare)
            rows.append(dict(model=f"Wan 2.1 {size}", frames=frames, batch=batch, method=method,
                             peak_gib=peak / GIB, weights_gib=weights / GIB))
            print(f"Wan 2.1 {size} {frames}f batch {batch} {method}: {peak / GIB:.2f} GiB")
    machine = cpu_machine()
    write_json("wan_peaks", {"machine": machine, "rows": rows, "vae": vae_rows(LiveStorageTracker),
                             "latency": latency_rows()})
    plot(rows, machine)


def plot(rows, machine):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(10, 6))
    labels = [f"{r['model']} {r['frames']}f b{r['batch']}: {r['method']}" for r in rows][::-1]
    ax.barh(labels, [r["peak_gib"] for r in rows][::-1],
            color=["#c44e52" if "stock" in label else "#8172b2" if "peer" in label else "#4c72b0" for label in labels])
    ax.set_xlabel("activation peak (GiB)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"Wan 2.1 at 480x832 bf16: Streamline slicing vs stock ComfyUI 0.3.75\n(fake tensors; {machine})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "wan_peaks.png", dpi=110)


if __name__ == "__main__":
    main()
