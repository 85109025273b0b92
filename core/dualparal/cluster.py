"""DualParal ranks started by torchrun, on one machine or several, serving ComfyUI between prompts.

torchrun gives every rank RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the ranks join
one process group from them (env://), NCCL on GPUs (GPU LOCAL_RANK) and gloo on CPUs. Rank 0 also
listens for ComfyUI (the node's devices `torchrun://HOST:PORT`). A request brings every rank its
layers, so the other machines need ComfyUI's code but no model files; rank 0 hands them out over a
gloo control group, the ranks run the pipeline as spawned workers do, and rank 0 answers with the
latent and every rank's statistics. A rank that fails, or a run ComfyUI cancels, ends every rank
(a process group with operations in flight cannot be recovered); torchrun is started again for the
next run.
"""
import logging
import os
import pickle
import socket
from dataclasses import asdict
from datetime import timedelta
from multiprocessing.connection import AuthenticationError, Connection, Listener
from typing import Optional

import torch
import torch.distributed as dist

from .schedule import DualParalError
from .worker import GROUP_TIMEOUT, apply_host_setup, run_payload

log = logging.getLogger(__name__)

CLUSTER_PREFIX = "torchrun://"
KEY_VARIABLE = "STREAMLINE_DUALPARAL_KEY"
DEFAULT_PORT = 29501
IDLE_TIMEOUT = timedelta(days=365)  # ranks other than 0 wait for the next request in a broadcast


def cluster_address(devices: str) -> Optional[tuple]:
    """(host, port) of `torchrun://HOST:PORT`; None for other device strings."""
    text = devices.strip()
    if not text.lower().startswith(CLUSTER_PREFIX):
        return None
    host, _, port = text[len(CLUSTER_PREFIX):].rpartition(":")
    if not host or not port.isdigit():
        raise DualParalError(f"devices '{text}': write torchrun://HOST:PORT, where rank 0 of the torchrun cluster "
                             f"listens (e.g. torchrun://10.0.0.1:{DEFAULT_PORT}).")
    return host.strip("[]"), int(port)


def cluster_key() -> bytes:
    """The shared secret ComfyUI and rank 0 authenticate each other with."""
    return os.environ.get(KEY_VARIABLE, "streamline-dualparal").encode()


def send(connection: Connection, message) -> None:
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(connection: Connection):
    return pickle.loads(connection.recv_bytes())


def _send_bytes(data: bytes, rank: int, group) -> None:
    dist.send(torch.tensor([len(data)]), rank, group=group)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), rank, group=group)


def _receive_bytes(group) -> bytes:
    length = torch.zeros(1, dtype=torch.int64)
    dist.recv(length, 0, group=group)
    buffer = torch.empty(int(length), dtype=torch.uint8)
    dist.recv(buffer, 0, group=group)
    return buffer.numpy().tobytes()


def _apply_host_setup(host_setup: list, device: torch.device) -> None:
    """ComfyUI's settings from the request; the device is this rank's own."""
    apply_host_setup([*host_setup, ("comfy.cli_args", "args", {"cpu": device.type == "cpu"})])


def serve_cluster(port: int) -> None:
    """The life of one torchrun rank: join the group, then run requests until something fails."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=GROUP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, f"{socket.gethostname()} {device}", group=control)
    if dist.get_rank() == 0:
        listener = Listener(("0.0.0.0", port), authkey=cluster_key())
        log.info("DualParal cluster of %d ranks (%s) listens on port %d", len(names), ", ".join(names), port)
        while True:
            _serve_request(listener, names, control, device)
    while True:
        _run_forwarded_request(control, device)


def _serve_request(listener: Listener, names: list, control, device: torch.device) -> None:
    try:
        connection = listener.accept()
    except AuthenticationError as error:
        log.warning("a connection was refused: %s (is %s the same for ComfyUI and the cluster?)", error, KEY_VARIABLE)
        return
    except (EOFError, OSError) as error:
        log.warning("a connection closed before it was authenticated: %s", error)
        return
    with connection:
        try:
            send(connection, {"devices": names})
            host_setup = receive(connection)  # None: ComfyUI refused the request itself
        except (EOFError, OSError):
            return
        if host_setup is None:
            return
        try:
            dist.broadcast_object_list([host_setup], src=0, group=control)
            _apply_host_setup(host_setup, device)
            payload = None
            for rank in range(len(names)):
                data = connection.recv_bytes()
                if rank == 0:
                    payload = pickle.loads(data)
                else:
                    _send_bytes(data, rank, control)
                del data
            stats = run_payload(payload, device, progress=lambda done, total: send(connection, ("progress", done, total)))
            gathered = [None] * len(names)
            dist.gather_object(asdict(stats), gathered, dst=0, group=control)
            send(connection, ("done", payload["output"], gathered))
        except BaseException as error:
            log.exception("DualParal cluster rank 0 failed; ending every rank")
            try:
                send(connection, ("error", f"{type(error).__name__}: {error}"))
            except OSError:
                pass  # ComfyUI has gone (the run was cancelled)
            os._exit(1)


def _run_forwarded_request(control, device: torch.device) -> None:
    try:
        host_setup = [None]
        dist.broadcast_object_list(host_setup, src=0, group=control)
        _apply_host_setup(host_setup[0], device)
        payload = pickle.loads(_receive_bytes(control))
        stats = run_payload(payload, device, progress=lambda done, total: None)
        dist.gather_object(asdict(stats), None, dst=0, group=control)
    except BaseException:
        log.exception("DualParal cluster rank %d failed; ending every rank", dist.get_rank())
        os._exit(1)
