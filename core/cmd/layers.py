"""Transformer pieces shared by the CMD autoencoder and the motion DiT."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))


def mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))


class SpaceTimeBlock(nn.Module):
    """TimeSformer's divided attention on (batch, frames, rows, columns, dim): over time at each
    position, then over space in each frame, then the MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.time_norm, self.time_attention = nn.LayerNorm(dim), Attention(dim, heads)
        self.space_norm, self.space_attention = nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp_norm, self.mlp = nn.LayerNorm(dim), mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, rows, columns, dim = x.shape
        along_time = x.permute(0, 2, 3, 1, 4).reshape(batch * rows * columns, frames, dim)
        along_time = along_time + self.time_attention(self.time_norm(along_time))
        x = along_time.view(batch, rows, columns, frames, dim).permute(0, 3, 1, 2, 4)
        in_space = x.reshape(batch * frames, rows * columns, dim)
        in_space = in_space + self.space_attention(self.space_norm(in_space))
        in_space = in_space + self.mlp(self.mlp_norm(in_space))
        return in_space.view(batch, frames, rows, columns, dim)


def timestep_embedding(t: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to DiT's 0-1000 range)."""
    half = channels // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: the condition sets shift, scale and gate of both branches, the
    gates start at zero so every block starts as the identity."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(condition).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attention(modulate(self.attention_norm(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.mlp_norm(x), shift_m, scale_m))
