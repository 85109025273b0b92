"""DualParal's block borders on the Wan 2.1 sprite model trained here (scripts/train_video_models.py,
loaded through ComfyUI's UNETLoader / VAELoader): a long video sampled block-wise, with cache 0 and
the default cache (half a block), next to the same video sampled in one piece by stock KSampler.

The model was trained on 17-frame clips (5 latent frames); the long video is 81 frames (21 latent
frames), blocks of 5 latent frames, so each block is as long as a training clip. Per adjacent frame
pair t, t+1 of the decoded video: change = mean |x[t+1] - x[t]|. The border ratio is the mean change
over the pairs that straddle a block border divided by the mean over the others; stock's ratio at the
same pairs is what a video without seams gives. A ratio well above stock's means visible seams. Also
the motion measures of the whole video (devkit/video_metrics: centre smoothness, direction, sprite
survival). Writes bench/results/dualparal_borders.json and a PNG strip of the frames around the first
border (one piece above, block-wise below).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, write_json  # noqa: E402

VIDEO_FRAMES, LATENT_FRAMES_PER_BLOCK, STEPS, SEED, CFG = 81, 5, 20, 7, 5.0
CACHES = (0, 2)
PROMPTS = ("disc moving right", "square moving down", "triangle moving left")


def frame_changes(videos: torch.Tensor) -> torch.Tensor:
    """(frames - 1,) mean |x[t+1] - x[t]| over clips, channels and pixels; videos (clips, frames, 3, h, w)."""
    return (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(0, 2, 3, 4))


def border_pairs(latent_frames: int) -> list:
    """Video frame pairs (t, t+1) that straddle a latent block border: latent frame k > 0 decodes to
    video frames 4k-3 .. 4k, so the border before latent frame b lies between video frames 4b-4 and 4b-3."""
    return [4 * b - 4 for b in range(LATENT_FRAMES_PER_BLOCK, latent_frames, LATENT_FRAMES_PER_BLOCK)]


def border_ratio(changes: torch.Tensor, borders: list) -> float:
    inside = [t for t in range(len(changes)) if t not in borders]
    return float(changes[borders].mean() / changes[inside].mean())


def main():
    import_comfyui()
    import_pack()
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfyui_streamline.nodes.dualparal import sample
    from devkit.fixture_nodes import TextEmbedding
    from devkit.video_metrics import motion_measures
    from train_video_models import HEIGHT, SHIFT, TEXT_TOKENS, TEXT_WIDTH, WIDTH, load_with_comfy_nodes

    model, vae = load_with_comfy_nodes(RESULTS.parents[1] / "models" / "sprites")
    model = ModelSamplingSD3().patch(model, SHIFT)[0]
    negative = TextEmbedding().encode("", TEXT_TOKENS, TEXT_WIDTH)[0]
    latent_frames = (VIDEO_FRAMES - 1) // 4 + 1
    latent = {"samples": torch.zeros(1, 16, latent_frames, HEIGHT // 8, WIDTH // 8)}
    runs = {"stock KSampler, one piece": []} | {f"DualParal, blocks of {LATENT_FRAMES_PER_BLOCK}, cache {c}": []
                                                for c in CACHES}
    for prompt in PROMPTS:
        positive = TextEmbedding().encode(prompt, TEXT_TOKENS, TEXT_WIDTH)[0]
        stock = nodes.common_ksampler(model, SEED, STEPS, CFG, "uni_pc", "simple", positive, negative, latent)[0]
        runs["stock KSampler, one piece"].append(stock["samples"])
        for cache in CACHES:
            ours, _, _ = sample(model, positive, negative, latent, SEED, STEPS, CFG, "uni_pc", "simple", "cpu:1",
                                LATENT_FRAMES_PER_BLOCK, cache, 1.0)
            runs[f"DualParal, blocks of {LATENT_FRAMES_PER_BLOCK}, cache {cache}"].append(ours["samples"])
    borders = border_pairs(latent_frames)
    rows, videos_of = [], {}
    for name, latents in runs.items():
        videos = vae.decode(torch.cat(latents)).permute(0, 1, 4, 2, 3).clamp(0, 1).float()
        videos_of[name] = videos
        changes = frame_changes(videos)
        measures = motion_measures(videos, list(PROMPTS))
        rows.append(dict(run=name, border_ratio=border_ratio(changes, borders), mean_change=float(changes.mean()),
                         **{k: v for k, v in measures.items() if k != "per_clip"}))
        print(rows[-1], flush=True)
    write_json("dualparal_borders", {"machine": cpu_machine(), "settings": dict(
        video_frames=VIDEO_FRAMES, latent_frames=latent_frames, size=f"{WIDTH}x{HEIGHT}",
        latent_frames_per_block=LATENT_FRAMES_PER_BLOCK, steps=STEPS, cfg=CFG, shift=SHIFT, sampler="uni_pc",
        prompts=PROMPTS, model="Wan 2.1 sprite model trained here (models/sprites), 17-frame training clips",
        border_pairs=borders), "rows": rows})
    save_strip(videos_of, borders[0])


def save_strip(videos_of: dict, border: int) -> None:
    """Frames border-3 .. border+4 of the first prompt's video, one row per run."""
    from PIL import Image
    rows = [videos[0, border - 3:border + 5] for videos in videos_of.values()]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, rows * h, frames * w)
    image = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(
        RESULTS / "dualparal_borders.png")


if __name__ == "__main__":
    main()
