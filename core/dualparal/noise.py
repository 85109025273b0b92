"""Coordinated noise initialisation: every latent block's starting noise comes from one pool.

The first block draws its noise like ComfyUI's sampler does for a whole latent (one CPU generator
seeded with the seed, so a video of one block starts from the same noise as stock sampling). Each
later block reuses the noise frames of the block before it (FreeNoise-like): the last
`cache_frames` frames first, so the frames either side of a block border start alike, then the
others in a seeded shuffle. Every rank gets the same noise without sending it.
"""
import torch

from .schedule import BlockPlan


def coordinated_noise(shape: tuple, plan: BlockPlan, seed: int) -> torch.Tensor:
    """Noise of `shape` (batch, channels, frames, height, width) for `plan`'s blocks."""
    generator = torch.Generator().manual_seed(seed)
    blocks = plan.blocks
    noise = torch.empty(shape)
    previous = torch.randn((*shape[:2], len(blocks[0]), *shape[3:]), generator=generator)
    noise[:, :, blocks[0].start:blocks[0].stop] = previous
    for block in blocks[1:]:
        previous = reorder(previous, len(block), plan.cache_frames, generator)
        noise[:, :, block.start:block.stop] = previous
    return noise


def reorder(previous: torch.Tensor, frames: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """A block's `frames` noise frames from the block before it's: its last `keep` frames first, then
    the others in a seeded shuffle."""
    count = previous.shape[2]
    index = torch.cat([torch.arange(count - keep, count), torch.randperm(count - keep, generator=generator)])
    return previous[:, :, index[:frames].to(previous.device)]
