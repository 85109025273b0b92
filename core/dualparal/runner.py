"""DualParal runs: devices, validation before anything starts, one rank in this process, one
worker process per rank, or the ranks of a torchrun cluster."""
import os
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import AuthenticationError
from typing import Callable, Optional

import torch
from torch import nn

from ..slicing import SliceSettings
from .cluster import KEY_VARIABLE, loopback_interface, plain_settings, rank_message
from .noise import coordinated_noise
from .peer_connections import Peer, SilentPeer, authenticated_connection
from .pipeline import FirstRank, Guidance, RankStats, Sampling, run_rank
from .processes import WorkerError, run_workers
from .schedule import BlockPlan, DualParalError, layer_ranges
from .wan_stage import WanStage, check_experts_match, check_sendable, check_supported, rank_model, rank_prepared
from .wire import MalformedMessage


def parse_devices(text: str, cuda_count: int) -> list:
    """`auto` (every visible GPU, else one CPU rank), `cuda:0,cuda:1`, or `cpu:N` (N CPU ranks)."""
    text = text.strip().lower()
    if text == "auto":
        return [torch.device("cuda", i) for i in range(cuda_count)] or [torch.device("cpu")]
    if text.startswith("cpu"):
        count = text[4:] if text.startswith("cpu:") else "1"
        if text not in ("cpu", f"cpu:{count}") or not count.isdigit() or len(count) > 4 or int(count) < 1:
            raise DualParalError(f"devices '{text[:40]}': write cpu:N with N from 1 to 9999 CPU processes (e.g. cpu:2).")
        return [torch.device("cpu")] * int(count)
    devices = []
    for name in (part.strip() for part in text.split(",")):
        index = name[5:]
        if not name.startswith("cuda:") or not index.isdigit() or len(index) > 4:
            raise DualParalError(f"devices: '{name[:40]}' is not a device; write auto, cpu:N or a list like "
                                 f"cuda:0,cuda:1.")
        if int(index) >= cuda_count:
            visible = f"cuda:0 to cuda:{cuda_count - 1}" if cuda_count else "none"
            raise DualParalError(f"devices: {name} does not exist; this machine has {cuda_count} visible GPU(s) "
                                 f"({visible}). Use auto, a list of those, or cpu:N.")
        device = torch.device("cuda", int(index))
        if device in devices:
            raise DualParalError(f"devices: {name} is listed twice; give each GPU once.")
        devices.append(device)
    return devices


@dataclass
class DualParalRequest:
    model: nn.Module  # ComfyUI's WanModel
    dtype: torch.dtype  # the model's compute dtype
    devices: list
    plan: BlockPlan
    sampling: Sampling
    latent: torch.Tensor  # (1, channels, frames, height, width), float32, in the model's latent space
    seed: int
    slicing: Optional[SliceSettings] = None
    config: Optional[dict] = None  # the model's constructor arguments (ComfyUI's unet_config), for clusters
    # Wan 2.2 A14B: the low-noise expert, run from plan.expert_switch on (`model` is the high-noise one)
    low_noise_model: Optional[nn.Module] = None
    low_noise_config: Optional[dict] = None
    add_noise: bool = True  # False: `latent` is already noised to the first sigma (a later expert phase)

    @property
    def experts(self) -> list:
        """(model, config) of each expert, the high-noise one (or the only model) first."""
        return [(self.model, self.config)] + ([(self.low_noise_model, self.low_noise_config)]
                                              if self.low_noise_model is not None else [])

    def validate(self, ranks: int) -> list:
        """Everything that can be checked before a process starts; returns each of `ranks` ranks' layers."""
        image = self.sampling.image
        for model, _ in self.experts:
            check_supported(model, tuple(self.latent.shape), 0 if image is None else image.shape[1])
        if self.low_noise_model is not None:
            check_experts_match(self.model, self.low_noise_model)
        if (self.low_noise_model is None) != (self.plan.expert_switch == 0):
            raise DualParalError("the block plan's expert switch does not match the experts given")
        if image is not None and (image.shape[0] != self.sampling.batch or image.shape[2:] != self.latent.shape[2:]):
            raise DualParalError(f"the image conditioning has shape {tuple(image.shape)}, the latent "
                                 f"{tuple(self.latent.shape)}: make both with the same WanImageToVideo node.")
        mask = self.sampling.mask
        scale = self.sampling.frame_scale
        if mask is not None and (mask.shape != self.latent.shape or scale is not None and len(scale) != mask.shape[2]):
            raise DualParalError(f"the latent's noise mask has shape {tuple(mask.shape)}, the latent "
                                 f"{tuple(self.latent.shape)}: make both with the same Wan22ImageToVideoLatent node.")
        if self.latent.shape[0] != 1:
            raise DualParalError(f"the latent holds a batch of {self.latent.shape[0]} videos; DualParal samples one "
                                 f"video at a time: set the batch size to 1.")
        if self.plan.frames != self.latent.shape[2]:
            raise DualParalError("the block plan does not match the latent's length")
        return layer_ranges(len(self.model.blocks), ranks)


def run_in_process(request: DualParalRequest, progress: Callable[[int, int], None],
                   guide: Optional[Guidance] = None) -> tuple:
    """One rank here, on the model as the host loaded it: (latent, [RankStats]). `guide`: the host's
    guidance where sampling.host_guidance (the runs below ask it from their first rank)."""
    ranges = request.validate(1)
    device = request.devices[0]
    _, noise, output = _first_rank_tensors(request)
    stages = [WanStage(model, request.dtype, device, *request.latent.shape[3:]) for model, _ in request.experts]
    stats = RankStats(0, str(device), (ranges[0].start, ranges[0].stop))
    with rank_prepared([stage.model.blocks for stage in stages], request.slicing, device, stats):
        run_rank(stages, request.plan, request.sampling, stats, None,
                 FirstRank(stages[0], request.plan, request.sampling, request.latent, noise, output, guide), progress)
    return output, [stats]


def expert_phases(request: DualParalRequest) -> list:
    """Wan 2.2 A14B with the experts swapped: one request per expert, each with that expert alone on
    the ranks, every block sampled to the switch by the first and from there by the second (as two
    KSamplerAdvanced nodes do: leftover noise returned, none added). The second request's latent is
    the first one's output."""
    plan, sampling, switch = request.plan, request.sampling, request.plan.expert_switch
    phases = []
    for expert, ((model, config), (first, stop)) in enumerate(zip(request.experts, ((0, switch), (switch, plan.steps)))):
        phases.append(replace(
            request, model=model, config=config, low_noise_model=None, low_noise_config=None, add_noise=expert == 0,
            plan=replace(plan, steps=stop - first, expert_switch=0),
            sampling=replace(sampling, sigmas=sampling.sigmas[first:stop + 1], timesteps=sampling.timesteps[first:stop])))
    return phases


def rank_weight_bytes(request: DualParalRequest, ranks: int) -> list:
    """Bytes of every expert's weights each of `ranks` ranks holds."""
    ranges = layer_ranges(len(request.model.blocks), ranks)
    return [sum(sum(p.numel() * p.element_size() for p in
                    rank_model(model, layers, first=rank == 0, last=rank == ranks - 1).parameters())
                for model, _ in request.experts)
            for rank, layers in enumerate(ranges)]


def _cuda_visible(device: torch.device) -> str:
    """The CUDA_VISIBLE_DEVICES entry of `device` as this process numbers it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[device.index].strip() if visible else str(device.index)


def run_in_workers(request: DualParalRequest, host_setup: list, progress: Callable[[int, int], None],
                   check_interrupt: Callable[[], None], init_file: str, guide: Optional[Guidance] = None) -> tuple:
    """One spawned process per device (gloo between CPU ranks, NCCL between GPUs), each holding only
    its layers; the weights are shared with this process, not copied. `init_file`: a path no other
    run uses, for the process group's rendezvous."""
    ranges = request.validate(len(request.devices))
    for model, _ in request.experts:
        check_sendable(model)
    backends = {d.type for d in request.devices}
    if len(backends) > 1:
        raise DualParalError("devices mix CPU and GPUs; use GPUs only or cpu:N only.")
    world = len(request.devices)
    latent, noise, output = (t.share_memory_() for t in _first_rank_tensors(request))
    threads = max(1, (os.cpu_count() or 1) // world)
    payloads, environments = [], []
    for rank, device in enumerate(request.devices):
        payloads.append({
            **_rank_payload(request, rank, ranges, (latent, noise, output)),
            "backend": "nccl" if device.type == "cuda" else "gloo", "init_method": f"file://{init_file}",
            "device": "cuda:0" if device.type == "cuda" else "cpu", "threads": threads})
        environments.append({"CUDA_VISIBLE_DEVICES": _cuda_visible(device) if device.type == "cuda" else "",
                             # the ranks talk over this machine's loopback only
                             "GLOO_SOCKET_IFNAME": loopback_interface(), "NCCL_SOCKET_IFNAME": loopback_interface()})
    stats = run_workers(payloads, environments, host_setup, progress, check_interrupt, guide)
    return output.clone(), [RankStats(**{**s, "device": str(d)}) for s, d in zip(stats, request.devices)]


def run_on_cluster(request: DualParalRequest, address: tuple, key: bytes, settings: dict,
                   progress: Callable[[int, int], None], check_interrupt: Callable[[], None],
                   guide: Optional[Guidance] = None) -> tuple:
    """The ranks of a torchrun cluster (cluster.py) run the request: rank 0 listens at `address`
    (host, port) and hands every rank its layers. `settings`: ComfyUI's command-line settings. The
    cluster serves one request at a time: a second one connects once the first is done."""
    name = "%s:%d" % address
    try:
        connection = authenticated_connection(address, key, check_interrupt)
    except SilentPeer as silence:
        raise DualParalError(f"the DualParal cluster at {name} accepted the connection but {silence}: check that "
                             f"rank 0 of dualparal_cluster.py listens there (and not another program), and that "
                             f"nothing between this machine and it holds connections open.") from None
    except AuthenticationError:
        raise DualParalError(f"the DualParal cluster at {name} refused ComfyUI's key, or does not hold it: set "
                             f"{KEY_VARIABLE} to the same value for ComfyUI and torchrun.") from None
    except OSError as error:
        raise DualParalError(f"no DualParal cluster answers at {name} ({error.strerror or error}): start its ranks "
                             f"with dualparal_cluster.py (docs/dualparal.md: DualParal across machines).") from None
    with Peer(connection, "ComfyUI", check_interrupt) as peer:
        try:
            return _converse(peer, request, settings, progress, guide)
        except MalformedMessage as error:
            raise WorkerError(f"the DualParal cluster at {name} answered with {error}; nothing more was sent "
                              f"to it.") from None
        except (EOFError, OSError):
            reason = "its rank 0 closed the connection without a word"
        except SilentPeer as silence:
            reason = f"it {silence}"
        except _ClusterFailed as error:
            reason = str(error)
    raise WorkerError(f"the DualParal cluster at {name} failed: {reason}. Every rank has ended (the output of "
                      f"dualparal_cluster.py on each machine names the failed rank); start torchrun again.")


class _ClusterFailed(Exception):
    pass


def _converse(peer: Peer, request: DualParalRequest, settings: dict, progress, guide) -> tuple:
    meta, _ = peer.receive("its greeting")
    devices = meta.get("devices")
    if meta.get("kind") != "devices" or not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise MalformedMessage("a greeting without its list of devices")
    try:
        ranges = request.validate(len(devices))
    except DualParalError:
        peer.send("the refusal", {"kind": "refused"})
        raise
    peer.send("the request", {"kind": "request", "settings": plain_settings(settings)})
    tensors = _first_rank_tensors(request)
    for rank in range(len(devices)):
        peer.send_bytes(rank_message(request, rank, ranges, tensors), f"rank {rank}'s layers")
    while True:
        # an interrupt raised while waiting closes the connection, which ends the cluster's run
        meta, tensors = peer.receive("the next step's progress")
        kind = meta.get("kind")
        if kind == "progress":
            progress(int(meta["done"]), int(meta["total"]))
        elif kind == "guide" and guide is not None:
            try:
                guided = guide(tensors["x"], tensors["sigma"], tensors["denoised"], int(meta["expert"]))
            except (KeyError, TypeError, ValueError) as error:
                raise MalformedMessage(f"a guidance question without {error}") from None
            peer.send("a guidance answer", {"kind": "guided"}, {"denoised": guided})
        elif kind == "done":
            return _result(meta, tensors, request, devices)
        else:
            raise _ClusterFailed(str(meta.get("message", "an unknown answer")))


def _result(meta: dict, tensors: dict, request: DualParalRequest, devices: list) -> tuple:
    output = tensors.get("output")
    if output is None or output.shape != request.latent.shape:
        raise MalformedMessage(f"a result that is not a latent of shape {tuple(request.latent.shape)}")
    try:
        return output, [RankStats(**{**s, "device": d, "layers": tuple(s["layers"])})
                        for s, d in zip(meta["stats"], devices)]
    except (KeyError, TypeError) as error:
        raise MalformedMessage(f"statistics without {error}") from None


def _first_rank_tensors(request: DualParalRequest) -> tuple:
    """(latent, noise, output): what the first rank samples from and into."""
    shape = tuple(request.latent.shape)
    noise = coordinated_noise(shape, request.plan, request.seed) if request.add_noise else torch.zeros(shape)
    return request.latent, noise, torch.zeros_like(request.latent)


def _rank_payload(request: DualParalRequest, rank: int, ranges: list, first_rank_tensors: tuple) -> dict:
    """What one rank needs of the request in a worker process of this machine."""
    world, layers, first = len(ranges), ranges[rank], rank == 0
    latent, noise, output = first_rank_tensors
    return {"rank": rank, "world": world, "layers": (layers.start, layers.stop), "dtype": request.dtype,
            "models": [rank_model(model, layers, first=first, last=rank == world - 1) for model, _ in request.experts],
            "latent_shape": tuple(latent.shape), "plan": asdict(request.plan),
            "sampling": dict(vars(request.sampling)),
            "slicing": None if request.slicing is None else asdict(request.slicing),
            **({"latent": latent, "noise": noise, "output": output} if first else {})}
