"""DualParal's block borders: how much the video jumps from the last frame of one block to the first
frame of the next, against the frame-to-frame change inside blocks, for cache 0 and the default
cache (half a block), next to stock sampling of the whole latent in one piece (the same frame pairs).

Per adjacent latent frame pair t, t+1: change = mean |x[t+1] - x[t]| / mean |x|. The border ratio is
the mean change over the pairs that straddle a block border divided by the mean over the others;
stock's ratio at the same pairs is what an unbroken video gives (about 1). A ratio well above stock's
means visible seams.

`fixture` (default): the tiny random-weight Wan fixture, on latents (noise-like video: the ratio says
little about quality). Writes bench/results/dualparal_borders.json.

`trained`: the Wan 2.1 sprite model trained here (models/sprites, loaded through ComfyUI's UNETLoader /
VAELoader), trained on 17-frame clips (5 latent frames): an 81-frame video (21 latent frames) per
prompt in blocks of 5 latent frames, each block as long as a training clip. Changes are measured on the
decoded video (mean |x[t+1] - x[t]| per frame pair; the border before latent frame b lies between video
frames 4b-4 and 4b-3), and so is how far the sprite's centre moves over 4 frames across a border
(frame 4b-4 to 4b, the border's latent frame) and over 4 frames inside blocks (~10 px for a steady
sprite; one that starts over at a border jumps ~30 px there), with the motion measures
(devkit/video_metrics) of the first 17 frames, where the sprite is still in the picture. Writes
bench/results/dualparal_borders_trained.json and a PNG strip of every second frame up to two blocks
past the first border, three rows per prompt (stock in one piece, cache 0, cache 2).

    .venv/bin/python bench/dualparal_borders.py [fixture] [trained]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from devkit import model_fixtures  # noqa: E402
from reporting import RESULTS, cpu_machine, write_json  # noqa: E402

FRAMES, HEIGHT, WIDTH = 41, 6, 8  # latent frames (161 video frames), 48x64
FRAMES_PER_BLOCK, STEPS, SEED, CFG, SHIFT = 8, 8, 3, 5.0, 8.0
CACHES = (0, FRAMES_PER_BLOCK // 2)


def frame_changes(latent: torch.Tensor) -> torch.Tensor:
    x = latent[0].detach().float()
    return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(0, 2, 3)) / x.abs().mean()


def border_ratio(changes: torch.Tensor, borders: list) -> float:
    inside = [t for t in range(len(changes)) if t not in borders]
    return float(changes[borders].mean() / changes[inside].mean())


def fixture():
    import comfy.model_management
    import comfy.model_patcher
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfyui_streamline.glue.dualparal import sample

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


VIDEO_FRAMES, LATENT_FRAMES_PER_BLOCK, TRAINED_STEPS, TRAINED_SEED = 81, 5, 20, 7
TRAINED_CACHES = (0, 2)
TRAINED_PROMPTS = ("disc moving right", "square moving down", "triangle moving left")


def video_changes(videos: torch.Tensor) -> torch.Tensor:
    """(frames - 1,) mean |x[t+1] - x[t]| over clips, channels and pixels; videos (clips, frames, 3, h, w)."""
    return (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(0, 2, 3, 4))


def sprite_moves(videos: torch.Tensor, span: int) -> torch.Tensor:
    """(clips, frames - span) how far the sprite's centre moves from frame t to t + span, px (NaN where a
    frame has no sprite; devkit/video_metrics.centre_tracks)."""
    from devkit.video_metrics import centre_tracks
    centres, _ = centre_tracks(videos)
    return (centres[:, span:] - centres[:, :-span]).norm(dim=-1)


@torch.no_grad()
def trained():
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfyui_streamline.glue.dualparal import sample
    from devkit.fixture_nodes import TextEmbedding
    from devkit.sprite_workflows import CFG, FRAMES, HEIGHT, SHIFT as SPRITE_SHIFT, SPRITE_MODELS_DIR, TEXT_TOKENS
    from devkit.sprite_workflows import TEXT_WIDTH, WIDTH
    from devkit.video_metrics import motion_measures
    sys.path.insert(0, str(RESULTS.parents[1] / "scripts"))
    from train_video_models import load_with_comfy_nodes

    model, vae = load_with_comfy_nodes(SPRITE_MODELS_DIR)
    model = ModelSamplingSD3().patch(model, SPRITE_SHIFT)[0]
    negative = TextEmbedding().encode("", TEXT_TOKENS, TEXT_WIDTH)[0]
    latent_frames = (VIDEO_FRAMES - 1) // 4 + 1
    latent = {"samples": torch.zeros(1, 16, latent_frames, HEIGHT // 8, WIDTH // 8)}
    runs = {"stock KSampler, one piece": []} | {
        f"DualParal, blocks of {LATENT_FRAMES_PER_BLOCK}, cache {c}": [] for c in TRAINED_CACHES}
    for prompt in TRAINED_PROMPTS:
        positive = TextEmbedding().encode(prompt, TEXT_TOKENS, TEXT_WIDTH)[0]
        stock = nodes.common_ksampler(model, TRAINED_SEED, TRAINED_STEPS, CFG, "uni_pc", "simple", positive,
                                      negative, latent)[0]
        runs["stock KSampler, one piece"].append(stock["samples"])
        for cache in TRAINED_CACHES:
            ours, _, _ = sample(model, positive, negative, latent, TRAINED_SEED, TRAINED_STEPS, CFG, "uni_pc",
                                "simple", "cpu:1", LATENT_FRAMES_PER_BLOCK, cache, 1.0)
            runs[f"DualParal, blocks of {LATENT_FRAMES_PER_BLOCK}, cache {cache}"].append(ours["samples"])
    borders = [4 * b - 4 for b in range(LATENT_FRAMES_PER_BLOCK, latent_frames, LATENT_FRAMES_PER_BLOCK)]
    rows, videos_of = [], {}
    for name, latents in runs.items():
        videos = vae.decode(torch.cat(latents)).permute(0, 1, 4, 2, 3).clamp(0, 1).float()
        videos_of[name] = videos
        changes = video_changes(videos)
        measures = motion_measures(videos[:, :FRAMES], list(TRAINED_PROMPTS))
        # over the 4 frames a border's latent frame decodes to: from the frame before the border (4b - 4)
        # to the last of that latent frame (4b), against 4-frame spans inside blocks
        moves = sprite_moves(videos, 4)
        inside = [t for t in range(moves.shape[1]) if not any(t <= b < t + 4 for b in borders)]
        rows.append(dict(run=name, border_ratio=border_ratio(changes, borders), mean_change=float(changes.mean()),
                         sprite_move_4_frames_at_borders_px=float(moves[:, borders].nanmean()),
                         sprite_move_4_frames_inside_px=float(moves[:, inside].nanmean()),
                         **{f"first_{FRAMES}_frames_{k}": v for k, v in measures.items() if k != "per_clip"}))
        print(rows[-1], flush=True)
    machine = cpu_machine()
    write_json("dualparal_borders_trained", {"machine": machine, "settings": dict(
        video_frames=VIDEO_FRAMES, latent_frames=latent_frames, size=f"{WIDTH}x{HEIGHT}",
        latent_frames_per_block=LATENT_FRAMES_PER_BLOCK, steps=TRAINED_STEPS, cfg=CFG, shift=SPRITE_SHIFT,
        sampler="uni_pc", prompts=TRAINED_PROMPTS, border_pairs=borders,
        model="Wan 2.1 sprite model trained here (models/sprites), 17-frame training clips"), "rows": rows})
    save_strip(videos_of, borders[0])


def save_strip(videos_of: dict, border: int) -> None:
    """Every second frame from 0 to two blocks past the first border, one row per run and prompt."""
    from PIL import Image
    rows = [videos[clip, 0:border + 1 + 4 * LATENT_FRAMES_PER_BLOCK:2] for clip in range(len(TRAINED_PROMPTS))
            for videos in videos_of.values()]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, rows * h, frames * w)
    image = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(
        RESULTS / "dualparal_borders_trained.png")


def main():
    import_comfyui()
    import_pack()
    parts = set(sys.argv[1:]) or {"fixture"}
    if "fixture" in parts:
        fixture()
    if "trained" in parts:
        trained()


if __name__ == "__main__":
    main()
