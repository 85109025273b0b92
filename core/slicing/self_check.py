"""Patches that check themselves (issue 17).

`slicing_patches` hands every replacement it makes to `checked`, which wraps it in a `Checker`. The
first time the patched module runs (once per patch made: per model instance, slicing settings and
host version, and again when a node makes its patches anew), the checker cuts the real call's
inputs down to a probe: a few frames or tokens and a small spatial crop of the real inputs, with
the real weights, on the module's device and dtype. Under no_grad it runs
the host's stock forward (the class's own `forward` / `decode`: what runs without the patch) and a
sliced forward made by the same maker with probe settings that cross chunk and strip borders on the
probe, and compares the two. Within tolerance, the installed sliced forward runs from then on;
beyond it, the stock forward does, and a warning naming the block (class and path) and the host
version goes to the log and to the listeners (the nodes put it on the slicing node and in the
Memory Monitor's report): a broken replacement costs memory, never silently wrong output.

A whole-model patch group (the SVD UNet: its skip fusion and head, Probe.group) is checked in one
probe with every checked block inside it sliced as well. Only where that differs from stock is each
part checked on its own: then every other checked module inside a probe runs stock (or, for the
parts of one patch group, the probe's own companion), so each check compares one replacement
against the host's code alone and the warning names the block that differs. A probe that runs out
of memory, or finds dropout active, leaves its block sliced and unchecked (with a warning); the
host's interrupt passes through.

What a probe of each block is comes from PROBES, keyed like the block table's rows
(registry.FAMILIES) by the maker of the sliced forward; a maker marked UNCHECKED runs unchecked
(logged once at debug level). Adding a family means adding its rows there too.
"""
import inspect
import logging
import os
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn

from ..kv_carry import KV_CARRY
from .settings import SliceSettings

log = logging.getLogger(__name__)

EXACT_TOLERANCE = 1e-5  # fp32 / fp64: max abs difference <= this x the stock output's max abs value
# fp16 / bf16, and fp32 where CUDA may compute it in TF32 (10-bit mantissa): the order of two stock
# runs on different kernels
LOW_PRECISION_TOLERANCE = 1e-2

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

PASSED, FELL_BACK, UNCHECKED, NOT_CHECKED = "passed", "fell back to stock", "unchecked", "not checked"

ENABLED = os.environ.get("STREAMLINE_SELF_CHECK", "1") != "0"  # STREAMLINE_SELF_CHECK=0: no probes at all


def host_version(module: Optional[nn.Module] = None) -> str:
    """The host's version, read without importing it: 'ComfyUI 0.3.75' (or 'ComfyUI unknown'),
    plus diffusers' version for a diffusers block."""
    comfy = getattr(sys.modules.get("comfyui_version"), "__version__", None)
    host = f"ComfyUI {comfy or 'unknown'}"
    if module is not None and type(module).__module__.startswith("diffusers"):
        host += f" / diffusers {getattr(sys.modules.get('diffusers'), '__version__', 'unknown')}"
    return host


# ---- results: a small registry the nodes read ------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    seq: int
    outcome: str  # PASSED, FELL_BACK, UNCHECKED or NOT_CHECKED
    block: str  # class of the patched module
    path: str  # its attribute path from the patched model ("" for the model itself)
    attribute: str  # the replaced attribute: "forward" or "decode"
    host: str
    detail: str
    tag: Optional[dict] = None  # who made the patch (the nodes: {"node": title, "node_id": id})
    seconds: float = 0.0  # wall time of the probe
    found_earlier: bool = False  # a fallback found in an earlier round, said again in this one (new_round)

    @property
    def fell_back(self) -> bool:
        return self.outcome == FELL_BACK

    @property
    def where(self) -> str:
        return f"{self.block} at {self.path or '<model>'} ({self.attribute})"

    def message(self) -> str:
        if self.found_earlier:
            return (f"Streamline self-check: {self.where} runs stock, as it has since it did not match "
                    f"{self.host}'s stock {self.attribute} on a probe ({self.detail}).")
        if self.fell_back:
            return (f"Streamline self-check: {self.where} does not match {self.host}'s stock {self.attribute} on a "
                    f"probe ({self.detail}); this block runs stock from now on (stock output, stock memory).")
        return f"Streamline self-check: {self.where} {self.outcome} on {self.host} ({self.detail})."


_results = deque(maxlen=1000)
_listeners = []
_seq = [0]
_said_this_round = set()  # the fallbacks (their first results' seq) said since new_round
_lock = threading.RLock()
_local = threading.local()


def new_round() -> None:
    """A new prompt begins: each block that fell back earlier says so again (log, listeners,
    `fallbacks`) the first time it runs in this round."""
    with _lock:
        _said_this_round.clear()


def _say_again(result: CheckResult) -> None:
    if result.seq in _said_this_round:
        return
    with _lock:
        if result.seq in _said_this_round:
            return
        _said_this_round.add(result.seq)
        _seq[0] += 1
        again = replace(result, seq=_seq[0], found_earlier=True)
        _results.append(again)
    _tell(again)


def results(since: int = 0) -> list:
    """Check results recorded after sequence number `since` (see `mark`), oldest first."""
    return [r for r in list(_results) if r.seq > since]


def fallbacks(since: int = 0) -> list:
    return [r for r in results(since) if r.fell_back]


def mark() -> int:
    """The sequence number of the latest result: `results(mark())` later gives what came after."""
    return _seq[0]


def add_listener(listener: Callable) -> None:
    """`listener(result)` is called for every new CheckResult (its exceptions are logged, not raised)."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: Callable) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _record(checker: "Checker", outcome: str, detail: str, seconds: float = 0.0) -> CheckResult:
    with _lock:
        _seq[0] += 1
        result = CheckResult(_seq[0], outcome, type(checker.owner).__name__, checker.path, checker.attribute,
                             checker.host, detail, checker.tag, seconds)
        _results.append(result)
        if result.fell_back:
            _said_this_round.add(result.seq)
    _tell(result)
    return result


def _tell(result: CheckResult) -> None:
    """Logs a result and hands it to the listeners."""
    if result.fell_back:
        log.warning("%s", result.message())
    elif result.outcome == NOT_CHECKED:
        log.warning("%s; it runs sliced, unchecked.", result.message())
    else:
        log.debug("%s", result.message())
    for listener in list(_listeners):
        try:
            listener(result)
        except Exception:
            log.exception("Streamline self-check: a result listener failed")


@contextmanager
def tagged(tag: Optional[dict]):
    """Checkers made inside the with-block carry `tag` in their results (the nodes use it to name
    the node that made the patches)."""
    previous = getattr(_local, "tag", None)
    _local.tag = tag
    try:
        yield
    finally:
        _local.tag = previous


# ---- probes: how each block's call is cut down ---------------------------------------------------

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


# ---- comparing -------------------------------------------------------------------------------------

def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "to_tuple"):  # diffusers' BaseOutput
        return _tensors(value.to_tuple())
    return []


def tolerance(stock: torch.Tensor, convolutions: bool) -> float:
    if stock.dtype in (torch.float32, torch.float64):
        tf32 = stock.device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                                or (convolutions and torch.backends.cudnn.allow_tf32))
        if not tf32:
            return EXACT_TOLERANCE
    return LOW_PRECISION_TOLERANCE


def compare(stock, sliced, convolutions: bool = True) -> tuple:
    """(whether `sliced` matches `stock` within tolerance, a description of the largest difference)."""
    expected, got = _tensors(stock), _tensors(sliced)
    if len(expected) != len(got):
        return False, f"{len(got)} output tensors where stock gives {len(expected)}"
    worst = (0.0, 0.0, EXACT_TOLERANCE)
    for a, b in zip(expected, got):
        if a.shape != b.shape:
            return False, f"output shape {tuple(b.shape)} where stock gives {tuple(a.shape)}"
        limit = tolerance(a, convolutions)
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b.to(a.device)):
                return False, "integer outputs differ"
            continue
        a, b = a.detach().double(), b.detach().to(a.device).double()
        finite = torch.isfinite(a)
        if not torch.equal(finite, torch.isfinite(b)):
            return False, "non-finite values where stock has finite ones (or the reverse)"
        if not finite.any():
            continue
        difference = (a - b).abs()[finite].max().item()
        scale = a.abs()[finite].max().item()
        relative = difference / scale if scale > 0 else difference
        if relative > limit:
            return False, (f"max abs difference {difference:.2e} = {relative:.1e} of the output's scale {scale:.2e}, "
                           f"tolerance {limit:.0e}")
        worst = max(worst, (relative, scale, limit))
    return True, f"max abs difference {worst[0]:.1e} of the output's scale, tolerance {worst[2]:.0e}"


# ---- the checker -----------------------------------------------------------------------------------

_unchecked_logged = set()
_force_fake = [False]  # bench/self_check_cost.py: probe fake tensors too (to count FLOPs), without comparing


class _StockFailed(Exception):
    pass


def _out_of_memory(error: Exception) -> bool:
    message = str(error).lower()
    return (isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message
            or "can't allocate memory" in message)


def _passes_through(error: Exception) -> bool:
    """Exceptions a probe must not swallow: the host's interrupt (the user pressed Cancel)."""
    return type(error).__name__ == "InterruptProcessingException"


def _dropout_active(module: nn.Module) -> bool:
    return any(m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


@contextmanager
def _probing(overrides: dict):
    previous = getattr(_local, "overrides", None)
    _local.overrides = overrides
    try:
        yield
    finally:
        _local.overrides = previous


@contextmanager
def counting_fake_probes():
    """For bench/self_check_cost.py: checkers probe fake (or meta) tensors too, running stock and the
    probe's sliced forward without comparing them, so the probe's FLOPs can be counted at full size."""
    _force_fake[0] = True
    try:
        yield
    finally:
        _force_fake[0] = False


def _unreal(args: tuple, kwargs: dict, module: nn.Module) -> bool:
    """Whether the call holds, or the module computes with, fake or meta tensors (memory prediction,
    fake-tensor benchmarks; real inputs to a fake module come out fake)."""
    from torch._subclasses.fake_tensor import is_fake
    values = [*args, *kwargs.values(), next(module.parameters(), None)]
    return any(isinstance(v, torch.Tensor) and (v.is_meta or is_fake(v)) for v in values)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class Checker:
    """A checked replacement of `owner.<attribute>`: called like it, runs the installed sliced
    forward once the first probe has passed, the stock one once it has failed."""

    def __init__(self, module: nn.Module, key: str, sliced: Callable, make: Callable, settings: SliceSettings,
                 base: str, tag: Optional[dict]):
        owner_path, _, attribute = key.rpartition(".")
        self.module, self.key, self.make, self.settings, self.tag = module, key, make, settings, tag
        self.owner = module.get_submodule(owner_path) if owner_path else module
        self.attribute, self.sliced = attribute, sliced
        self.path = f"{base}{owner_path}".rstrip(".")
        stock = getattr(type(self.owner), attribute, None)
        self.stock = stock.__get__(self.owner) if callable(stock) else None
        self.maker = maker_of(sliced)
        self.probe = PROBES.get(self.maker, _MISSING)
        self.host = host_version(self.owner)
        self.leader: Optional[Checker] = None
        self.companions: list = []
        self.members: list = []
        self.result: Optional[CheckResult] = None
        self._run: Optional[Callable] = None

    @property
    def where(self) -> str:
        return f"{type(self.owner).__name__} at {self.path or '<model>'} ({self.attribute})"

    def __repr__(self):
        return f"<Streamline checked {self.maker} of {type(self.owner).__name__} at {self.path or '<model>'}>"

    def __call__(self, *args, **kwargs):
        overrides = getattr(_local, "overrides", None)
        if overrides is not None:  # inside another block's probe: stock, or that probe's own companion
            return overrides.get(self, self.stock)(*args, **kwargs)
        if self._run is None and getattr(self.probe, "caller", False):
            return self._call_then_check_caller(args, kwargs)
        run = self._run or self._resolve(args, kwargs)
        if run is self.stock:  # a fallback: said again once per round
            _say_again(self.result if self.leader is None else self.leader.result)
        return run(*args, **kwargs)

    def _call_then_check_caller(self, args, kwargs):
        """A caller (Probe.caller): the real call first, in which its blocks check themselves, then
        its probe with each block as decided; where that falls back, the call again, every block
        stock. Its own pass-through runs either way."""
        output = self.sliced(*args, **kwargs)
        with _lock:
            if self._run is None:
                self.result = self._check(args, kwargs)
                if self.result is not None:
                    self._run = self.sliced
        if self.result is not None and self.result.fell_back:
            del output
            output = self.sliced(*args, **kwargs)
        return output

    def _resolve(self, args, kwargs) -> Callable:
        if self.leader is not None:  # decided with the group's leader
            if self.leader.result is None:
                return self.sliced
            self._run = self.stock if self.leader.result.fell_back else self.sliced
            return self._run
        with _lock:
            if self._run is None:
                self.result = self._check(args, kwargs)
                if self.result is None:  # this call could not be probed: sliced, unchecked, until one can
                    return self.sliced
                self._run = self.stock if self.result.fell_back else self.sliced
            return self._run

    def _check(self, args, kwargs) -> Optional[CheckResult]:
        if not ENABLED or _compiling():
            return None
        if self.probe is UNCHECKED_PROBE or self.probe is _MISSING or self.stock is None:
            if self.maker not in _unchecked_logged:
                _unchecked_logged.add(self.maker)
                log.log(logging.WARNING if self.probe is _MISSING else logging.DEBUG,
                        "Streamline self-check: %s (%s) %s; its blocks run unchecked", self.maker,
                        type(self.owner).__name__, "is missing from self_check.PROBES" if self.probe is _MISSING
                        else "is marked unchecked in self_check.PROBES")
            return CheckResult(0, UNCHECKED, type(self.owner).__name__, self.path, self.attribute, self.host,
                               "no probe rule", self.tag)
        fake = _unreal(args, kwargs, self.owner)
        if fake and not _force_fake[0]:
            return None
        if _dropout_active(self.owner):
            return _record(self, NOT_CHECKED, "dropout is active (training mode): two runs cannot be compared")
        started = time.perf_counter()
        if self.members:
            outcome, detail = self._probe(args, kwargs, fake, self.members)
            if outcome is None:
                return None
            if self.probe.caller:
                return self._caller_result(outcome, detail, time.perf_counter() - started)
            if outcome == PASSED:
                result = _record(self, PASSED, f"{detail}; with the {len(self.members)} sliced blocks inside it",
                                 time.perf_counter() - started)
                for member in self.members:
                    member.result = _record(member, PASSED, f"checked with {self.where}")
                    member._run = member.sliced
                return result
            log.debug("Streamline self-check: %s with its blocks sliced: %s; checking each block on its own",
                      self.where, detail)
        outcome, detail = self._probe(args, kwargs, fake, ())
        if outcome is None:
            return None
        return _record(self, outcome, detail, time.perf_counter() - started)

    def _caller_result(self, outcome: str, detail: str, seconds: float) -> CheckResult:
        """A caller's probe, its blocks as each decided alone: where it differs, the blocks still
        sliced are wrong in this caller (exact alone or not) and every one falls back to stock."""
        if outcome != FELL_BACK:
            return _record(self, outcome, f"{detail}; with the sliced blocks inside it", seconds)
        sliced = [m for m in self.members if not (m.result is not None and m.result.fell_back)]
        result = _record(self, FELL_BACK, f"with its {len(sliced)} sliced blocks: {detail}; every block inside "
                                          f"runs stock", seconds)
        for member in sliced:
            member.result = _record(member, FELL_BACK, f"wrong inside {self.where}")
            member._run = member.stock
        return result

    def _probe(self, args, kwargs, fake: bool, members) -> tuple:
        """(outcome, detail) of a probe with `members` sliced too, or (None, None) where this call
        cannot be cut."""
        try:
            outputs = self.probe_outputs(args, kwargs, members)
        except _StockFailed as failure:
            return NOT_CHECKED, f"the stock {self.attribute} failed on the probe: {failure}"
        if outputs is None:
            return None, None
        stock, sliced, error = outputs
        if error is not None and _out_of_memory(error):  # says nothing of the replacement; stock would not fit
            return NOT_CHECKED, f"out of memory during the probe ({type(error).__name__})"
        if error is not None:
            return FELL_BACK, f"the sliced {self.attribute} raised {type(error).__name__}: {error}"
        if fake:
            return PASSED, "fake tensors: run, not compared"
        convolutions = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.owner.modules())
        matches, detail = compare(stock, sliced, convolutions)
        return (PASSED if matches else FELL_BACK), detail

    def probe_outputs(self, args, kwargs, members=()) -> Optional[tuple]:
        """(stock output, sliced output or None, the sliced forward's exception or None) on the probe
        cut from this call, with the companions and `members` sliced as well, or None where this call
        cannot be cut. Raises _StockFailed when stock fails."""
        try:
            call = self.probe.cut(self.owner, Call(inspect.signature(self.stock), args, kwargs))
        except Exception as error:
            raise _StockFailed(f"cutting the probe raised {type(error).__name__}: {error}") from None
        if call is None:
            return None
        made = {}

        def probe_forward(checker):
            patches = made.get((id(checker.module), checker.make))
            if patches is None:
                patches = made[id(checker.module), checker.make] = checker.make(
                    checker.module, ProbeSettings.of(checker.settings))
            return patches.get(checker.key)
        sliced = probe_forward(self)
        overrides = {c: c.stock if c.result is not None and c.result.fell_back else probe_forward(c)
                     for c in (*self.companions, *members)}
        overrides = {c: forward for c, forward in overrides.items() if forward is not None}
        with torch.no_grad():
            with _probing({}):
                try:
                    expected = call.copy().run(self.stock)
                except Exception as error:
                    if _passes_through(error):
                        raise
                    raise _StockFailed(f"{type(error).__name__}: {error}") from None
            with _probing(overrides):
                try:
                    return expected, call.copy().run(sliced), None
                except Exception as error:
                    if _passes_through(error):
                        raise
                    return expected, None, error


def checked(module: nn.Module, make: Callable, settings: SliceSettings, base: str = "") -> dict:
    """`make(module, settings)` (a block table row's patches: attribute path from `module` ->
    replacement), each replacement wrapped in a Checker; `base` is `module`'s path in the model."""
    patches = make(module, settings)
    tag = getattr(_local, "tag", None)
    checkers = {key: Checker(module, key, value, make, settings, base, tag) for key, value in patches.items()}
    for leader in [c for c in checkers.values() if c.probe is not None and c.probe.group]:
        for checker in checkers.values():
            if checker is not leader:
                checker.leader = leader
                leader.companions.append(checker)
    return checkers


def link_groups(checkers) -> None:
    """Makes every checker of a patched model whose module lies inside a group leader's module (its
    companions aside) a member of that leader (see Probe.group)."""
    checkers = list(checkers)
    for leader in [c for c in checkers if c.probe is not None and c.probe.group]:
        inside = {id(m) for m in leader.owner.modules()}
        leader.members = [c for c in checkers if c is not leader and c.leader is None and id(c.owner) in inside]
