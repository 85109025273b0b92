"""ComfyUI's Wan DiT blocks (wan/model.py WanAttentionBlock): a sliced forward over token chunks.

Everything in the block but self-attention's softmax is per token (modulation, LayerNorm,
RMSNorm of q/k, RoPE, projections, cross-attention queries, FFN), so it runs exactly in chunks of
the token axis; self-attention is split along queries only, over the full keys and values.
Keys and values are projected first, chunk by chunk, into two full buffers; queries are projected
per chunk inside the attention stage. Grouped, each chunk runs a chain (queries, attention, output
projection, residual), then, with keys and values freed, cross-attention (the text tokens' keys and
values projected once per block, not once per chunk), then the FFN. The block's output overwrites
its input where nothing else can read the input afterwards, so the block holds three full buffers
(input, keys, values) at its peak instead of stock's many. Layers that fetch their weights on every
call (offloaded, cast) fetch them once per stage (fetched_weights.py).

ComfyUI 0.33's block hands two hooks whole tensors (transformer_options["patches"]): `attn1_patch`
gets the self-attention output before its output projection with the roped queries and keys,
`attn2_patch` the block's stream after cross-attention. With such a patch the sliced block gathers
exactly those full tensors (the attention output and the queries, chunk by chunk; the stream between
the cross-attention and the FFN stages) and calls the patches where the stock block does; without
one it runs as before. Whether the host's block calls a hook is read off its code: 0.3.75's ignores
both, and so does the sliced block there; where the code cannot be read, a patched call runs stock.
"""
import functools
import inspect
import logging
import weakref
from typing import Callable

import torch
from torch import nn

from ..kv_carry import KV_CARRY
from ..patching import patches_applied
from .fetched_weights import weights_fetched_once
from .settings import SliceSettings
from .slices import chunk_slices, run_stage
from ..host import host_function

log = logging.getLogger(__name__)
HOOKS = ("attn1_patch", "attn2_patch")


def host_hooks(block: nn.Module) -> dict | None:
    """{hook: whether the host's stock block calls it}, or None where its code cannot be read (a
    VACE block runs the Wan block's own forward on its stream)."""
    wan_block = next((c for c in type(block).__mro__ if c.__name__ == "WanAttentionBlock"), type(block))
    return _host_hooks(wan_block, type(block.self_attn))


@functools.lru_cache(maxsize=None)
def _host_hooks(block_class: type, attention_class: type) -> dict | None:
    try:
        source = {"attn1_patch": inspect.getsource(attention_class.forward),
                  "attn2_patch": inspect.getsource(block_class.forward)}
    except (OSError, TypeError):
        return None
    return {hook: hook in source[hook] for hook in HOOKS}


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


def may_overwrite_input(x: torch.Tensor, out_dtype: torch.dtype, transformer_options: dict,
                        caller_drops_input: bool) -> bool:
    """The output may replace the block's input in place only where the block's caller drops the
    input (the family table says which callers do), and unless something else can still read it:
    autograd, a block-replace patch (it is handed the input and may use it after the block), or an
    input whose elements share memory (expanded); or unless the output has another dtype."""
    if not caller_drops_input:
        return False
    replaced = any(key[0] == "double_block" for key in transformer_options.get("patches_replace", {}).get("dit", {}))
    expanded = any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape))
    return (not replaced and not expanded and out_dtype == x.dtype
            and not (torch.is_grad_enabled() and x.requires_grad))


def wan_block_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    attention = block.self_attn
    optimized_attention = host_function(attention, "optimized_attention")
    apply_rope1 = host_function(attention, "apply_rope1")
    honoured = host_hooks(block)

    def forward(x, e, freqs, context, context_img_len=257, transformer_options={}):
        patches = transformer_options.get("patches", {})
        if honoured is None and any(patches.get(hook) for hook in HOOKS):
            log.warning("Feature Slicer: cannot read which attention hooks %s calls; running it stock",
                        type(block).__name__)
            return type(block).forward(block, x, e, freqs, context, context_img_len=context_img_len,
                                       transformer_options=transformer_options)
        patches = {hook: patches.get(hook) for hook in HOOKS if honoured and honoured[hook]}
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
        # (each stage holds the weights of the layers it runs: one or two layers' more than stock)
        with weights_fetched_once(block, ("norm1", "self_attn.k", "self_attn.v", "self_attn.norm_k")):
            k, v = project_keys_values(attention, lambda s: modulated_norm(x[:, s], s), chunk_slices(tokens, chunks),
                                       rope_at, transformer_options.get(KV_CARRY), x)

        with weights_fetched_once(block, ("norm1", "self_attn.q", "self_attn.norm_q", "self_attn.o")):
            def attend(xs, s):  # roped queries of chunk s and their attention output (before the projection)
                q = attention.norm_q(attention.q(modulated_norm(xs, s))).view(batch, -1, heads, head_dim)
                q = apply_rope1(q, rope_at(s))
                return q, optimized_attention(q.flatten(2), k, v, heads=heads, transformer_options=transformer_options)

            def self_attention(xs, s):
                return torch.addcmul(xs, attention.o(attend(xs, s)[1]), at(2, s))

            # Self-attention first over all chunks, so that keys and values are freed before the FFN's
            # wide intermediates exist. A chunk of x is read only by its own chunk of the chain (keys and
            # values are already projected) before that chunk of the output is written.
            out_dtype = torch.promote_types(x.dtype, e[2].dtype)
            out = x if may_overwrite_input(x, out_dtype, transformer_options, settings.caller_drops_input) else None
            if patches.get("attn1_patch"):
                attended = patched_self_attention(x, attend, chunk_slices(tokens, chunks), k, heads, head_dim,
                                                  patches["attn1_patch"], transformer_options)
                x = run_stage([lambda xs, s: torch.addcmul(xs, attention.o(attended[:, s]), at(2, s))],
                              x, 1, chunks, settings.group_ops, out=out)
                del attended
            else:
                x = run_stage([self_attention], x, 1, chunks, settings.group_ops, out=out)
            k = v = None  # the keys and values are freed before the FFN stage

        def cross_attention(xs, s):
            return xs + block.cross_attn(block.norm3(xs), context, context_img_len=context_img_len,
                                         transformer_options=transformer_options)

        def feed_forward(xs, s):
            return torch.addcmul(xs, block.ffn(torch.addcmul(at(3, s), block.norm2(xs), 1 + at(4, s))), at(5, s))

        # Cross-attention and the FFN are separate stages (each in place), so that the text keys and
        # values, projected once, are freed before the FFN's wide intermediates exist.
        with weights_fetched_once(block, ("norm3", "cross_attn")), \
                patches_applied(block.cross_attn, context_projections_once(block.cross_attn)):
            x = run_stage([cross_attention], x, 1, chunks, settings.group_ops, out=x)
        if patches.get("attn2_patch"):  # the whole stream between cross-attention and FFN, as stock
            for patch in patches["attn2_patch"]:
                x = patch({"x": x, "transformer_options": transformer_options})
            out = None  # a new output, as stock's: a patch may keep the tensor it returned
        else:
            out = x
        with weights_fetched_once(block, ("norm2", "ffn")):
            return run_stage([feed_forward], x, 1, chunks, settings.group_ops, out=out)
    return forward


def vace_block_forward(block: nn.Module, settings: SliceSettings) -> Callable:
    """A VACE block (VaceWanAttentionBlock): the sliced Wan block on its control stream `c`, which the
    first VACE block makes anew (before_proj(c) + x) and the caller replaces with the block's output,
    so the stream is written in place; the hint projection (after_proj) runs as stock."""
    sliced = wan_block_forward(block, settings.merged(caller_drops_input=True))

    def forward(c, x, **kwargs):
        if block.block_id == 0:
            c = block.before_proj(c) + x
        c = sliced(c, **kwargs)
        return block.after_proj(c), c
    return forward


def context_projections_once(cross_attention: nn.Module) -> dict:
    """Patches (for core.patching) under which the host's own cross-attention, called once per token
    chunk, projects the text (and CLIP image) tokens' keys and values once: handed the tensor it was
    last handed (the same view of the same base tensor, not written since), the value layer returns
    its last output and the key layer its last normed output (which its norm then passes through),
    so no more is held than the stock block holds. The same layers on the same input give the same
    result."""
    patches = {}
    for suffix in ("", "_img"):
        key, norm, value = (getattr(cross_attention, name + suffix, None) for name in ("k", "norm_k", "v"))
        if all(isinstance(layer, nn.Module) for layer in (key, norm, value)):
            key_forward, norm_forward = _normed_keys_kept(key, norm)
            patches.update({f"k{suffix}.forward": key_forward, f"norm_k{suffix}.forward": norm_forward,
                            f"v{suffix}.forward": _last_result_kept(value)})
    return patches


def _input_key(x: torch.Tensor) -> tuple:
    base = x if x._base is None else x._base  # (held by the caller, so its id is not reused meanwhile)
    # (inference tensors keep no version counter; nothing writes to them under inference mode)
    return (id(base), x.storage_offset(), x.shape, x.stride(), x.dtype, x.device,
            None if x.is_inference() else x._version)


def _last_result_kept(layer: nn.Module) -> Callable:
    forward = layer.forward
    kept = {}

    def call(x):
        if kept.get("key") != _input_key(x):
            kept.update(key=_input_key(x), input=x, out=forward(x))
        return kept["out"]
    return call


def _normed_keys_kept(key_layer: nn.Module, norm_layer: nn.Module) -> tuple:
    """The pair of forwards for `norm(key(context))` that keeps only the normed keys."""
    key_forward, norm_forward = key_layer.forward, norm_layer.forward
    kept = {}

    def key(x):
        if kept.get("key") == _input_key(x) and "normed" in kept:
            return kept["normed"]
        kept.clear()
        raw = key_forward(x)
        kept.update(key=_input_key(x), input=x, raw=weakref.ref(raw))
        return raw

    def norm(x):
        if kept.get("normed") is x:
            return x
        normed = norm_forward(x)
        if "raw" in kept and kept.pop("raw")() is x:
            kept["normed"] = normed
        return normed
    return key, norm


def project_keys_values(attention: nn.Module, inputs: Callable, slices: list, rope_at: Callable, carry,
                        like: torch.Tensor) -> tuple:
    """Roped keys and values of every token, projected chunk by chunk (`inputs(s)`: the attention's
    input for tokens `s`) into two full contiguous buffers. With a DualParal feature cache (`carry`,
    core/kv_carry.py) the kept tokens' raw keys and values are kept, and the held ones of the
    neighbouring block are appended after the own tokens."""
    apply_rope1 = host_function(attention, "apply_rope1")
    heads, head_dim = attention.num_heads, attention.head_dim
    batch, tokens = like.shape[0], slices[-1].stop
    appended = carry.appended_tokens if carry else 0
    k, v = (like.new_empty((batch, tokens + appended, heads * head_dim)) for _ in range(2))
    for s in slices:
        h = inputs(s)
        k_raw, v[:, s] = attention.norm_k(attention.k(h)), attention.v(h)
        if carry:
            carry.keep_part(s, k_raw, v[:, s])
        k[:, s] = apply_rope1(k_raw.view(batch, -1, heads, head_dim), rope_at(s)).flatten(2)
        del h, k_raw
    if carry:
        carry.fill_appended(k[:, tokens:], v[:, tokens:], apply_rope1, heads)
    return k, v


def patched_self_attention(x: torch.Tensor, attend: Callable, slices: list, k: torch.Tensor, heads: int,
                           head_dim: int, patches: list, transformer_options: dict) -> torch.Tensor:
    """The self-attention output of all tokens (before the output projection) after the block's
    `attn1_patch` hooks, which get it whole with the roped queries and keys, as in stock
    WanSelfAttention.forward. Queries and outputs are gathered chunk by chunk."""
    batch, tokens = x.shape[:2]
    queries = attended = None
    for s in slices:
        q, y = attend(x[:, s], s)
        if attended is None:
            queries = q.new_empty((batch, tokens, heads, head_dim))
            attended = y.new_empty((batch, tokens, y.shape[2]))
        queries[:, s], attended[:, s] = q, y
        del q, y
    keys = k.view(batch, -1, heads, head_dim)
    for patch in patches:
        attended = patch({"x": attended, "q": queries, "k": keys, "transformer_options": transformer_options})
    return attended
