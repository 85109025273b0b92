"""Messages that cross a network between ComfyUI and a DualParal cluster, or between the cluster's
ranks: metadata as JSON and tensors as safetensors, one safetensors buffer per message (the JSON
rides in its metadata). Reading one runs no code, whoever sent it; pickle never crosses a socket.
"""
import json
import struct

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .schedule import DualParalError

METADATA_KEY = "streamline.message"
HEADER_LENGTH = struct.Struct("<Q")


class MalformedMessage(DualParalError):
    """Bytes that are not a message of this protocol: a peer of another version, or not a peer."""


def encode(meta: dict, tensors: dict = None) -> bytes:
    """One message: `meta` must be plain JSON (dicts, lists, strings, numbers, booleans, None)."""
    seen, plain = set(), {}
    for name, tensor in (tensors or {}).items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()  # safetensors refuses tensors sharing storage
        seen.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    return save_tensors(plain, metadata={METADATA_KEY: json.dumps(meta, allow_nan=False)})


def decode(data: bytes) -> tuple:
    """(meta, tensors) of a message from `encode`; MalformedMessage for anything else."""
    try:
        (length,) = HEADER_LENGTH.unpack_from(data)
        header = json.loads(bytes(data[HEADER_LENGTH.size:HEADER_LENGTH.size + length]))
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        tensors = load_tensors(bytes(data))
    except Exception as error:  # noqa: BLE001 (every way of being malformed gets the same answer)
        raise MalformedMessage(f"a message that is not DualParal's ({type(error).__name__}): the peer is not a "
                               f"DualParal cluster or ComfyUI of this pack's version") from None
    if not isinstance(meta, dict):
        raise MalformedMessage("a message without its metadata object")
    return meta, tensors


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise MalformedMessage(f"{name!r} is not a torch dtype")
    return dtype
