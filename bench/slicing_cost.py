"""What slicing adds to the work of a forward (issue 21): FLOPs of one diffusion model forward at full
size, stock against Feature Slicer + Operator Grouper at auto counts, counted under fake tensors
(torch's FlopCounterMode; the self-check's probes left out: a later call than the first). Writes
bench/results/slicing_cost.json.

Not yet here (issue 21): weight bytes moved per forward under partial loading and CPU time on 1 and 2
threads.

    .venv/bin/python bench/slicing_cost.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import cpu_machine, write_json  # noqa: E402
from self_check_cost import flops, settings_of, svd_unet_call, wan_call  # noqa: E402

WORKLOADS = {  # name -> (full-size model on the meta device, (forward, inputs))
    "Wan 2.1 1.3B DiT, 81 frames 480x832, CFG batch 2": (
        lambda: model_fixtures.build_wan("1.3B", torch.bfloat16, "meta").diffusion_model, wan_call(21, 60, 104, 2)),
    "Wan 2.1 14B DiT, 81 frames 480x832, batch 1": (
        lambda: model_fixtures.build_wan("14B", torch.bfloat16, "meta").diffusion_model, wan_call(21, 60, 104, 1)),
    "SVD-XT UNet, 14 frames 576x1024, CFG batch 2": (
        lambda: model_fixtures.build_svd("full", torch.float16, "meta").diffusion_model, svd_unet_call(14, 72, 128)),
}


def main() -> None:
    import_comfyui()
    import_pack()
    from comfyui_streamline.core.slicing import SliceSettings

    rows = []
    for name, (build, call) in WORKLOADS.items():
        counted = flops(build, call, SliceSettings(**settings_of()))
        rows.append(dict(workload=name, stock_flops=counted["stock_flops"], sliced_flops=counted["sliced_flops"],
                         ratio=counted["sliced_flops"] / counted["stock_flops"]))
        print(rows[-1], flush=True)
    write_json("slicing_cost", {"machine": cpu_machine(), "slicing": "Feature Slicer + Operator Grouper, auto counts",
                                "rows": rows})


if __name__ == "__main__":
    main()
