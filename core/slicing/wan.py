"""ComfyUI's Wan DiT blocks (wan/model.py WanAttentionBlock): a sliced forward over token chunks.

Everything in the block but self-attention's softmax is per token (modulation, LayerNorm,
RMSNorm of q/k, RoPE, projections, cross-attention queries, FFN), so it runs exactly in chunks of
the token axis; self-attention is split along queries only, over the full keys and values.
Keys and values are projected first, chunk by chunk, into two full buffers; queries are projected
per chunk inside the attention stage. Grouped, each chunk runs a chain (queries, attention, output
projection, residual), then, with keys and values freed, another (cross-attention, FFN). The
block's output overwrites its input where nothing else can read the input afterwards, so the block
holds three full buffers (input, keys, values) at its peak instead of stock's many.
"""
from typing import Callable

import torch
from torch import nn

from ..kv_carry import KV_CARRY
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


def may_overwrite_input(x: torch.Tensor, out_dtype: torch.dtype, transformer_options: dict) -> bool:
    """The output may replace the block's input in place unless something can still read the input:
    autograd, a block-replace patch (it is handed the input and may use it after the block), or an
    input whose elements share memory (expanded); or unless the output has another dtype."""
    replaced = any(key[0] == "double_block" for key in transformer_options.get("patches_replace", {}).get("dit", {}))
    expanded = any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape))
    return (not replaced and not expanded and out_dtype == x.dtype
            and not (torch.is_grad_enabled() and x.requires_grad))


def wan_block_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    attention = block.self_attn
    optimized_attention = host_function(attention, "optimized_attention")
    apply_rope1 = host_function(attention, "apply_rope1")

    def forward(x, e, freqs, context, context_img_len=257, transformer_options={}):
        modulation = block.modulation.to(dtype=x.dtype, device=x.device)
        e = (modulation + e).chunk(6, dim=1) if e.ndim < 4 else (modulation.unsqueeze(0) + e).unbind(2)
        batch, tokens, _ = x.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        chunks = settings.tokens(tokens, x.shape[2])

        def at(i, s):
            return modulation_chunk(e[i], s, tokens)

        def modulated_norm(xs, s):
            return torch.addcmul(at(0, s), block.norm1(xs), 1 + at(1, s))

        def rope_at(s):
            return freqs[:, s] if freqs.shape[1] == tokens else freqs

        # (the stock block makes x contiguous first: an extra full copy, as the first block's input is
        # a transposed view; chunks of the view serve as well)
        carry = transformer_options.get(KV_CARRY)  # DualParal: keys/values of a neighbouring block
        appended = carry.appended_tokens if carry else 0
        k, v = (x.new_empty((batch, tokens + appended, x.shape[2])) for _ in range(2))  # contiguous
        for s in chunk_slices(tokens, chunks):
            h = modulated_norm(x[:, s], s)
            k_raw, v[:, s] = attention.norm_k(attention.k(h)), attention.v(h)
            if carry:
                carry.keep_part(s, k_raw, v[:, s])
            k[:, s] = apply_rope1(k_raw.view(batch, -1, heads, head_dim), rope_at(s)).flatten(2)
            del h, k_raw
        if carry:
            carry.fill_appended(k[:, tokens:], v[:, tokens:], apply_rope1, heads)

        def self_attention(xs, s):
            q = attention.norm_q(attention.q(modulated_norm(xs, s))).view(batch, -1, heads, head_dim)
            q = apply_rope1(q, rope_at(s)).flatten(2)
            y = attention.o(optimized_attention(q, k, v, heads=heads, transformer_options=transformer_options))
            return torch.addcmul(xs, y, at(2, s))

        def cross_attention(xs, s):
            return xs + block.cross_attn(block.norm3(xs), context, context_img_len=context_img_len,
                                         transformer_options=transformer_options)

        def feed_forward(xs, s):
            return torch.addcmul(xs, block.ffn(torch.addcmul(at(3, s), block.norm2(xs), 1 + at(4, s))), at(5, s))

        # Self-attention first over all chunks, so that keys and values are freed before the FFN's
        # wide intermediates exist. A chunk of x is read only by its own chunk of the chain (keys and
        # values are already projected) before that chunk of the output is written.
        out_dtype = torch.promote_types(x.dtype, e[2].dtype)
        out = x if may_overwrite_input(x, out_dtype, transformer_options) else None
        x = run_stage([self_attention], x, 1, chunks, settings.group_ops, out=out)
        k = v = None  # the keys and values are freed before the FFN stage
        return run_stage([cross_attention, feed_forward], x, 1, chunks, settings.group_ops, out=x)
    return forward
