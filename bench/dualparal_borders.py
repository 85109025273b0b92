"""DualParal's block borders: how much the video jumps from the last frame of one block to the first
frame of the next, against the frame-to-frame change inside blocks, for cache 0 and the default
cache (half a block), next to stock sampling of the whole latent in one piece (the same frame pairs).

Per adjacent latent frame pair t, t+1: change = mean |x[t+1] - x[t]| / mean |x|. The border ratio is
the mean change over the pairs that straddle a block border divided by the mean over the others;
stock's ratio at the same pairs is what an unbroken video gives (about 1). A ratio well above stock's
means visible seams. On random weights (the tiny fixture here) the video is noise-like and the ratio
says little about quality; run it on a trained model (issue 20) for that.
Writes bench/results/dualparal_borders.json."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from devkit import model_fixtures  # noqa: E402
from reporting import cpu_machine, write_json  # noqa: E402

FRAMES, HEIGHT, WIDTH = 41, 6, 8  # latent frames (161 video frames), 48x64
FRAMES_PER_BLOCK, STEPS, SEED, CFG, SHIFT = 8, 8, 3, 5.0, 8.0
CACHES = (0, FRAMES_PER_BLOCK // 2)


def frame_changes(latent: torch.Tensor) -> torch.Tensor:
    x = latent[0].detach().float()
    return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(0, 2, 3)) / x.abs().mean()


def border_ratio(changes: torch.Tensor, borders: list) -> float:
    inside = [t for t in range(len(changes)) if t not in borders]
    return float(changes[borders].mean() / changes[inside].mean())


def main():
    import_comfyui()
    import_pack()
    import comfy.model_management
    import comfy.model_patcher
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfyui_streamline.nodes.dualparal import sample

    device = comfy.model_management.get_torch_device()
    model = comfy.model_patcher.ModelPatcher(model_fixtures.build_wan("tiny", layers=4), device, device)
    model = ModelSamplingSD3().patch(model, SHIFT)[0]
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 16, model_fixtures.WAN_TEXT_DIM, generator=generator), {}]]
    negative = [[torch.randn(1, 16, model_fixtures.WAN_TEXT_DIM, generator=generator), {}]]
    latent = {"samples": torch.zeros(1, 16, FRAMES, HEIGHT, WIDTH)}
    borders = [end - 1 for end in range(FRAMES_PER_BLOCK, FRAMES, FRAMES_PER_BLOCK)]  # pair (end - 1, end)
    stock = nodes.common_ksampler(model, SEED, STEPS, CFG, "uni_pc", "simple", positive, negative, latent)[0]
    stock_changes = frame_changes(stock["samples"])
    rows = [dict(run="stock KSampler, one piece", border_ratio=border_ratio(stock_changes, borders),
                 mean_change=float(stock_changes.mean()))]
    for cache in CACHES:
        ours, _, _ = sample(model, positive, negative, latent, SEED, STEPS, CFG, "uni_pc", "simple", "cpu:1",
                            FRAMES_PER_BLOCK, cache, 1.0)
        changes = frame_changes(ours["samples"])
        rows.append(dict(run=f"DualParal, blocks of {FRAMES_PER_BLOCK}, cache {cache}",
                         border_ratio=border_ratio(changes, borders), mean_change=float(changes.mean())))
    for row in rows:
        print(row, flush=True)
    write_json("dualparal_borders", {"machine": cpu_machine(), "settings": dict(
        frames=FRAMES, height=HEIGHT, width=WIDTH, frames_per_block=FRAMES_PER_BLOCK, steps=STEPS, cfg=CFG,
        shift=SHIFT, sampler="uni_pc", model="tiny Wan 2.1 fixture, 4 layers, random weights",
        border_pairs=borders), "rows": rows})


if __name__ == "__main__":
    main()
