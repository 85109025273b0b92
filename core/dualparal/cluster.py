"""DualParal ranks started by torchrun, on one machine or several, serving ComfyUI between prompts.

torchrun gives every rank RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the ranks join
one process group from them (env://), NCCL on GPUs (GPU LOCAL_RANK) and gloo on CPUs. Rank 0 also
listens for ComfyUI (the node's devices `torchrun://HOST:PORT`). A request brings every rank its
layers, so the other machines need ComfyUI's code but no model files; rank 0 hands them out over a
gloo control group, the ranks run the pipeline as spawned workers do, and rank 0 answers with the
latent and every rank's statistics. A rank that fails, or a run ComfyUI cancels, ends every rank
(a process group with operations in flight cannot be recovered); torchrun is started again for the
next run.

What crosses the network is wire.py's messages (JSON and safetensors), never pickle. ComfyUI and
rank 0 prove to each other that they hold the same key (multiprocessing's HMAC challenge) before a
message is read, and ComfyUI connects only to clusters its own allowlist names.
"""
import json
import logging
import os
import socket
from dataclasses import asdict
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import wire
from .peer_connections import Doorman, Peer, SilentPeer
from .samplers import check_sampler
from .schedule import DualParalError
from .wan_stage import rank_model, rank_model_description, rebuild_rank_model
from .wire import MalformedMessage
from .worker import GROUP_TIMEOUT, apply_host_setup, progress_bars_lock_in_process, run_payload

log = logging.getLogger(__name__)

CLUSTER_PREFIX = "torchrun://"
KEY_VARIABLE = "STREAMLINE_DUALPARAL_KEY"
ALLOWED_VARIABLE = "STREAMLINE_DUALPARAL_CLUSTERS"
MIN_KEY_LENGTH = 16
RETIRED_KEYS = {"streamline-dualparal"}  # the public default of earlier versions
DEFAULT_PORT = 29501
MAX_EXPERTS = 2  # Wan 2.2 A14B's high- and low-noise experts
IDLE_TIMEOUT = timedelta(days=365)  # ranks other than 0 wait for the next request on the control group
NEW_KEY_HINT = "python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE && chmod 600 FILE"


def loopback_interface() -> str:
    """The name of this machine's loopback interface (for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def cluster_address(devices: str) -> Optional[tuple]:
    """(host, port) of `torchrun://HOST:PORT`; None for other device strings."""
    text = devices.strip()
    if not text.lower().startswith(CLUSTER_PREFIX):
        return None
    host, _, port = text[len(CLUSTER_PREFIX):].rpartition(":")
    if not host or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise DualParalError(f"devices '{text[:60]}': write torchrun://HOST:PORT with a port from 1 to 65535, where rank 0 "
                             f"of the torchrun cluster listens (e.g. torchrun://10.0.0.1:{DEFAULT_PORT}).")
    return host.strip("[]"), int(port)


def read_key(key_file: Optional[Path]) -> bytes:
    """The shared secret of ComfyUI and a cluster: STREAMLINE_DUALPARAL_KEY, else `key_file`'s text."""
    text, source = os.environ.get(KEY_VARIABLE, "").strip(), KEY_VARIABLE
    if not text and key_file is not None and key_file.is_file():
        text, source = key_file.read_text().strip(), str(key_file)
    if not text:
        where = f"or write it into {key_file}" if key_file is not None else "or pass --key-file FILE"
        raise DualParalError(f"no DualParal cluster key: set {KEY_VARIABLE} {where}, the same key for ComfyUI and "
                             f"every torchrun rank. Make one with: {NEW_KEY_HINT}")
    if len(text) < MIN_KEY_LENGTH or text in RETIRED_KEYS:
        raise DualParalError(f"the DualParal cluster key from {source} is too weak (a public default, or under "
                             f"{MIN_KEY_LENGTH} characters): make a new one with: {NEW_KEY_HINT}")
    return text.encode()


def check_allowed(address: tuple, allow_file: Path) -> None:
    """A workflow names a cluster; this ComfyUI connects only if its owner listed it too, in
    STREAMLINE_DUALPARAL_CLUSTERS (comma-separated HOST:PORT) or in `allow_file` (one per line)."""
    entries = os.environ.get(ALLOWED_VARIABLE, "").split(",")
    if allow_file.is_file():
        entries += allow_file.read_text().splitlines()
    allowed = {entry.strip().lower() for entry in entries if entry.strip() and not entry.strip().startswith("#")}
    host, port = address
    if f"{host}:{port}".lower() not in allowed and f"[{host}]:{port}".lower() not in allowed:
        entry = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address in brackets
        raise DualParalError(f"the workflow sends the model to torchrun://{entry}, which this ComfyUI does not "
                             f"allow: if that cluster is yours, add the line {entry} to {allow_file} (or to "
                             f"{ALLOWED_VARIABLE}, comma-separated) and queue the prompt again.")


def plain_settings(values: dict) -> dict:
    """ComfyUI's command-line settings that are plain values (what a cluster can be sent)."""
    return {k: v for k, v in values.items()
            if type(v) in (bool, int, float, str, type(None)) or type(v) is list and all(type(i) is str for i in v)}


def _apply_settings(settings, device: torch.device) -> None:
    """ComfyUI's settings from the request, only where this host has the same setting with a value of
    the same type; the device is this rank's own."""
    from comfy.cli_args import args
    if not isinstance(settings, dict):
        raise MalformedMessage("settings that are not an object")
    known = {k: v for k, v in plain_settings(settings).items()
             if hasattr(args, k) and (getattr(args, k) is None or type(getattr(args, k)) is type(v))}
    apply_host_setup([("comfy.cli_args", "args", {**known, "cpu": device.type == "cpu"})])


def rank_message(request, rank: int, ranges: list, first_rank_tensors: tuple) -> bytes:
    """One rank's part of a DualParalRequest as a message (the inverse of `payload_from_message`)."""
    world, layers = len(ranges), ranges[rank]
    first, last = rank == 0, rank == world - 1
    latent, noise, _ = first_rank_tensors
    meta = {"rank": rank, "world": world, "layers": [layers.start, layers.stop], "dtype": wire.dtype_name(request.dtype),
            "latent_shape": list(latent.shape), "plan": asdict(request.plan),
            "sampling": {"timesteps": [float(t) for t in request.sampling.timesteps], "cfg": float(request.sampling.cfg),
                         "sampler": request.sampling.sampler, "flow": request.sampling.flow,
                         "seed": int(request.sampling.seed), "frame_scale": request.sampling.frame_scale,
                         "host_guidance": bool(request.sampling.host_guidance)},
            "slicing": None if request.slicing is None else asdict(request.slicing),
            "models": [rank_model_description(model, config, layers, first, last) for model, config in request.experts]}
    tensors = {f"model{index}.{name}": value for index, (model, _) in enumerate(request.experts)
               for name, value in rank_model(model, layers, first=first, last=last).state_dict().items()}
    tensors.update(sigmas=request.sampling.sigmas, context=request.sampling.context,
                   **({"latent": latent, "noise": noise} if first else {}),
                   **({"clip": request.sampling.clip} if request.sampling.clip is not None else {}),
                   **({"image": request.sampling.image} if first and request.sampling.image is not None else {}),
                   **({"mask": request.sampling.mask} if first and request.sampling.mask is not None else {}))
    return wire.encode(meta, tensors)


def payload_from_message(data: bytes) -> dict:
    """The payload `run_payload` takes, from a peer's message; MalformedMessage for anything else."""
    meta, tensors = wire.decode(data)
    try:
        rank, world = int(meta["rank"]), int(meta["world"])
        descriptions = meta["models"]
        if not isinstance(descriptions, list) or not 1 <= len(descriptions) <= MAX_EXPERTS:
            raise MalformedMessage(f"a request for {descriptions!r} models (1 to {MAX_EXPERTS})")
        models = [rebuild_rank_model(description, {name[len(f"model{index}."):]: value for name, value in tensors.items()
                                                   if name.startswith(f"model{index}.")})
                  for index, description in enumerate(descriptions)]
        payload = {"rank": rank, "world": world, "layers": tuple(int(i) for i in meta["layers"]),
                   "dtype": wire.dtype_from_name(meta["dtype"]),
                   "models": models,
                   "latent_shape": tuple(int(i) for i in meta["latent_shape"]), "plan": dict(meta["plan"]),
                   "sampling": _sampling(meta["sampling"], tensors),
                   "slicing": None if meta["slicing"] is None else dict(meta["slicing"])}
        if rank == 0:
            payload.update(latent=tensors["latent"], noise=tensors["noise"], output=torch.zeros_like(tensors["latent"]))
    except (KeyError, TypeError, ValueError) as error:
        raise MalformedMessage(f"a request without a valid {error}") from None
    return payload


def _sampling(meta: dict, tensors: dict) -> dict:
    """The request's sampling settings, each checked: the sampler only by its key in SAMPLERS."""
    return {"timesteps": [float(t) for t in meta["timesteps"]], "cfg": float(meta["cfg"]),
            "sampler": check_sampler(str(meta["sampler"])), "seed": int(meta["seed"]),
            "flow": {name: float(meta["flow"][name]) for name in ("shift", "multiplier", "noise_scale")},
            "sigmas": tensors["sigmas"], "context": tensors["context"], "clip": tensors.get("clip"),
            "image": tensors.get("image"), "mask": tensors.get("mask"),
            "frame_scale": None if meta.get("frame_scale") is None else [float(f) for f in meta["frame_scale"]],
            "host_guidance": meta.get("host_guidance") is True}


def _send_bytes(data: bytes, to: int, group) -> None:
    dist.send(torch.tensor([len(data)]), to, group=group)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), to, group=group)


def _receive_bytes(source: int, group) -> bytes:
    length = torch.zeros(1, dtype=torch.int64)
    dist.recv(length, source, group=group)
    buffer = torch.empty(int(length), dtype=torch.uint8)
    dist.recv(buffer, source, group=group)
    return buffer.numpy().tobytes()


def serve_cluster(port: int, listen: str, key: bytes) -> None:
    """The life of one torchrun rank: join the group, then run requests until something fails. Rank 0
    listens for ComfyUI on `listen`:`port`."""
    progress_bars_lock_in_process()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=GROUP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    name = f"{socket.gethostname()} {device}"
    if dist.get_rank() != 0:
        _send_bytes(name.encode(), 0, control)
        while True:
            _run_forwarded_request(control, device)
    names = [name] + [_receive_bytes(rank, control).decode() for rank in range(1, dist.get_world_size())]
    doorman = Doorman((listen, port), key)
    log.info("DualParal cluster of %d ranks (%s) listens on %s:%d", len(names), ", ".join(names), listen, port)
    while True:
        _serve_request(doorman.next(), names, control, device)


def _serve_request(connection: Connection, names: list, control, device: torch.device) -> None:
    with Peer(connection, "rank 0") as comfyui:
        try:
            comfyui.send("the greeting", {"kind": "devices", "devices": names})
            meta, _ = comfyui.receive("the request")
        except (EOFError, OSError, SilentPeer, MalformedMessage) as error:
            log.warning("a request was refused before it reached the ranks: %s", error)
            return
        if meta.get("kind") != "request":
            return  # ComfyUI refused the run itself
        settings = json.dumps(plain_settings(meta.get("settings") or {})).encode()
        try:
            for rank in range(1, len(names)):
                _send_bytes(settings, rank, control)
            _apply_settings(json.loads(settings), device)
            payload = None
            for rank in range(len(names)):
                data = comfyui.receive_bytes(f"rank {rank}'s layers")
                if rank == 0:
                    payload = payload_from_message(data)
                else:
                    _send_bytes(data, rank, control)
                del data
            stats = run_payload(payload, device, progress=lambda done, total: comfyui.send(
                "a step's progress", {"kind": "progress", "done": done, "total": total}),
                ask_guidance=_ask_comfyui(comfyui))
            gathered = [asdict(stats)] + [json.loads(_receive_bytes(rank, control)) for rank in range(1, len(names))]
            comfyui.send("the result", {"kind": "done", "stats": gathered}, {"output": payload["output"]})
        except BaseException as error:
            log.exception("DualParal cluster rank 0 failed; ending every rank")
            try:
                comfyui.send("the error", {"kind": "error", "message": f"{type(error).__name__}: {error}"})
            except (OSError, SilentPeer):
                pass  # ComfyUI has gone (the run was cancelled)
            os._exit(1)


def _ask_comfyui(comfyui: Peer):
    """How rank 0 has ComfyUI compute guidance with the MODEL's CFG patches (which stay there)."""
    def ask(tensors: dict, expert: int) -> torch.Tensor:
        comfyui.send("a guidance question", {"kind": "guide", "expert": expert}, tensors)
        meta, answer = comfyui.receive("a guidance answer")
        if meta.get("kind") != "guided" or "denoised" not in answer:
            raise MalformedMessage("an answer to a guidance question without its prediction")
        return answer["denoised"]
    return ask


def _run_forwarded_request(control, device: torch.device) -> None:
    try:
        _apply_settings(json.loads(_receive_bytes(0, control)), device)
        payload = payload_from_message(_receive_bytes(0, control))
        stats = run_payload(payload, device, progress=lambda done, total: None)
        _send_bytes(json.dumps(asdict(stats)).encode(), 0, control)
    except BaseException:
        log.exception("DualParal cluster rank %d failed; ending every rank", dist.get_rank())
        os._exit(1)
