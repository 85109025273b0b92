"""One rank's part of ComfyUI's Wan DiT (wan/model.py WanModel), recognised by its structure.

The first rank embeds the latent patches, every rank runs its contiguous range of transformer
blocks, the last rank runs the head. The pieces are the model's own modules and methods, called the
way WanModel.forward_orig calls them, so a single rank computes what the stock forward computes.
"""
import copy
import importlib
import inspect
import json
from contextlib import ExitStack, contextmanager
from typing import Optional

import torch
from torch import nn

from ..kv_carry import KV_CARRY, KVCarry
from ..patching import patches_applied
from ..slicing import slicing_applied
from ..slicing.registry import FAMILIES, caller_of, plain_root
from ..slicing.wan import project_keys_values
from ..host import host_function
from .memory import peak_memory
from .schedule import DualParalError, Job
from .wire import MalformedMessage, dtype_from_name, dtype_name


def check_supported(model: nn.Module, latent_shape: tuple, image_channels: int = 0) -> None:
    """`image_channels`: of the image conditioning concatenated to the input (WanImageToVideo's)."""
    family, caller = caller_of(model)  # the family's own root class: subclasses (VACE, camera) run other forwards
    if (family is None or not family.pipeline_parts or not plain_root(family, caller)
            or not all(hasattr(model, part) for part in family.pipeline_parts)):
        loaded = f"{caller.title} ({caller.name})" if caller else type(model).__name__
        raise DualParalError(f"DualParal runs ComfyUI's plain Wan 2.1 / 2.2 DiT (text- or image-to-video); this MODEL "
                             f"is {loaded}, whose forward takes inputs of its own that the ranks do not run. Use "
                             f"KSampler for it (Feature Slicer + Operator Grouper lower its memory where they "
                             f"support it).")
    if model.patch_embedding.in_channels != model.out_dim + image_channels:
        raise DualParalError(f"the model takes {model.patch_embedding.in_channels} input channels, the latent and its "
                             f"image conditioning give {model.out_dim + image_channels}: an image-to-video model "
                             f"needs WanImageToVideo's conditioning, a text-to-video model none.")
    channels, height, width = latent_shape[1], latent_shape[3], latent_shape[4]
    if channels != model.out_dim:
        raise DualParalError(f"the latent has {channels} channels, the model takes {model.out_dim}: make it with "
                             f"the latent node for this model (Wan 2.1: 16 channels, Wan 2.2 5B: 48).")
    _, patch_h, patch_w = model.patch_size
    if height % patch_h or width % patch_w:
        raise DualParalError(f"the latent is {height}x{width}; DualParal needs multiples of the model's patch "
                             f"size {patch_h}x{patch_w} (images of a multiple of {8 * patch_h} pixels).")


def _structure(model: nn.Module) -> dict:
    return {"class": type(model).__name__, "layers": len(model.blocks), "width": model.dim,
            "heads": model.num_heads, "input channels": model.patch_embedding.in_channels,
            "output channels": model.out_dim, "patch": tuple(model.patch_size),
            "image embedding": getattr(model, "img_emb", None) is not None}


def check_experts_match(high: nn.Module, low: nn.Module) -> None:
    """The two experts of a Wan 2.2 A14B model share one structure (every rank runs the same layers
    of each)."""
    ours, theirs = _structure(high), _structure(low)
    differences = [f"{name} {ours[name]} vs {theirs[name]}" for name in ours if ours[name] != theirs[name]]
    if differences:
        raise DualParalError(f"the low-noise expert does not match the model ({', '.join(differences)}): give the two "
                             f"experts of one Wan 2.2 A14B model (e.g. wan2.2_t2v_high_noise_14B and "
                             f"wan2.2_t2v_low_noise_14B, or the i2v pair).")


def check_sendable(model: nn.Module) -> None:
    """A worker process is sent its layers by pickling, which needs every layer class importable by
    name; ComfyUI makes fp8-scaled and quantized layer classes inside functions."""
    local = sorted({type(m).__qualname__ for m in model.modules() if "<locals>" in type(m).__qualname__})
    if local:
        raise DualParalError(f"the model's layers include {local[0]} (fp8-scaled or quantized weights), which "
                             f"DualParal cannot send to its worker processes: load the fp16 / bf16 files of the "
                             f"model (e.g. ..._14B_fp16.safetensors instead of ..._fp8_scaled), or give DualParal "
                             f"ComfyUI's own device only (it then runs in ComfyUI's process).")


def plain_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer, without instance-level forward
    overrides (ComfyUI object patches): what a worker process can be sent and patch by itself."""
    clone = copy.copy(module)
    clone.__dict__.pop("forward", None)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if child is None else plain_copy(child) for name, child in module._modules.items()}
    return clone


def rank_model(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """The parts of `model` one rank runs: its blocks, the patch embedding on the first rank, the head
    on the last; the time and text embeddings everywhere (every rank modulates its blocks)."""
    part = plain_copy(model)
    part.blocks = nn.ModuleList(list(part.blocks)[layers.start:layers.stop])
    if not first:
        part.patch_embedding = None
    if not last:
        part.head = None
    return part


# The host's own layer classes a cluster rank builds with (weights in the compute dtype, or cast to
# it on every call); the model classes come from the family table.
RANK_MODEL_OPERATIONS = ("disable_weight_init", "manual_cast")
NOT_CONSTRUCTOR_ARGUMENTS = ("dtype", "device", "operations")


def rank_model_description(model: nn.Module, config: dict, layers: range, first: bool, last: bool) -> dict:
    """JSON that a cluster rank rebuilds `rank_model(...)` from (`rebuild_rank_model`); `config`:
    the host's constructor arguments of the model (ComfyUI's unet_config)."""
    operations = type(model.text_embedding[0]).__qualname__.split(".")[0]
    if operations not in RANK_MODEL_OPERATIONS:
        raise DualParalError(f"the model's layers are {type(model.text_embedding[0]).__qualname__} (quantized or "
                             f"scaled weights), which a cluster cannot be sent: load the model with weight_dtype "
                             f"default (fp16 / bf16 weights).")
    arguments = {k: v for k, v in config.items() if k not in NOT_CONSTRUCTOR_ARGUMENTS}
    try:
        json.dumps(arguments, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise DualParalError(f"the model's configuration cannot be sent to a cluster ({error})") from None
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "operations": operations,
            "config": {**arguments, "num_layers": len(layers)}, "first": first, "last": last,
            "weight_dtype": dtype_name(model.text_embedding[0].weight.dtype)}


def rebuild_rank_model(description: dict, state_dict: dict) -> nn.Module:
    """The rank's part of the model from a peer's description and weights: only classes this table
    names are built, with constructor arguments the class takes, and every weight must fit."""
    if not isinstance(description, dict):
        raise MalformedMessage("a model description that is not an object")
    class_path = description.get("class")
    if class_path not in {c for family in FAMILIES for c in family.pipeline_classes} or description.get("operations") not in RANK_MODEL_OPERATIONS:
        raise MalformedMessage(f"a request to build {class_path!r} with {description.get('operations')!r} layers, "
                               f"which a DualParal rank does not build")
    module_name, class_name = class_path.rsplit(".", 1)
    model_class = getattr(importlib.import_module(module_name), class_name)
    operations = getattr(importlib.import_module("comfy.ops"), description["operations"])
    config = description.get("config")
    accepted = set(inspect.signature(model_class).parameters) - set(NOT_CONSTRUCTOR_ARGUMENTS)
    if not isinstance(config, dict) or not set(config) <= accepted:
        raise MalformedMessage(f"constructor arguments {sorted(set(config or {}) - accepted)} that "
                               f"{class_name} does not take (ComfyUI of another version on the cluster?)")
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    with torch.device("meta"):
        model = model_class(**arguments, dtype=dtype_from_name(description.get("weight_dtype")),
                            operations=operations)
    if not description.get("first"):
        model.patch_embedding = None
    if not description.get("last"):
        model.head = None
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise MalformedMessage(f"weights that do not fit {class_name}: {str(error)[:300]}") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise MalformedMessage(f"{class_name} holds tensors its weights do not fill")
    return model


def carrying_self_attention(attention: nn.Module):
    """WanSelfAttention.forward with the DualParal feature cache (stock blocks call it; sliced blocks
    handle the cache themselves)."""
    optimized_attention = host_function(attention, "optimized_attention")
    apply_rope1 = host_function(attention, "apply_rope1")
    stock_forward = type(attention).forward

    def forward(x, freqs, transformer_options={}):
        carry = transformer_options.get(KV_CARRY)
        if carry is None:
            return stock_forward(attention, x, freqs, transformer_options=transformer_options)
        batch, tokens = x.shape[:2]
        heads, head_dim = attention.num_heads, attention.head_dim
        q = apply_rope1(attention.norm_q(attention.q(x)).view(batch, tokens, heads, head_dim), freqs).flatten(2)
        k, v = project_keys_values(attention, lambda s: x[:, s], [slice(0, tokens)], lambda s: freqs, carry, x)
        return attention.o(optimized_attention(q, k, v, heads=heads, transformer_options=transformer_options))
    return forward


def feature_cache_installed(blocks: nn.ModuleList):
    """The blocks' self-attention carries the feature cache inside the with-block only."""
    return patches_applied(blocks, {f"{index}.self_attn.forward": carrying_self_attention(block.self_attn)
                                    for index, block in enumerate(blocks)})


@contextmanager
def rank_prepared(blocks_per_expert: list, slicing, device: torch.device, stats):
    """A rank's blocks (of each expert) carrying the feature cache and, with `slicing`
    (SliceSettings), sliced; gradients off; the rank's peak memory recorded into `stats`."""
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for blocks in blocks_per_expert:
            stack.enter_context(feature_cache_installed(blocks))
            if slicing is not None:  # WanStage.layers drops each block's input: the blocks may write into it
                stack.enter_context(slicing_applied(blocks, slicing.merged(caller_drops_input=True)))
        stack.enter_context(peak_memory(device, stats))
        yield


class WanStage:
    """Runs one rank's part of the model for the jobs of a BlockPlan on a (height, width) latent."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, height: int, width: int):
        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        self.first, self.last = model.patch_embedding is not None, model.head is not None
        self.height, self.width = height, width
        _, patch_h, patch_w = model.patch_size
        self.grid = (height // patch_h, width // patch_w)
        self.tokens_per_frame = self.grid[0] * self.grid[1]
        self.carries = [KVCarry() for _ in model.blocks]
        self._sinusoidal = host_function(model, "sinusoidal_embedding_1d")
        self._time = {}
        self.context_img_len = None

    def text(self, context: torch.Tensor, clip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The blocks' cross-attention context, as forward_orig makes it (CLIP image tokens first)."""
        context = self.model.text_embedding(context.to(self.device, self.dtype))
        self.context_img_len = None if clip is None else clip.shape[-2]
        if clip is not None and getattr(self.model, "img_emb", None) is not None:
            context = torch.concat([self.model.img_emb(clip.to(self.device, self.dtype)), context], dim=1)
        return context

    def time(self, timestep: float, batch: int, factors: Optional[tuple] = None) -> tuple:
        """(e, e0) of forward_orig for one timestep, or one per frame (`factors`: each frame's share of
        it, Wan 2.2 TI2V-5B's denoise mask), cached per timestep."""
        key = (timestep, batch, factors)
        if key not in self._time:
            scale = torch.tensor(factors if factors is not None else (1.0,), dtype=torch.float32, device=self.device)
            t = timestep * scale.expand(batch, -1)
            e = self.model.time_embedding(self._sinusoidal(self.model.freq_dim, t.flatten()).to(dtype=self.dtype))
            e = e.reshape(batch, -1, e.shape[-1])
            self._time = {key: (e, self.model.time_projection(e).unflatten(2, (6, self.model.dim)))}
        return self._time[key]

    def hidden_shape(self, job: Job, batch: int) -> tuple:
        return (batch, (job.context_frames + job.frames) * self.tokens_per_frame, self.model.dim)

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.model.patch_embedding(latents.to(self.device, self.dtype).float()).to(self.dtype)
        return x.flatten(2).transpose(1, 2)

    def layers(self, hidden: torch.Tensor, job: Job, e0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        per_frame = self.tokens_per_frame
        tokens = hidden.shape[1]
        freqs = self.model.rope_encode(job.context_frames + job.frames + job.appended_frames, self.height,
                                       self.width, device=self.device, dtype=self.dtype)
        start = job.context_frames * per_frame
        keep = slice(start, start + job.keep_frames * per_frame) if job.keep_frames else None
        held_freqs = freqs[:, tokens:] if job.appended_frames else None
        for block, carry in zip(self.model.blocks, self.carries):
            carry.plan(keep, held_freqs)
            hidden = block(hidden, e=e0, freqs=freqs[:, :tokens], context=context, context_img_len=self.context_img_len,
                           transformer_options={KV_CARRY: carry})
        return hidden

    def head(self, hidden: torch.Tensor, job: Job, e: torch.Tensor) -> torch.Tensor:
        """The model's prediction for the job's own frames (float32, like ComfyUI's apply_model)."""
        own = hidden[:, job.context_frames * self.tokens_per_frame:]
        if e.shape[1] > 1:  # one timestep per frame: the head modulates the job's own frames
            e = e[:, -job.frames:]
        return self.model.unpatchify(self.model.head(own, e), (job.frames, *self.grid)).float()
