"""CMD's motion diffusion model: a DiT over the motion latent's tokens with the content frame's
tokens in context and the timestep through adaLN-Zero, trained and sampled as a rectified flow
(x_t = (1 - t) x_0 + t noise, the model predicts noise - x_0, Euler steps from t = 1 to 0)."""
from typing import Callable, Optional

import torch
from torch import nn

from .config import CMDConfig
from .layers import DiTBlock, modulate, timestep_embedding


class MotionDiT(nn.Module):
    def __init__(self, config: CMDConfig):
        super().__init__()
        self.config = config
        dim, rows, columns = config.dit_dim, *config.grid
        channels, frames, length = config.motion_shape
        self.motion_in = nn.Linear(channels, dim)
        self.motion_position = nn.Parameter(torch.randn(1, frames * length, dim) * 0.02)
        self.content_in = nn.Conv2d(config.channels, dim, config.patch, config.patch)
        self.content_position = nn.Parameter(torch.randn(1, rows * columns, dim) * 0.02)
        self.time_embedding = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, config.dit_heads) for _ in range(config.dit_depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.motion_out = nn.Linear(dim, channels)
        for layer in (self.final_modulation[1], self.motion_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, motion: torch.Tensor, t: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """The velocity (noise - x_0) for motion latents at times t given their content frames."""
        batch, channels, frames, length = motion.shape
        motion_tokens = self.motion_in(motion.permute(0, 2, 3, 1).reshape(batch, frames * length, channels))
        content_tokens = self.content_in(content).flatten(2).transpose(1, 2) + self.content_position
        x = torch.cat([content_tokens, motion_tokens + self.motion_position], dim=1)
        condition = self.time_embedding(timestep_embedding(t).to(motion.dtype))
        for block in self.blocks:
            x = block(x, condition)
        shift, scale = self.final_modulation(condition).chunk(2, dim=-1)
        velocity = self.motion_out(modulate(self.final_norm(x[:, content_tokens.shape[1]:]), shift, scale))
        return velocity.view(batch, frames, length, channels).permute(0, 3, 1, 2)


def sample_motion(model: MotionDiT, content: torch.Tensor, noise: torch.Tensor, steps: int,
                  progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Euler integration of the flow from `noise` (t = 1) to a motion latent (t = 0)."""
    times = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    for step in range(steps):
        t = times[step].expand(x.shape[0]).to(x.device)
        x = x + (times[step + 1] - times[step]) * model(x, t, content)
        if progress is not None:
            progress(step + 1, steps)
    return x
