"""The one settings object shared by the nodes, the planner and the plain-torch API."""
import logging
from dataclasses import dataclass, replace
from typing import Optional

import torch

log = logging.getLogger(__name__)

AUTO = 0
AUTO_STRIP_WIDTH = 16  # columns per strip in auto mode
AUTO_BAND_ELEMENTS = 65536  # positions x channels per band of a temporal transformer in auto mode
AUTO_TOKEN_ELEMENTS = 1024 * 1536  # tokens x channels per chunk of a DiT block in auto mode (1024 tokens of Wan 1.3B)
# frames x channels x positions per chunk of a UNet's spatial layers in auto mode (at least one frame;
# one frame of SVD's top levels at 576x1024, several of its small levels, where one frame a chunk is slow)
AUTO_FRAME_ELEMENTS = 1024 * 1536


@dataclass(frozen=True)
class SliceSettings:
    """How finely supported blocks are sliced.

    frame_chunks: chunks of the batch*frames axis for spatial ops (0 = as many frames per chunk as
        hold AUTO_FRAME_ELEMENTS, at least one; one frame per chunk where the size is not given); for DiT
        video models, chunks of the token axis (0 = 1024 x 1536 token-channels per chunk).
    strip_chunks: chunks of the spatial axis for temporal ops (0 = strips 16 columns wide, and
        bands of 65536 position-channels per frame for temporal transformers).
    group_ops: run chains of ops slice by slice (Operator Grouper) instead of one op at a time.
    offload_frames: grouped video decoders keep their per-frame activations in host memory and
        bring each frame chunk or strip to the compute device only while it is worked on.
    caller_drops_input: set per block by the family table (registry.Caller), never by a node: the
        block's caller drops the block's input, so the sliced block may write its output into it.
    """
    frame_chunks: int = AUTO
    strip_chunks: int = AUTO
    group_ops: bool = False
    offload_frames: bool = False
    caller_drops_input: bool = False

    def __post_init__(self):
        for name in ("frame_chunks", "strip_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0 (0 = auto), got {value!r}")

    @property
    def frame_store(self) -> Optional[torch.device]:
        return torch.device("cpu") if self.offload_frames else None

    def merged(self, **changes) -> "SliceSettings":
        return replace(self, **changes)

    def frames(self, length: int, frame_elements: int = 0) -> int:
        """Chunks of a batch*frames axis of frames with `frame_elements` elements each (0: unknown)."""
        if self.frame_chunks:
            return _clamp("frame_chunks", self.frame_chunks, length)
        if not frame_elements:
            return length
        return min(length, -(-length * frame_elements // AUTO_FRAME_ELEMENTS))

    def strips(self, length: int) -> int:
        return _clamp("strip_chunks", self.strip_chunks, length) if self.strip_chunks else -(-length // AUTO_STRIP_WIDTH)

    def tokens(self, length: int, width: int) -> int:
        """Chunks of a DiT's token axis of `width`-wide tokens (frame_chunks sets the count)."""
        return (_clamp("frame_chunks", self.frame_chunks, length) if self.frame_chunks
                else min(length, -(-length * width // AUTO_TOKEN_ELEMENTS)))

    def bands(self, positions: int, channels: int) -> int:
        """Chunks of a flattened height*width axis of `channels`-wide features."""
        return (_clamp("strip_chunks", self.strip_chunks, positions) if self.strip_chunks
                else min(positions, -(-positions * channels // AUTO_BAND_ELEMENTS)))


_warned = set()


def _clamp(name: str, chunks: int, length: int) -> int:
    """Clamps a chunk count to what an axis holds, warning once per setting (the axes of a UNet's
    lower levels are shorter than the top one's, so clamping there is expected)."""
    if chunks <= length:
        return chunks
    if (name, chunks) not in _warned:
        _warned.add((name, chunks))
        log.warning("Streamline: %s=%d is more than an axis of %d holds; using one slice per element there.",
                    name, chunks, length)
    return length
