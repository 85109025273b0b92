"""Procedural videos: sprites (discs, squares, triangles) over textured backgrounds. Every clip is a
function of its seed; clips are (frames, 3, height, width) in [0, 1].

- `sprite_video` (CMD): one or two sprites that move, scale and rotate freely.
- `prompt_video` (the text-to-video models of scripts/train_video_models.py): one sprite that moves at
  a steady speed in one of four directions, with the prompt that says so ("disc moving left": PROMPTS).
"""
import math

import torch

SHAPES = ("disc", "square", "triangle")
HELD_OUT_SEEDS = range(10**6, 10**6 + 64)  # never drawn in training


def _background(generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.rand(3, 1, 1, generator=generator) * 0.6 + 0.2
    for _ in range(2):  # two coloured gratings at random angles and frequencies
        angle = torch.rand((), generator=generator) * math.pi
        frequency = 2 + torch.rand((), generator=generator) * 6
        phase = torch.rand((), generator=generator) * 2 * math.pi
        wave = torch.sin(2 * math.pi * frequency * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
        image = image + 0.15 * wave * (torch.rand(3, 1, 1, generator=generator) * 2 - 1)
    blotches = torch.rand(1, 3, 4, 4, generator=generator) - 0.5
    image = image + 0.3 * torch.nn.functional.interpolate(blotches, size=(height, width), mode="bicubic",
                                                          align_corners=False)[0]
    return image.clamp(0, 1)


def _inside(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Soft coverage of a unit-sized shape at sprite coordinates (u, v)."""
    if shape == "disc":
        distance = 1 - torch.sqrt(u ** 2 + v ** 2)
    elif shape == "square":
        distance = 0.8 - torch.maximum(u.abs(), v.abs())
    else:
        edges = [v + 0.5, -0.866 * u - 0.5 * v + 0.5, 0.866 * u - 0.5 * v + 0.5]
        distance = torch.minimum(torch.minimum(edges[0], edges[1]), edges[2]) * 1.5
    return torch.sigmoid(distance * 12)


def sprite_video(seed: int, frames: int = 8, height: int = 64, width: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    background = _background(generator, height, width)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    time = torch.linspace(0, 1, frames)[:, None, None]
    video = background.expand(frames, 3, height, width).clone()
    for _ in range(1 + int(torch.randint(0, 2, (), generator=generator))):
        shape = SHAPES[int(torch.randint(0, len(SHAPES), (), generator=generator))]
        colour = torch.rand(3, generator=generator)
        start = torch.rand(2, generator=generator) * torch.tensor([width, height]) * 0.6 + torch.tensor(
            [width, height]) * 0.2
        velocity = (torch.rand(2, generator=generator) * 2 - 1) * min(height, width) * 0.5
        size = (0.08 + 0.12 * torch.rand(2, generator=generator)) * min(height, width)  # at the start, at the end
        angle = torch.rand((), generator=generator) * 2 * math.pi
        spin = (torch.rand((), generator=generator) * 2 - 1) * math.pi
        centre_x, centre_y = start[0] + velocity[0] * time, start[1] + velocity[1] * time
        radius = size[0] + (size[1] - size[0]) * time
        turn = angle + spin * time
        dx, dy = (x - centre_x) / radius, (y - centre_y) / radius
        u, v = dx * torch.cos(turn) + dy * torch.sin(turn), -dx * torch.sin(turn) + dy * torch.cos(turn)
        coverage = _inside(shape, u, v)[:, None]
        video = video * (1 - coverage) + colour[None, :, None, None] * coverage
    return video


def sprite_batch(seeds, frames: int = 8, height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.stack([sprite_video(seed, frames, height, width) for seed in seeds])


# --- text-to-video clips: one sprite, one direction, one prompt -------------------------------------

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (x, y), image axes
PROMPTS = tuple(f"{shape} moving {direction}" for shape in SHAPES for direction in DIRECTIONS)  # 12 prompts
# Training draws seeds below PROMPT_HELD_OUT_SEEDS.start only; seed % 12 picks the prompt, so these 48
# held-out clips are 4 of each prompt.
PROMPT_HELD_OUT_SEEDS = range(10**9, 10**9 + 48)
REFERENCE_FRAMES = 17  # the path is laid out for this many frames; other lengths keep the same speed


def prompt_of(seed: int) -> str:
    return PROMPTS[seed % len(PROMPTS)]


def parse_prompt(prompt: str) -> tuple:
    """"disc moving left" -> ("disc", "left")."""
    shape, _, direction = prompt.partition(" moving ")
    if shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"not one of the sprite prompts: {prompt!r} (expected '{{shape}} moving {{direction}}')")
    return shape, direction


def _plain_background(generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """A near-black base colour with a faint linear gradient of another colour across it."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.rand(3, 1, 1, generator=generator) * 0.08 + 0.02
    tilt = (torch.rand(3, 1, 1, generator=generator) * 2 - 1) * 0.03
    angle = torch.rand((), generator=generator) * 2 * math.pi
    image = base + tilt * ((x - 0.5) * torch.cos(angle) + (y - 0.5) * torch.sin(angle)) * 2
    return image.clamp(0, 1)


SHAPE_COLOURS = {"disc": (1.0, 0.45, 0.25), "square": (0.35, 1.0, 0.45), "triangle": (0.4, 0.6, 1.0)}


def prompt_video(seed: int, frames: int = REFERENCE_FRAMES, height: int = 64, width: int = 64,
                 prompt: str | None = None) -> tuple:
    """(video, prompt): one sprite of the prompt's shape that crosses the frame in the prompt's direction
    at a steady speed (58-66 % of the frame per 16 frames: 2.3-2.6 px a frame at 64x64), fixed
    orientation and size (a disc 17-19 px across), in its shape's colour (SHAPE_COLOURS, jittered by up to
    0.08 a channel), over a near-black background with a faint gradient, starting at the edge it leaves
    and crossing the middle fifth of the frame.
    (The sprite carries nearly all of the picture's variance and the prompt tells most of it: a small
    model trained by mean squared error for minutes then learns the prompt; with bright sprites of any
    colour anywhere over varied backgrounds the background dominated the loss and the prompt was ignored.)
    The prompt is PROMPTS[seed % 12] unless given. A shorter clip is the start of the longer one."""
    prompt = prompt_of(seed) if prompt is None else prompt
    shape, direction = parse_prompt(prompt)
    generator = torch.Generator().manual_seed(seed)
    background = _plain_background(generator, height, width)
    jitter = (torch.rand(3, generator=generator) * 2 - 1) * 0.08
    colour = (torch.tensor(SHAPE_COLOURS[shape]) + jitter).clamp(0, 1)
    extent = torch.tensor([width, height], dtype=torch.float32)
    radius = float((0.135 + 0.015 * torch.rand((), generator=generator)) * min(height, width))
    step = torch.tensor(DIRECTIONS[direction])
    distance = (0.58 + 0.08 * torch.rand((), generator=generator)) * min(height, width)  # over 16 frames
    margin = radius + 0.015 * min(height, width)
    # along the motion: start so that the whole path stays inside; across it: anywhere in the middle fifth
    start = margin + torch.rand(2, generator=generator) * (extent - 2 * margin - distance)
    start = torch.where(step < 0, extent - start, start)
    across = extent * (0.4 + 0.2 * torch.rand(2, generator=generator))
    start = torch.where(step == 0, across, start)
    velocity = step * distance / (REFERENCE_FRAMES - 1)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    time = torch.arange(frames, dtype=torch.float32)[:, None, None]
    dx = (x - (start[0] + velocity[0] * time)) / radius
    dy = (y - (start[1] + velocity[1] * time)) / radius
    coverage = _inside(shape, dx, dy)[:, None]
    video = background * (1 - coverage) + colour[None, :, None, None] * coverage
    return video, prompt


def prompt_batch(seeds, frames: int = REFERENCE_FRAMES, height: int = 64, width: int = 64) -> tuple:
    """(clips (n, frames, 3, h, w), prompts)."""
    clips, prompts = zip(*(prompt_video(seed, frames, height, width) for seed in seeds))
    return torch.stack(clips), list(prompts)
