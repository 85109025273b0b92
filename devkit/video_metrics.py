"""Motion measures for sprite videos (devkit/sprite_videos.prompt_video and what models make of its
prompts), in plain torch.

Videos are (clips, frames, 3, height, width) in [0, 1] (one clip may be given as (frames, 3, h, w)).

1. Foreground: a clip's background is its per-pixel median over time (the sprite moves on, so each
   pixel shows the background in most frames); a pixel is foreground where some channel differs from
   it by more than `threshold`. Of each frame's foreground only the largest 8-connected blob counts
   (specks of noise in a generated frame do not move the centre).
2. The sprite's area in a frame is the blob's pixel count; its centre (x, y), in pixels, the centroid
   of the blob grown by one pixel, each pixel weighted by its difference from the background (the
   sprites' soft edges then place it to a fraction of a pixel). A frame whose blob is smaller than
   `min_area` pixels or covers more than `max_fraction` of the frame (noise, a flicker of the whole
   picture) has no sprite: no centre (NaN) and area 0.

From the centre tracks and areas, per clip:

- smoothness: the mean length of the second difference of the centre track, |c[t+1] - 2 c[t] + c[t-1]|,
  in pixels (0 for steady motion; lower is smoother). Triples with a missing centre are skipped;
  a clip with no complete triple scores NaN.
- direction: the mean displacement d (mean of c[t+1] - c[t] over frame pairs that both have a centre)
  points in the prompt's direction u when its component along u exceeds both its component across u
  (within 45 degrees) and `min_speed` px a frame (a still sprite has no direction).
- speed: d's component along u, px a frame.
- survival: the fraction of frames whose sprite area lies within `tolerance` (50 %) of the first
  frame's area (a sprite that vanishes, splits or smears fails those frames).

`motion_measures` averages them over clips: smoothness_px (mean over clips with a value),
direction_accuracy (fraction of clips), survival (mean fraction) and speed_px_per_frame.
"""
import math

import torch
import torch.nn.functional as F

from .sprite_videos import DIRECTIONS, parse_prompt


def _as_clips(videos: torch.Tensor) -> torch.Tensor:
    videos = torch.as_tensor(videos).float().contiguous()  # (median misreads expanded, stride-0 tensors)
    return videos[None] if videos.dim() == 4 else videos


def background_differences(videos: torch.Tensor) -> torch.Tensor:
    """(clips, frames, h, w): the largest channel difference from the clip's per-pixel median over time."""
    videos = _as_clips(videos)
    return (videos - videos.median(dim=1, keepdim=True).values).abs().amax(dim=2)


def foreground_masks(videos: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """(clips, frames, h, w) bool: pixels that differ from the clip's per-pixel median over time."""
    return background_differences(videos) > threshold


def largest_blobs(masks: torch.Tensor) -> torch.Tensor:
    """Keeps the largest 8-connected component of each (h, w) mask (any leading dimensions)."""
    shape = masks.shape
    masks = masks.reshape(-1, 1, *shape[-2:])
    count, pixels = masks.shape[0], shape[-2] * shape[-1]
    labels = torch.arange(1, pixels + 1, dtype=torch.float32).reshape(1, 1, *shape[-2:]).expand(count, -1, -1, -1)
    labels = labels * masks
    while True:  # every pixel takes the largest label of its 3x3 neighbourhood inside the mask
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * masks
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.reshape(count, pixels).long()
    sizes = torch.zeros(count, pixels + 1, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    sizes[:, 0] = 0  # background
    biggest = sizes.argmax(dim=1, keepdim=True)
    keep = (flat == biggest) & (biggest > 0)
    return keep.reshape(shape)


def centre_tracks(videos: torch.Tensor, threshold: float = 0.2, min_area: int = 4,
                  max_fraction: float = 0.25) -> tuple:
    """(centres (clips, frames, 2) as (x, y) px, NaN where a frame has no sprite; areas (clips, frames) px,
    0 where it has none)."""
    differences = background_differences(videos)
    blobs = largest_blobs(differences > threshold).float()
    height, width = blobs.shape[-2:]
    areas = blobs.sum(dim=(-2, -1))
    present = (areas >= min_area) & (areas <= max_fraction * height * width)
    grown = F.max_pool2d(blobs.reshape(-1, 1, height, width), 3, stride=1, padding=1).reshape(blobs.shape)
    weights = grown * differences * present[..., None, None]
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    total = weights.sum(dim=(-2, -1))
    centres = torch.stack([(weights * x).sum(dim=(-2, -1)), (weights * y).sum(dim=(-2, -1))], dim=-1) / total[..., None]
    return centres, areas * present  # 0 / 0 gives NaN where a frame has no sprite


def smoothness(centres: torch.Tensor) -> torch.Tensor:
    """Per clip: mean |c[t+1] - 2 c[t] + c[t-1]| in px (NaN without a complete triple)."""
    second = (centres[:, 2:] - 2 * centres[:, 1:-1] + centres[:, :-2]).norm(dim=-1)
    valid = ~second.isnan()
    return torch.where(valid, second, 0).sum(dim=1) / valid.sum(dim=1)


def mean_displacement(centres: torch.Tensor) -> torch.Tensor:
    """Per clip: the mean of c[t+1] - c[t] over frame pairs that both have a centre, (clips, 2) px."""
    steps = centres[:, 1:] - centres[:, :-1]
    valid = ~steps.isnan().any(dim=-1, keepdim=True)
    return torch.where(valid, steps, 0).sum(dim=1) / valid.sum(dim=1)


def along_and_across(displacement: torch.Tensor, directions) -> tuple:
    units = torch.tensor([DIRECTIONS[d] for d in directions], dtype=torch.float32)
    along = (displacement * units).sum(dim=-1)
    across = (displacement[:, 0] * units[:, 1] - displacement[:, 1] * units[:, 0]).abs()
    return along, across


def survival(areas: torch.Tensor, tolerance: float = 0.5) -> torch.Tensor:
    """Per clip: the fraction of frames whose area is within `tolerance` of the first frame's."""
    first = areas[:, :1]
    kept = ((areas - first).abs() <= tolerance * first) & (first > 0)
    return kept.float().mean(dim=1)


def motion_measures(videos: torch.Tensor, prompts, threshold: float = 0.2, min_speed: float = 0.25,
                    tolerance: float = 0.5, min_area: int = 4, max_fraction: float = 0.25) -> dict:
    """The measures of the module docstring for clips and their prompts: means over the clips
    (`smoothness_px`, `direction_accuracy`, `survival`, `speed_px_per_frame`) and, under `per_clip`,
    each clip's values."""
    videos = _as_clips(videos)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} clips and {len(prompts)} prompts")
    centres, areas = centre_tracks(videos, threshold, min_area, max_fraction)
    smooth = smoothness(centres)
    along, across = along_and_across(mean_displacement(centres), [parse_prompt(p)[1] for p in prompts])
    correct = (along > across) & (along > min_speed)  # NaN compares False: no track, no direction
    kept = survival(areas, tolerance)
    finite = smooth[~smooth.isnan()]
    return {
        "clips": videos.shape[0],
        "smoothness_px": float(finite.mean()) if len(finite) else math.nan,
        "direction_accuracy": float(correct.float().mean()),
        "survival": float(kept.mean()),
        "speed_px_per_frame": float(along.nan_to_num(0).mean()),
        "per_clip": {"smoothness_px": smooth.tolist(), "direction_correct": correct.tolist(),
                     "survival": kept.tolist(), "speed_px_per_frame": along.tolist()},
    }
