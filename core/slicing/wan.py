"""ComfyUI's Wan DiT blocks (wan/model.py WanAttentionBlock): a sliced forward over token chunks.

Everything in the block but self-attention's softmax is per token (modulation, LayerNorm,
RMSNorm of q/k, RoPE, projections, cross-attention queries, FFN), so it runs exactly in chunks of
the token axis; self-attention is split along queries only, over the full keys and values.
Grouped, each chunk runs the whole chain after the q/k/v projections (attention, output
projection, residual, cross-attention, FFN), and the block's output is written over the query
buffer.
"""
from typing import Callable

import torch
from torch import nn

from .settings import SliceSettings
from .slices import chunk_slices, run_stage
from .temporal import host_function


def modulation_chunk(e: torch.Tensor, s: slice, tokens: int) -> torch.Tensor:
    """Tokens `s` of a modulation the stock block expands with `repeat_e` (one row per sample, per
    token, or per latent frame repeated over that frame's tokens)."""
    if e.size(1) == 1:
        return e
    repeats = tokens // e.size(1)
    if repeats == 1:
        return e[:, s]
    per_row = repeats if repeats * e.size(1) == tokens else repeats + 1
    return e[:, torch.arange(s.start, s.stop, device=e.device) // per_row]


def wan_block_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    attention = block.self_attn
    optimized_attention = host_function(attention, "optimized_attention")
    apply_rope1 = host_function(attention, "apply_rope1")

    def forward(x, e, freqs, context, context_img_len=257, transformer_options={}):
        modulation = block.modulation.to(dtype=x.dtype, device=x.device)
        e = (modulation + e).chunk(6, dim=1) if e.ndim < 4 else (modulation.unsqueeze(0) + e).unbind(2)
        batch, tokens, _ = x.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        chunks = settings.tokens(tokens)

        def at(i, s):
            return modulation_chunk(e[i], s, tokens)

        # (the stock block makes x contiguous first: an extra full copy, as the first block's input is
        # a transposed view; chunks of the view serve as well)
        q, k, v = (x.new_empty(x.shape) for _ in range(3))  # new_empty is contiguous
        for s in chunk_slices(tokens, chunks):
            h = torch.addcmul(at(0, s), block.norm1(x[:, s]), 1 + at(1, s))
            rope = freqs[:, s] if freqs.shape[1] == tokens else freqs
            q[:, s] = apply_rope1(attention.norm_q(attention.q(h)).view(batch, -1, heads, head_dim), rope).flatten(2)
            k[:, s] = apply_rope1(attention.norm_k(attention.k(h)).view(batch, -1, heads, head_dim), rope).flatten(2)
            v[:, s] = attention.v(h)
            del h

        def self_attention(xs, s):
            y = attention.o(optimized_attention(q[:, s], k, v, heads=heads, transformer_options=transformer_options))
            return torch.addcmul(xs, y, at(2, s))

        def cross_attention(xs, s):
            return xs + block.cross_attn(block.norm3(xs), context, context_img_len=context_img_len,
                                         transformer_options=transformer_options)

        def feed_forward(xs, s):
            return torch.addcmul(xs, block.ffn(torch.addcmul(at(3, s), block.norm2(xs), 1 + at(4, s))), at(5, s))

        # The output overwrites q: a chunk of q is read only by that chunk's attention, before it is written.
        return run_stage([self_attention, cross_attention, feed_forward], x, 1, chunks, settings.group_ops, out=q)
    return forward
