"""How each block's call is cut down to a probe: a few frames or tokens and a small spatial crop
of the real inputs, and the probe's slicing settings (PROBES: maker of a sliced forward -> Probe)."""
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...kv_carry import KV_CARRY
from ..settings import SliceSettings

SPATIAL_SHARE = 16  # a probe keeps about 1/16 of each spatial axis (1/256 of the positions) ...
MIN_SIDE = 2  # ... but at least 2 positions, so strips and bands have a border to cross
# the whole SVD UNet's probe (its blocks sliced too) keeps at least 4 x 16 latents: after its three
# downsamplings still 2 positions wide, so the deepest blocks' strips and bands have a border to cross
UNET_MIN_SIDES = (4, 16)
FRAME_LOCAL_FRAMES = 3  # frames of a frame-local module's probe (chunks of 2 and 1)
VIDEO_FRAMES = 5  # latent frames of a video decoder's probe: the Wan VAE's first frame and two runs
PROBE_TOKENS = 256  # tokens of a DiT block's probe (per-frame modulation: 2 frames of 128)
# a whole DiT's probe: latent frames and rows / columns kept (Wan's 2x2 patches: 2 x 4 x 4 tokens)
WHOLE_MODEL_FRAMES, WHOLE_MODEL_SIDE = 2, 8
WHOLE_MODEL_TEXT_TOKENS = 16  # of the text context, raw (wider than the model: 4096 features for Wan)
PROBE_CHUNKS = 2  # frame / token chunks and strips / bands of a probe: a border each (fewer where an axis is shorter)


class Call:
    """A call's arguments by parameter name of the stock forward's signature, to cut into a probe."""

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        self.signature = signature
        self.bound = signature.bind(*args, **kwargs)
        self.extra = next((name for name, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)

    def _holder(self, name: str) -> Optional[dict]:
        if name in self.bound.arguments:
            return self.bound.arguments
        extra = self.bound.arguments.get(self.extra) if self.extra else None
        return extra if extra is not None and name in extra else None

    def get(self, name: str, default=None):
        holder = self._holder(name)
        return default if holder is None else holder[name]

    def set(self, name: str, value) -> None:
        """Changes an argument the call was given (an argument it was not given stays absent)."""
        holder = self._holder(name)
        if holder is not None:
            holder[name] = value

    @property
    def first(self) -> str:
        return next(iter(self.signature.parameters))

    def copy(self) -> "Call":
        """A copy with its own tensors and dicts (replacements may write their input in place)."""
        def own(value):
            if isinstance(value, torch.Tensor):
                return value.clone()
            if isinstance(value, dict):
                return {k: own(v) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
                return type(value)(own(v) for v in value)
            return value
        return Call(self.signature, tuple(own(a) for a in self.bound.args),
                    {k: own(v) for k, v in self.bound.kwargs.items()})

    def run(self, function: Callable):
        return function(*self.bound.args, **self.bound.kwargs)


def _side(length: int, minimum: int = MIN_SIDE) -> int:
    return min(length, max(minimum, -(-length // SPATIAL_SHARE)))


def _crop(x: torch.Tensor, dims: tuple, minimum=MIN_SIDE) -> torch.Tensor:
    """`minimum`: the least positions kept, for all `dims` or one per dim."""
    minimums = minimum if isinstance(minimum, tuple) else (minimum,) * len(dims)
    for dim, least in zip(dims, minimums):
        x = x.narrow(dim, 0, _side(x.shape[dim], least))
    return x


def _rows(value, rows: slice, batch: int):
    """The rows of a per-sample side input (embedding, context) that belong to the probe."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def _own_options(call: Call, drop=()) -> None:
    """A probe gets its own transformer_options (blocks write into theirs), without `drop`."""
    options = call.get("transformer_options")
    if isinstance(options, dict):
        call.set("transformer_options", {k: v for k, v in options.items() if k not in drop})


def _first_video(call: Call, x_name: str, frames: int, side: tuple, minimum=MIN_SIDE) -> Optional[Call]:
    """The first video (its `frames` rows of the batch*frames axis), all its frames, a small spatial crop."""
    x = call.get(x_name)
    batch = x.shape[0]
    if not frames or batch % frames:
        return None
    rows = slice(0, frames)
    call.set(x_name, _crop(x[rows], (2, 3), minimum))
    for name in side:
        call.set(name, _rows(call.get(name), rows, batch))
    indicator = call.get("image_only_indicator")
    if isinstance(indicator, torch.Tensor) and indicator.ndim == 2:
        call.set("image_only_indicator", indicator[:1])
    _own_options(call)
    return call


def comfy_video_block(frames_name: str, side: tuple) -> Callable:
    """ComfyUI's VideoResBlock (frames: num_video_frames) and SpatialVideoTransformer (timesteps)."""
    return lambda owner, call: _first_video(call, "x", call.get(frames_name), side)


def diffusers_video_block(side: tuple) -> Callable:
    """diffusers' SpatioTemporalResBlock and TransformerSpatioTemporalModel (frames from image_only_indicator)."""
    def cut(owner, call):
        indicator = call.get("image_only_indicator")
        return None if indicator is None else _first_video(call, "hidden_states", indicator.shape[-1], side)
    return cut


def frame_local(owner, call):
    """Any module that treats every frame on its own: 3 frames, a small spatial crop."""
    name = call.first
    x = call.get(name)
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        return None
    batch, rows = x.shape[0], slice(0, min(x.shape[0], FRAME_LOCAL_FRAMES))
    call.set(name, _crop(x[rows], {4: (2, 3), 5: (3, 4)}.get(x.ndim, ())))
    for other in list(call.signature.parameters)[1:]:
        if other in ("output_shape", "output_size"):  # the full-size target of an upsampling
            call.set(other, None)
        else:
            call.set(other, _rows(call.get(other), rows, batch))
    return call


def svd_unet(owner, call):
    """The whole SVD UNet (its skip fusion and head, and its blocks): the first video, all frames, a small crop."""
    if call.get("control") is not None:  # ControlNet residuals are full-size: check on a later call
        return None
    x = call.get("x")
    return _first_video(call, "x", call.get("num_video_frames") or x.shape[0],
                        ("timesteps", "context", "y", "time_context"), UNET_MIN_SIDES)


def _few_frames(call: Call, x_name: str, frames: Optional[int], time_dim: Optional[int] = None) -> tuple:
    """(the call cut to the first VIDEO_FRAMES frames (of the batch*frames axis, or of `time_dim`) and a
    small crop, how many frames it keeps)."""
    x = call.get(x_name)
    if time_dim is None:  # b*t c h w: the first video's first frames
        count = min(frames if isinstance(frames, int) and frames > 0 else x.shape[0], VIDEO_FRAMES)
        call.set(x_name, _crop(x[:count], (2, 3)))
    else:  # b c t h w
        count = min(x.shape[time_dim], VIDEO_FRAMES)
        call.set(x_name, _crop(x[:1].narrow(time_dim, 0, count), (3, 4), 4))
    return call, count


def svd_decoder(owner, call):
    """ComfyUI's VideoDecoder forward(z, **kwargs): a 5-frame video, a small crop."""
    timesteps = call.get("timesteps")
    call, count = _few_frames(call, "z", timesteps)
    if isinstance(timesteps, int):
        call.set("timesteps", count)
    return call


def svd_decoder_block(x_name: str) -> Callable:
    """ComfyUI's decoder VideoResBlock (x, temb, skip_video, timesteps) and AE3DConv (input, timesteps, ...)."""
    def cut(owner, call):
        timesteps = call.get("timesteps")
        batch = call.get(x_name).shape[0]
        call, count = _few_frames(call, x_name, timesteps)
        call.set("temb", _rows(call.get("temb"), slice(0, count), batch))
        if isinstance(timesteps, int):
            call.set("timesteps", count)
        return call
    return cut


def wan_vae(owner, call):
    """WanVAE.decode(z): the first sample, 5 latent frames (the first alone and two runs of two), a
    crop at least 4 latents wide each way (two strips with halos)."""
    return _few_frames(call, "z", None, time_dim=2)[0]


def diffusers_temporal_decoder(owner, call):
    """TemporalDecoder forward(sample, image_only_indicator, num_frames)."""
    frames = call.get("num_frames")
    call, count = _few_frames(call, "sample", frames)
    call.set("num_frames", count)
    indicator = call.get("image_only_indicator")
    if isinstance(indicator, torch.Tensor) and indicator.ndim == 2:
        call.set("image_only_indicator", indicator[:1, :count])
    return call


def time_conv(owner, call):
    """A time-only Conv3d on b c t h w."""
    return _few_frames(call, call.first, None, time_dim=2)[0]


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
    call.set("context", _rows(call.get("context"), slice(0, 1), batch))
    _own_options(call, drop=(KV_CARRY,))  # DualParal's feature cache is not the probe's
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
        call.set(timestep_name, _rows(timestep, slice(0, 1), batch))
    call.set(call.first, x[:1, :, :kept[0], :kept[1], :kept[2]])
    arguments = dict(call.bound.arguments)
    arguments.update(arguments.pop(call.extra, None) or {})
    for name, value in arguments.items():
        if name not in (call.first, timestep_name, "transformer_options"):
            call.set(name, _video_part(value, batch, (frames, height, width), kept))
    context = call.get("context")
    if isinstance(context, torch.Tensor) and context.ndim == 3:  # raw text features: 4096 wide for Wan's 512
        call.set("context", context[:, :WHOLE_MODEL_TEXT_TOKENS])
    _own_options(call, drop=(KV_CARRY, "wrappers", "callbacks"))
    return call


@dataclass(frozen=True)
class Probe:
    """`cut(owner, call)` turns the real call (a Call bound to stock's signature) into the probe's,
    or returns None where this call cannot be cut (checked on a later call). `group`: the maker's
    other patches are this one's companions (checked with it, running as it is decided), and the
    checked blocks inside its module are its members: its first probe runs them all sliced, so one
    probe checks the whole model; only where that differs from stock does each block get its own.
    `caller`: a group whose own patch passes through (whole_model.caller_forward): where its first
    probe differs from stock, the blocks are wrong in their caller though each may be exact alone,
    so every member falls back to stock."""
    cut: Callable
    group: bool = False
    caller: bool = False


UNCHECKED_PROBE = None  # a row whose blocks run unchecked (logged once at debug level)
_MISSING = Probe(lambda owner, call: None)  # a maker the table lacks: unchecked, with a warning (a bug)

# maker of a sliced forward (registry.FAMILIES) -> its probe
PROBES = {
    # ComfyUI SVD UNet
    "unet_patches": Probe(svd_unet, group=True),
    "video_resblock_forward": Probe(comfy_video_block("num_video_frames", ("emb",))),
    "spatial_video_transformer_forward": Probe(comfy_video_block("timesteps", ("context", "time_context"))),
    "frame_local_forward": Probe(frame_local),
    # ComfyUI SVD temporal VAE decoder
    "video_decoder_forward": Probe(svd_decoder),
    "decoder_video_resblock_forward": Probe(svd_decoder_block("x")),
    "video_conv_forward": Probe(svd_decoder_block("input")),
    # Wan
    "wan_vae_decode": Probe(wan_vae),
    "wan_block_forward": Probe(wan_block),
    "vace_block_forward": Probe(vace_block),
    "caller_forward": Probe(dit_model, group=True, caller=True),
    # diffusers SVD
    "spatio_temporal_resblock_forward": Probe(diffusers_video_block(("temb",))),
    "transformer_spatio_temporal_forward": Probe(diffusers_video_block(("encoder_hidden_states",))),
    "temporal_decoder_forward": Probe(diffusers_temporal_decoder),
    "time_conv_forward": Probe(time_conv),
}


@dataclass(frozen=True)
class ProbeSettings(SliceSettings):
    """A probe's settings: PROBE_CHUNKS slices wherever an axis holds them, quietly fewer where it does
    not (the user's own counts keep their clamp warnings)."""

    @classmethod
    def of(cls, settings: SliceSettings) -> "ProbeSettings":
        return cls(**{**vars(settings), "frame_chunks": PROBE_CHUNKS, "strip_chunks": PROBE_CHUNKS})

    def frames(self, length: int, frame_elements: int = 0) -> int:
        return max(1, min(self.frame_chunks, length))

    def strips(self, length: int) -> int:
        return max(1, min(self.strip_chunks, length))

    def tokens(self, length: int, width: int) -> int:
        return max(1, min(self.frame_chunks, length))

    def bands(self, positions: int, channels: int) -> int:
        return max(1, min(self.strip_chunks, positions))


def maker_of(replacement) -> str:
    """The function that made a sliced forward (its closure's outer function)."""
    return getattr(replacement, "__qualname__", "").split(".<locals>")[0]

