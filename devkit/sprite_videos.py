"""Procedural videos for CMD: sprites (discs, squares, triangles) that move, scale and rotate over
textured backgrounds. Every clip is a function of its seed; clips are (frames, 3, height, width) in [0, 1]."""
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
