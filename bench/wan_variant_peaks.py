"""Feature Slicer + Operator Grouper on ComfyUI's Wan variants at full size against stock, in one run:
the activation peak of one forward of Wan 2.1 1.3B text-to-video, VACE 1.3B (15 VACE blocks, its
control stream through them; block 0 copies its output, as VACE reads its input again) and Fun Camera
1.3B, at 81 frames 480x832, bf16, batch 1, under fake tensors with the live-storage tracker.
Writes bench/results/wan_variant_peaks.json and .png."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import cpu_machine, peak_bars, write_json  # noqa: E402
from stock_peaks import BF16, GIB, measure  # noqa: E402

FRAMES, HEIGHT, WIDTH = 21, 60, 104  # latent of 81 frames at 480x832


def _inputs(in_channels: int) -> tuple:
    return (torch.empty(1, in_channels, FRAMES, HEIGHT, WIDTH, dtype=BF16), torch.empty(1, dtype=BF16),
            torch.empty(1, 512, 4096, dtype=BF16))


VARIANTS = {  # name -> (build, extra forward inputs)
    "Wan 2.1 T2V 1.3B": (lambda: model_fixtures.build_wan("1.3B", BF16, "meta"), dict),
    "Wan VACE 1.3B": (lambda: model_fixtures.build_wan("1.3B", BF16, "meta", variant="2.1 vace", vace_layers=15),
                      lambda: {"vace_context": torch.empty(1, 1, 96, FRAMES, HEIGHT, WIDTH, dtype=BF16),
                               "vace_strength": [1.0]}),
    "Wan Fun Camera 1.3B": (lambda: model_fixtures.build_wan("1.3B", BF16, "meta", variant="2.1 fun camera"), dict),
}


def main():
    import_comfyui()
    import_pack()
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing

    rows = []
    for name, (build, extra) in VARIANTS.items():
        meta = build().diffusion_model
        channels = meta.patch_embedding.in_channels
        for method, prepare in (("stock", None),
                                ("Slicer + Operator Grouper (auto)",
                                 lambda m: apply_slicing(m, SliceSettings(group_ops=True)))):
            peak, weights = measure(meta, lambda m: m(*_inputs(channels), **extra()), LiveStorageTracker, prepare)
            rows.append(dict(model=name, method=method, peak_gib=peak / GIB, weights_gib=weights / GIB))
            print(f"{name} {method}: {peak / GIB:.3f} GiB")
    for row in rows:
        stock = next(r for r in rows if r["model"] == row["model"] and r["method"] == "stock")
        row["peak_vs_stock"] = row["peak_gib"] / stock["peak_gib"]
    machine = cpu_machine() + ", fake tensors"
    write_json("wan_variant_peaks", {"machine": machine, "rows": rows})
    peak_bars("wan_variant_peaks", [f"{r['model']}: {r['method']}" for r in rows], [r["peak_gib"] for r in rows],
              f"Wan variants at 81f 480x832 bf16, batch 1: sliced vs stock\n({machine})",
              "activation peak of one forward (GiB)")


if __name__ == "__main__":
    main()
