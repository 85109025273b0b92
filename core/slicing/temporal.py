"""Pieces shared by the video blocks: the time-only ResBlock run in exact spatial strips and the
alpha blend of spatial and temporal paths."""
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .group_norm import ExactGroupNorm


def blend(alpha: torch.Tensor, x_spatial: torch.Tensor, x_temporal: torch.Tensor) -> torch.Tensor:
    """AlphaBlender's mix: alpha * spatial + (1 - alpha) * temporal, in the spatial dtype."""
    return alpha.to(x_spatial.dtype) * x_spatial + (1.0 - alpha).to(x_spatial.dtype) * x_temporal


class TemporalResBlockStrips:
    """A ResBlock whose convolutions only mix frames (kernel [k, 1, 1] on b c t h w), run over
    strips of the last (width) axis. Both GroupNorms get the whole tensor's statistics: the first
    from its input, the second by running the first half once more per strip.

    The block is given as its parts: norm -> `after_in_norm` (+ `emb_out`) -> norm -> `after_out_norm`,
    plus `skip` of the input."""

    def __init__(self, in_norm: nn.Module, after_in_norm: Callable, emb_out: Optional[torch.Tensor],
                 out_norm: nn.Module, after_out_norm: Callable, skip: Callable):
        self.in_norm, self.out_norm = ExactGroupNorm(in_norm), ExactGroupNorm(out_norm)
        self.after_in_norm, self.after_out_norm, self.skip = after_in_norm, after_out_norm, skip
        self.emb_out = emb_out

    @classmethod
    def of_comfy(cls, block: nn.Module, emb: Optional[torch.Tensor]) -> "TemporalResBlockStrips":
        """ComfyUI's ResBlock (dims=3); `emb` is (b, t, C) or None."""
        if block.updown or block.use_scale_shift_norm:
            raise TypeError("only plain temporal ResBlocks (no up/down, no scale-shift norm) are sliced")
        emb_out = None
        if emb is not None and not block.skip_t_emb:
            emb_out = block.emb_layers(emb)
            while emb_out.ndim < 5:
                emb_out = emb_out[..., None]
            emb_out = emb_out.movedim(1, 2) if block.exchange_temb_dims else emb_out
        return cls(block.in_layers[0], block.in_layers[1:], emb_out, block.out_layers[0], block.out_layers[1:],
                   block.skip_connection)

    @classmethod
    def of_diffusers(cls, block: nn.Module, temb: Optional[torch.Tensor]) -> "TemporalResBlockStrips":
        """diffusers' TemporalResnetBlock; `temb` is (b, t, C) or None."""
        act = block.nonlinearity
        emb_out = None
        if temb is not None and block.time_emb_proj is not None:
            emb_out = block.time_emb_proj(act(temb))[:, :, :, None, None].permute(0, 2, 1, 3, 4)
        return cls(block.norm1, lambda h: block.conv1(act(h)), emb_out, block.norm2,
                   lambda h: block.conv2(block.dropout(act(h))),
                   block.conv_shortcut if block.conv_shortcut is not None else (lambda x: x))

    def _first_half(self, x: torch.Tensor) -> torch.Tensor:
        h = self.after_in_norm(self.in_norm(x))
        if self.emb_out is not None:
            h = h + self.emb_out.type(h.dtype)
        return h

    def prepare(self, read_strips: Callable[[], Iterable[torch.Tensor]]):
        """Gathers both norms' statistics; `read_strips()` yields the input's strips, read twice."""
        self.in_norm.reset()
        for strip in read_strips():
            self.in_norm.accumulate(strip)
        self.out_norm.reset()
        for strip in read_strips():
            self.out_norm.accumulate(self._first_half(strip))

    def __call__(self, x: torch.Tensor, s: slice = None) -> torch.Tensor:
        return self.skip(x) + self.after_out_norm(self.out_norm(self._first_half(x)))
