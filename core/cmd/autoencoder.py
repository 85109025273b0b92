"""CMD's autoencoder: a video becomes one content frame and a small motion latent.

Videos are (batch, frames, channels, height, width) in [-1, 1]. The content frame is, per pixel and
per channel, a softmax-over-time weighted sum of the frames (an image, which an image model can
make); the motion latent is two feature planes, averaged over height (x-t) and over width (y-t),
squashed by tanh. The decoder adds the broadcast content tokens and both planes, runs a transformer
and upsamples back to frames on top of the content frame.
"""
import torch
from torch import nn

from .config import CMDConfig
from .layers import SpaceTimeBlock


def _unpatchify(tokens: torch.Tensor, config: CMDConfig) -> torch.Tensor:
    """(batch, frames, rows, columns, patch*patch*channels) -> (batch, frames, channels, height, width)."""
    batch, frames, rows, columns, _ = tokens.shape
    patch, channels = config.patch, config.channels
    pixels = tokens.view(batch, frames, rows, columns, patch, patch, channels).permute(0, 1, 6, 2, 4, 3, 5)
    return pixels.reshape(batch, frames, channels, rows * patch, columns * patch)


class CMDAutoencoder(nn.Module):
    def __init__(self, config: CMDConfig):
        super().__init__()
        self.config = config
        dim, rows, columns = config.dim, *config.grid
        self.patch_embedding = nn.Conv2d(config.channels, dim, config.patch, config.patch)
        self.encoder_space_position = nn.Parameter(torch.randn(1, 1, rows, columns, dim) * 0.02)
        self.encoder_time_position = nn.Parameter(torch.randn(1, config.frames, 1, 1, dim) * 0.02)
        self.encoder = nn.ModuleList(SpaceTimeBlock(dim, config.heads) for _ in range(config.encoder_depth))
        self.encoder_norm = nn.LayerNorm(dim)
        self.frame_weight_logits = nn.Linear(dim, config.patch * config.patch * config.channels)
        self.to_motion_x = nn.Linear(dim, config.motion_channels)
        self.to_motion_y = nn.Linear(dim, config.motion_channels)

        self.content_embedding = nn.Conv2d(config.channels, dim, config.patch, config.patch)
        self.from_motion_x = nn.Linear(config.motion_channels, dim)
        self.from_motion_y = nn.Linear(config.motion_channels, dim)
        self.decoder_space_position = nn.Parameter(torch.randn(1, 1, rows, columns, dim) * 0.02)
        self.decoder_time_position = nn.Parameter(torch.randn(1, config.frames, 1, 1, dim) * 0.02)
        self.decoder = nn.ModuleList(SpaceTimeBlock(dim, config.heads) for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.upsample = nn.ConvTranspose2d(dim, config.channels, config.patch, config.patch)
        nn.init.zeros_(self.upsample.weight)  # an untrained decoder shows the content frame in every frame
        nn.init.zeros_(self.upsample.bias)

    def frame_weights(self, video: torch.Tensor) -> torch.Tensor:
        """Per pixel and channel, each frame's share of the content frame (sums to 1 over time)."""
        return self._encoded(video)[1]

    def _encoded(self, video: torch.Tensor) -> tuple:
        batch, frames = video.shape[:2]
        tokens = self.patch_embedding(video.flatten(0, 1))
        tokens = tokens.view(batch, frames, *tokens.shape[1:]).permute(0, 1, 3, 4, 2)
        tokens = tokens + self.encoder_space_position + self.encoder_time_position
        for block in self.encoder:
            tokens = block(tokens)
        tokens = self.encoder_norm(tokens)
        weights = _unpatchify(self.frame_weight_logits(tokens), self.config).softmax(dim=1)
        return tokens, weights

    def encode(self, video: torch.Tensor) -> tuple:
        """(content (batch, channels, height, width), motion (batch, motion channels, frames, columns + rows))."""
        tokens, weights = self._encoded(video)
        content = (weights * video).sum(dim=1)
        motion_x = torch.tanh(self.to_motion_x(tokens.mean(dim=2)))  # averaged over height: (b, t, columns, c)
        motion_y = torch.tanh(self.to_motion_y(tokens.mean(dim=3)))  # averaged over width: (b, t, rows, c)
        return content, torch.cat([motion_x, motion_y], dim=2).permute(0, 3, 1, 2)

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """Frames (batch, frames, channels, height, width) from a content frame and a motion latent."""
        columns = self.config.grid[1]
        plane_x = self.from_motion_x(motion[..., :columns].permute(0, 2, 3, 1))  # (b, t, columns, dim)
        plane_y = self.from_motion_y(motion[..., columns:].permute(0, 2, 3, 1))  # (b, t, rows, dim)
        tokens = self.content_embedding(content).permute(0, 2, 3, 1)[:, None]
        tokens = tokens + plane_x[:, :, None] + plane_y[:, :, :, None]
        tokens = tokens + self.decoder_space_position + self.decoder_time_position
        for block in self.decoder:
            tokens = block(tokens)
        tokens = self.decoder_norm(tokens)
        batch, frames, rows, columns, dim = tokens.shape
        residual = self.upsample(tokens.reshape(batch * frames, rows, columns, dim).permute(0, 3, 1, 2))
        return content[:, None] + residual.view(batch, frames, *residual.shape[1:])

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(video))
