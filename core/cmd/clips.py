"""CMD on image batches as hosts hold them: (images, height, width, channels) in [0, 1], a clip being
`config.frames` consecutive images. Checks what the loaded model takes before any computation."""
from typing import Callable, Optional

import torch

from .config import CMDError
from .model import CMDModel
from .motion_dit import sample_motion


def _check_size(model: CMDModel, images: torch.Tensor, what: str) -> None:
    config = model.config
    height, width, channels = images.shape[1:]
    if (height, width) != (config.height, config.width) or channels != config.channels:
        raise CMDError(f"{what} is {width}x{height} with {channels} channels; this CMD model takes "
                       f"{config.width}x{config.height} RGB images: scale them first (Upscale Image to "
                       f"{config.width}x{config.height}, crop center).")


def _to_model(images: torch.Tensor, model: CMDModel) -> torch.Tensor:
    device = next(model.parameters()).device
    return images.to(device, torch.float32).movedim(-1, -3) * 2 - 1


def _to_images(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.float() + 1) / 2).clamp(0, 1).movedim(-3, -1).cpu()


@torch.no_grad()
def encode_clips(model: CMDModel, frames: torch.Tensor) -> tuple:
    """(content images (clips, h, w, c), motion (clips, motion channels, frames, columns + rows))."""
    config = model.config
    if frames.shape[0] == 0 or frames.shape[0] % config.frames:
        raise CMDError(f"got {frames.shape[0]} frames; this CMD model encodes clips of exactly {config.frames} "
                       f"frames (or several such clips one after another): pick {config.frames} frames, e.g. with "
                       f"Image From Batch.")
    _check_size(model, frames, "the video")
    clips = _to_model(frames, model).view(-1, config.frames, config.channels, config.height, config.width)
    content, motion = model.autoencoder.encode(clips)
    return _to_images(content), motion.cpu()


def _check_motion(model: CMDModel, motion: torch.Tensor, clips: int) -> None:
    if tuple(motion.shape[1:]) != model.config.motion_shape:
        raise CMDError(f"the motion latent has shape {tuple(motion.shape[1:])}; this CMD model takes "
                       f"{model.config.motion_shape}: encode or sample it with the same CMD model.")
    if motion.shape[0] != clips:
        raise CMDError(f"{clips} content frames for {motion.shape[0]} motion latents: give one content frame per "
                       f"motion latent (or one for all).")


@torch.no_grad()
def decode_clips(model: CMDModel, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """Frames (clips * frames, h, w, c) of each clip, one content frame per motion latent (or one for all)."""
    _check_size(model, content, "the content frame")
    if content.shape[0] == 1:
        content = content.expand(motion.shape[0], *content.shape[1:])
    _check_motion(model, motion, content.shape[0])
    device = next(model.parameters()).device
    frames = model.autoencoder.decode(_to_model(content, model), motion.to(device, torch.float32))
    return _to_images(frames.flatten(0, 1))


@torch.no_grad()
def sample_clip_motion(model: CMDModel, content: torch.Tensor, seed: int, steps: int,
                       progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """One motion latent per content frame, from the seed's noise."""
    _check_size(model, content, "the content frame")
    noise = torch.randn((content.shape[0], *model.config.motion_shape), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    return sample_motion(model.motion_dit, _to_model(content, model), noise.to(device), steps, progress).cpu()
