"""How a block's call is cut down to a probe: the pieces every family's cutters use (a few frames or
tokens, a small spatial crop of the real inputs), the frame-local cutter, and the probe's slicing
settings. Each family's own cutters and its Probe rows live in its module (slicing/families/)."""
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..settings import SliceSettings

SPATIAL_SHARE = 16  # a probe keeps about 1/16 of each spatial axis (1/256 of the positions) ...
MIN_SIDE = 2  # ... but at least 2 positions, so strips and bands have a border to cross
FRAME_LOCAL_FRAMES = 3  # frames of a frame-local module's probe (chunks of 2 and 1)
VIDEO_FRAMES = 5  # latent frames of a video decoder's probe: the Wan VAE's first frame and two runs
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


def side_kept(length: int, minimum: int = MIN_SIDE) -> int:
    return min(length, max(minimum, -(-length // SPATIAL_SHARE)))


def crop(x: torch.Tensor, dims: tuple, minimum=MIN_SIDE) -> torch.Tensor:
    """`minimum`: the least positions kept, for all `dims` or one per dim."""
    minimums = minimum if isinstance(minimum, tuple) else (minimum,) * len(dims)
    for dim, least in zip(dims, minimums):
        x = x.narrow(dim, 0, side_kept(x.shape[dim], least))
    return x


def first_rows(value, rows: slice, batch: int):
    """The rows of a per-sample side input (embedding, context) that belong to the probe."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def own_options(call: Call, drop=()) -> None:
    """A probe gets its own transformer_options (blocks write into theirs), without `drop`."""
    options = call.get("transformer_options")
    if isinstance(options, dict):
        call.set("transformer_options", {k: v for k, v in options.items() if k not in drop})


def first_video(call: Call, x_name: str, frames: int, side: tuple, minimum=MIN_SIDE) -> Optional[Call]:
    """The first video (its `frames` rows of the batch*frames axis), all its frames, a small spatial crop."""
    x = call.get(x_name)
    batch = x.shape[0]
    if not frames or batch % frames:
        return None
    rows = slice(0, frames)
    call.set(x_name, crop(x[rows], (2, 3), minimum))
    for name in side:
        call.set(name, first_rows(call.get(name), rows, batch))
    indicator = call.get("image_only_indicator")
    if isinstance(indicator, torch.Tensor) and indicator.ndim == 2:
        call.set("image_only_indicator", indicator[:1])
    own_options(call)
    return call


def frame_local(owner, call):
    """Any module that treats every frame on its own: 3 frames, a small spatial crop."""
    name = call.first
    x = call.get(name)
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        return None
    batch, rows = x.shape[0], slice(0, min(x.shape[0], FRAME_LOCAL_FRAMES))
    call.set(name, crop(x[rows], {4: (2, 3), 5: (3, 4)}.get(x.ndim, ())))
    for other in list(call.signature.parameters)[1:]:
        if other in ("output_shape", "output_size"):  # the full-size target of an upsampling
            call.set(other, None)
        else:
            call.set(other, first_rows(call.get(other), rows, batch))
    return call


def few_frames(call: Call, x_name: str, frames: Optional[int], time_dim: Optional[int] = None) -> tuple:
    """(the call cut to the first VIDEO_FRAMES frames (of the batch*frames axis, or of `time_dim`) and a
    small crop, how many frames it keeps)."""
    x = call.get(x_name)
    if time_dim is None:  # b*t c h w: the first video's first frames
        count = min(frames if isinstance(frames, int) and frames > 0 else x.shape[0], VIDEO_FRAMES)
        call.set(x_name, crop(x[:count], (2, 3)))
    else:  # b c t h w
        count = min(x.shape[time_dim], VIDEO_FRAMES)
        call.set(x_name, crop(x[:1].narrow(time_dim, 0, count), (3, 4), 4))
    return call, count


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

