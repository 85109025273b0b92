"""The Wan 2.1 / 2.2 family in ComfyUI: the DiT (WanAttentionBlock, VACE's blocks, the whole model as
their caller), the root classes ComfyUI ships, and the VAE: their table rows and how their calls are
cut into probes."""
from typing import Optional

import torch
from torch import nn

from ...host import derives_from
from ...kv_carry import KV_CARRY
from .. import wan_vae, workloads
from ..self_check.probes import PROBE_CHUNKS, Call, Probe, few_frames, first_rows, own_options
from ..settings import SliceSettings
from ..wan import vace_block_forward, wan_block_forward
from ..whole_model import caller_forward
from .rows import BlockRule, Caller, Family, UnsupportedModelError, is_block


PROBE_TOKENS = 256  # tokens of a DiT block's probe (per-frame modulation: 2 frames of 128)


# a whole DiT's probe: latent frames and rows / columns kept (Wan's 2x2 patches: 2 x 4 x 4 tokens)
WHOLE_MODEL_FRAMES, WHOLE_MODEL_SIDE = 2, 8


WHOLE_MODEL_TEXT_TOKENS = 16  # of the text context, raw (wider than the model: 4096 features for Wan)


def wan_vae_decoder(owner, call):
    """WanVAE.decode(z): the first sample, 5 latent frames (the first alone and two runs of two), a
    crop at least 4 latents wide each way (two strips with halos)."""
    return few_frames(call, "z", None, time_dim=2)[0]


def _wan_tokens(call: Call, stream: str) -> Optional[torch.Tensor]:
    """Cuts a Wan block's call to its probe: the first sample of `stream`, PROBE_TOKENS tokens, at most
    a quarter of the call's (with per-frame modulation, the first tokens of two frames, with those
    frames' modulation rows), with their RoPE rows; the whole context. The tokens kept, or None."""
    x, e, freqs = call.get(stream), call.get("e"), call.get("freqs")
    batch, tokens = x.shape[:2]
    budget = min(PROBE_TOKENS, max(PROBE_CHUNKS, tokens // 4))  # never stock on more than a quarter of the call
    if e.ndim == 4 and 1 < e.shape[1] < tokens:  # one modulation row per latent frame, as repeat_e expands it
        rows = e.shape[1]
        per_row = tokens // rows if (tokens // rows) * rows == tokens else tokens // rows + 1
        frames = min(rows, 2)
        count = min(per_row, max(1, budget // frames))
        index = torch.cat([torch.arange(f * per_row, min(f * per_row + count, tokens)) for f in range(frames)])
        if len(index) != frames * count:
            return None
        e = e[:1, :frames]
    else:
        index = torch.arange(min(tokens, budget))
        e = e[:1, index.to(e.device)] if e.ndim == 4 and e.shape[1] == tokens else e[:1]
    index = index.to(x.device)
    call.set(stream, x[:1, index])
    call.set("e", e)
    if isinstance(freqs, torch.Tensor) and freqs.ndim > 1 and freqs.shape[1] == tokens:
        call.set("freqs", freqs[:1, index.to(freqs.device)])
    elif isinstance(freqs, torch.Tensor) and freqs.ndim > 1 and freqs.shape[1] != 1:
        return None  # RoPE rows that do not match the tokens one to one (carried tokens): not cut here
    call.set("context", first_rows(call.get("context"), slice(0, 1), batch))
    own_options(call, drop=(KV_CARRY,))  # DualParal's feature cache is not the probe's
    return index


def wan_block(owner, call):
    """WanAttentionBlock: see _wan_tokens."""
    return None if _wan_tokens(call, "x") is None else call


def vace_block(owner, call):
    """VaceWanAttentionBlock: its control stream `c` cut as a Wan block's input, and the main stream
    `x` (which the first VACE block adds to it) to the same tokens."""
    x, tokens = call.get("x"), call.get("c").shape[1]
    index = _wan_tokens(call, "c")
    if index is None or not isinstance(x, torch.Tensor) or x.shape[1] != tokens:
        return None
    call.set("x", x[:1, index])
    return call


def _video_part(value, batch: int, grid: tuple, kept: tuple):
    """A side input of a whole-model call cut like its latent: the first sample, and along its last
    three axes the latent's kept frames, rows and columns where those axes are the latent's (or the
    pixels' of its frames, 4 per latent frame after the first and 8 per latent side)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_video_part(v, batch, grid, kept) for v in value)
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    if value.shape[0] == batch:
        value = value[:1]
    if value.ndim >= 5:
        frames, height, width = grid
        pixel_frames = 4 * (frames - 1) + 1
        for axis, length, keep, pixels, pixel_keep in zip(
                (-3, -2, -1), grid, kept, (pixel_frames, 8 * height, 8 * width),
                (4 * (kept[0] - 1) + 1, 8 * kept[1], 8 * kept[2])):
            if value.shape[axis] == length:
                value = value.narrow(axis, 0, keep)
            elif value.shape[axis] == pixels:
                value = value.narrow(axis, 0, pixel_keep)
    return value


def dit_model(owner, call):
    """A whole video DiT (the caller of its blocks): the first sample, WHOLE_MODEL_FRAMES latent frames
    and WHOLE_MODEL_SIDE rows and columns of its latent, every side input cut alike (VACE context,
    camera, pose, references, time-concatenated frames), the first WHOLE_MODEL_TEXT_TOKENS text tokens; its own
    transformer_options without wrappers and callbacks (which hold the sampling's state)."""
    x = call.get(call.first)
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or call.get("control") is not None:
        return None
    batch, _, frames, height, width = x.shape
    kept = (min(frames, WHOLE_MODEL_FRAMES), min(height, WHOLE_MODEL_SIDE), min(width, WHOLE_MODEL_SIDE))
    timestep_name = list(call.signature.parameters)[1]
    timestep = call.get(timestep_name)
    if isinstance(timestep, torch.Tensor) and timestep.ndim > 1 and timestep.shape[1] > 1:
        if timestep.shape[1] != frames:
            return None  # one timestep per token: the blocks are checked one by one
        call.set(timestep_name, timestep[:1, :kept[0]])
    else:
        call.set(timestep_name, first_rows(timestep, slice(0, 1), batch))
    call.set(call.first, x[:1, :, :kept[0], :kept[1], :kept[2]])
    arguments = dict(call.bound.arguments)
    arguments.update(arguments.pop(call.extra, None) or {})
    for name, value in arguments.items():
        if name not in (call.first, timestep_name, "transformer_options"):
            call.set(name, _video_part(value, batch, (frames, height, width), kept))
    context = call.get("context")
    if isinstance(context, torch.Tensor) and context.ndim == 3:  # raw text features: 4096 wide for Wan's 512
        call.set("context", context[:, :WHOLE_MODEL_TEXT_TOKENS])
    own_options(call, drop=(KV_CARRY, "wrappers", "callbacks"))
    return call


def _wan_vae_decode(vae: nn.Module, settings: SliceSettings) -> dict:
    try:
        return {"decode": wan_vae.wan_vae_decode(vae, settings)}
    except wan_vae.UnsupportedDecoderError as error:
        raise UnsupportedModelError(f"this Wan VAE's decoder cannot be sliced exactly: {error}") from None


WAN_CALLERS = (
    Caller("WanModel", "Wan 2.1 / 2.2 (text / image-to-video, Fun, Bernini-R, InfiniteTalk)"),
    Caller("CameraWanModel", "Wan Fun Camera"),
    Caller("VaceWanModel", "Wan VACE", keeps_inputs=("blocks.0",),
           between_blocks="VACE adds its control hints to the stream after its blocks"),
    Caller("WanModel_S2V", "Wan 2.2 S2V", between_blocks="S2V injects audio into the stream between its blocks"),
    Caller("AnimateWanModel", "Wan 2.2 Animate",
           between_blocks="Animate adds its face adapter's output after every fifth block"),
    Caller("SCAILWanModel", "Wan SCAIL"),
    Caller("SCAIL2WanModel", "Wan SCAIL 2"),
    Caller("WanDancerModel", "WanDancer", between_blocks="WanDancer injects music into the stream between its blocks"),
    Caller("HumoWanModel", "Wan HuMo", refused="its blocks run an audio cross-attention of their own "
           "(WanAttentionBlockAudio), not covered yet"),
    Caller("WanAnimate2Model", "Wan Animate 2", refused="its blocks run separate pose and generation branches "
           "(forward_pose / forward_gen), not covered yet"),
    Caller("CausalWanModel", "Wan Causal Forcing", refused="its blocks keep a causal key/value cache "
           "across calls, not covered yet"),
)


FAMILIES = (
    Family(
        "Wan 2.1 / 2.2 VAE (ComfyUI wan/vae.py, wan/vae2_2.py: WanVAE)",
        signature=is_block("WanVAE", "decoder", "conv2"), root="WanVAE",
        rules=(BlockRule(is_block("WanVAE", "decoder", "conv2"), _wan_vae_decode),),
        decode_estimate=wan_vae.decode_estimate, input="VAE",
        probes={
            "wan_vae_decode": Probe(wan_vae_decoder),
        },
    ),
    Family(
        "Wan 2.1 / 2.2 DiT (ComfyUI wan/model.py: WanAttentionBlock)",
        signature=is_block("WanAttentionBlock", "self_attn", "cross_attn", "ffn", "modulation"),
        root="WanModel", block="WanAttentionBlock", callers=WAN_CALLERS,
        step_inputs=workloads.wan_step, finer_slicing=workloads.finer_token_chunks,
        repeated_stack="blocks", step_rehash="dit",
        pipeline_parts=("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head",
                        "rope_encode", "unpatchify", "patch_size", "freq_dim", "dim"),
        pipeline_classes=("comfy.ldm.wan.model.WanModel",),
        rules=(  # each block fetches its weights stage by stage
            BlockRule(lambda m: type(m).__name__ == "WanAttentionBlock",
                      lambda module, settings: {"forward": wan_block_forward(module, settings)}),
            BlockRule(lambda m: type(m).__name__ == "VaceWanAttentionBlock" and hasattr(m, "after_proj"),
                      lambda module, settings: {"forward": vace_block_forward(module, settings)}),
            # the whole model, so that a block exact alone but wrong in its caller falls back (self-check)
            BlockRule(lambda m: derives_from(m, "WanModel") and hasattr(m, "blocks"), caller_forward),
        ),
        probes={
            "wan_block_forward": Probe(wan_block),
            "vace_block_forward": Probe(vace_block),
            "caller_forward": Probe(dit_model, group=True, caller=True),
        },
    ),
)
