"""DualParal's block-wise denoising schedule: which latent block runs which step, in which order.

The latent's frames are cut into blocks. Iteration i admits block i (pure noise) and runs one
sampler step on every block still denoising, newest first, so block k takes step i - k; a block
leaves after its last step. Each forward sees, besides its own frames, the last `cache_frames`
frames of the block before it as real tokens (as they stood at the end of the previous iteration)
and, through the per-layer feature cache, the keys and values of the first `cache_frames` frames of
the block run just before it (the block after it in the video). Every forward of an iteration reads
only states of the previous iteration, so the result does not depend on how many ranks run it.

With two experts (Wan 2.2 A14B), steps from `expert_switch` on run the second (low-noise) expert.
Blocks at both sides of the switch are in flight at once, so every rank holds both; keys and values
are not carried between jobs of different experts (one expert's keys in the other's attention).
"""
from dataclasses import dataclass

from ..slicing.slices import chunk_slices


class DualParalError(ValueError):
    """Input that DualParal cannot run; the message names the fix."""


@dataclass(frozen=True)
class Job:
    iteration: int
    block: int
    step: int
    context_frames: int  # last frames of the previous block, prepended as real tokens
    frames: int  # the block's own frames
    appended_frames: int  # frames of the previously run block whose keys/values are appended
    keep_frames: int  # own frames whose keys/values the next job appends
    expert: int = 0  # 0: the model (high-noise expert), 1: the low-noise expert


@dataclass(frozen=True)
class BlockPlan:
    frames: int
    frames_per_block: int
    cache_frames: int
    steps: int
    expert_switch: int = 0  # the first step of the low-noise expert; 0: one model for every step

    def __post_init__(self):
        if self.frames < 1 or self.steps < 1:
            raise DualParalError(f"DualParal needs at least one latent frame and one step (got {self.frames} "
                                 f"frames, {self.steps} steps).")
        if not 1 <= self.frames_per_block <= self.frames:
            raise DualParalError(f"frames per block is {self.frames_per_block}, but the latent has {self.frames} "
                                 f"frames: set frames per block between 1 and {self.frames}.")
        if not 0 <= self.cache_frames < self.frames_per_block:
            raise DualParalError(f"cache frames is {self.cache_frames}: it must be at least 0 and below frames per "
                                 f"block ({self.frames_per_block}); set it to at most {self.frames_per_block - 1}.")
        if not 0 <= self.expert_switch < self.steps:
            raise DualParalError(f"the low-noise expert takes over at step {self.expert_switch}, but there are "
                                 f"{self.steps} steps: set low_noise_from_step between 1 and {self.steps - 1} "
                                 f"(ComfyUI's Wan 2.2 A14B workflows switch halfway).")

    def expert(self, step: int) -> int:
        return int(0 < self.expert_switch <= step)

    @property
    def blocks(self) -> list[range]:
        return [range(start, min(start + self.frames_per_block, self.frames))
                for start in range(0, self.frames, self.frames_per_block)]

    @property
    def iterations(self) -> int:
        return len(self.blocks) + self.steps - 1

    def active(self, iteration: int) -> list[int]:
        """Blocks denoised in `iteration`, in the order they run (newest first)."""
        newest = min(iteration, len(self.blocks) - 1)
        return [k for k in range(newest, -1, -1) if iteration - k < self.steps]

    def jobs(self) -> list[Job]:
        sizes = [len(b) for b in self.blocks]
        jobs = []
        for iteration in range(self.iterations):
            order = self.active(iteration)
            experts = [self.expert(iteration - block) for block in order]
            for position, block in enumerate(order):
                after_same = position > 0 and experts[position - 1] == experts[position]
                before_same = position + 1 < len(order) and experts[position + 1] == experts[position]
                jobs.append(Job(
                    iteration=iteration, block=block, step=iteration - block,
                    context_frames=min(self.cache_frames, sizes[block - 1]) if block > 0 else 0,
                    frames=sizes[block],
                    appended_frames=min(self.cache_frames, sizes[block + 1]) if after_same else 0,
                    keep_frames=min(self.cache_frames, sizes[block]) if before_same else 0,
                    expert=experts[position]))
        return jobs


def layer_ranges(layers: int, ranks: int) -> list[range]:
    """Contiguous, balanced ranges of the transformer's layers, one per rank."""
    if ranks > layers:
        raise DualParalError(f"{ranks} ranks for a model with {layers} transformer layers: use at most {layers} devices.")
    return [range(s.start, s.stop) for s in chunk_slices(layers, ranks)]
