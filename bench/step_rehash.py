"""What Step Rehash saves: FLOPs at full size by counting.

SVD-XT's UNet (1.52 B parameters, fp16) at 14 frames of 576x1024 (latent 72x128), CFG batch 2, under
fake tensors (torch's FlopCounterMode): one refresh step (the whole UNet; keeping the deep features
adds no FLOPs) and one reusing step for each shallow block count, with the node's own patched
forwards. A sampling's FLOPs for an interval follow from which steps refresh (RehashSettings).
Writes bench/results/step_rehash.json and .png.
"""
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import cpu_machine, pyplot, write_json  # noqa: E402
from self_check_cost import count, svd_unet_call  # noqa: E402

FRAMES, HEIGHT, WIDTH = 14, 72, 128
STEPS = 25
SHALLOW = (1, 3, 6)
INTERVALS = (1, 2, 3, 4, 5)


def step_flops(shallow_blocks: tuple) -> dict:
    """FLOPs of a refresh step and of a reusing step per shallow block count."""
    from comfyui_streamline.core.patching import install, restore
    from comfyui_streamline.core.step_rehash import RehashSettings, RehashState, rehash_patches

    forward, make_inputs = svd_unet_call(FRAMES, HEIGHT, WIDTH)
    meta = model_fixtures.build_svd("full", torch.float16, "meta").diffusion_model
    reusing = {}
    with FakeTensorMode():
        unet = model_fixtures.materialize_fake(meta)
        inputs = make_inputs(True, torch.float16)
        with torch.inference_mode():
            full = count(lambda: forward(unet, inputs))
            for shallow in shallow_blocks:
                state = RehashState()
                patches = rehash_patches(unet, RehashSettings(shallow_blocks=shallow), state,
                                         lambda path: unet.get_submodule(path.rpartition(".")[0]).forward)
                installed = install(unet, {path: value for path, value in patches.items()})
                try:
                    state.begin(("call",), refresh=True)
                    forward(unet, inputs)  # keeps the deep features
                    state.begin(("call",), refresh=False)
                    reusing[shallow] = count(lambda: forward(unet, inputs))
                finally:
                    state.end()
                    restore(installed)
    return {"refresh_step": full, "reusing_step": reusing}


def sampling_fractions(flops: dict, steps: int = STEPS) -> list:
    """Per interval and shallow block count: the sampling's FLOPs over stock's (default first/last steps)."""
    from comfyui_streamline.core.step_rehash import RehashSettings

    rows = []
    for shallow, reusing in flops["reusing_step"].items():
        for interval in INTERVALS:
            settings = RehashSettings(interval=interval, shallow_blocks=shallow)
            refreshes = sum(settings.refreshes(step, steps) for step in range(steps))
            total = refreshes * flops["refresh_step"] + (steps - refreshes) * reusing
            rows.append(dict(shallow_blocks=shallow, interval=interval, refresh_steps=refreshes,
                             flops_fraction=total / (steps * flops["refresh_step"])))
    return rows


def plot(rows: list, machine: str) -> None:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for shallow in sorted({r["shallow_blocks"] for r in rows}):
        series = [r for r in rows if r["shallow_blocks"] == shallow]
        axis.plot([r["interval"] for r in series], [r["flops_fraction"] for r in series], marker="o",
                  label=f"shallow_blocks {shallow}")
    axis.set_xlabel("interval (a refresh step, then interval - 1 reusing steps)")
    axis.set_ylabel("sampling FLOPs / stock")
    axis.set_ylim(0, 1.05)
    axis.set_title(f"Step Rehash, SVD-XT 14x576x1024, {STEPS} steps (first 2 and last full)", fontsize=10)
    axis.legend()
    fig.text(0.01, 0.01, f"FLOPs counted under fake tensors ({machine})", fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "results" / "step_rehash.png", dpi=110)


def main() -> None:
    import_comfyui()
    import_pack()
    flops = step_flops(SHALLOW)
    rows = sampling_fractions(flops)
    machine = cpu_machine()
    write_json("step_rehash", {"machine": machine, "workload": f"SVD-XT UNet fp16, {FRAMES} frames, latent "
                               f"{HEIGHT}x{WIDTH}, CFG batch 2, {STEPS} steps", "step_flops": flops,
                               "sampling": rows})
    plot(rows, machine)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
