"""One DualParal rank in its own process: joins the process group, runs its part of the model for
every job and reports its statistics (or its error) to the parent."""
import importlib
import os
import pickle
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..slicing import SliceSettings
from .pipeline import FirstRank, RankStats, Ring, Sampling, relayed_guidance, run_rank
from .schedule import BlockPlan
from .wan_stage import WanStage, rank_prepared

GROUP_TIMEOUT = timedelta(minutes=10)


def _exit_with_parent() -> None:
    """A worker whose parent died (killed ComfyUI) ends itself instead of lingering."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def progress_bars_lock_in_process() -> None:
    """The host's samplers draw tqdm progress bars, whose first bar makes a multiprocessing lock: a
    named semaphore that a killed worker (an interrupted run) could never unlink. A thread lock
    serves a worker's bars as well."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def serve(inbox, outbox, rank: int) -> None:
    """Runs the rank and reports. An error is reported first, then the process exits at once: leaving
    a process group with operations in flight could hang."""
    _exit_with_parent()
    progress_bars_lock_in_process()
    try:
        stats = run_worker(pickle.loads(inbox.get()), inbox, outbox)
    except BaseException as error:
        outbox.put(("error", rank, f"{type(error).__name__}: {error}"))
        outbox.close()
        outbox.join_thread()
        os._exit(1)
    outbox.put(("done", rank, asdict(stats)))
    dist.destroy_process_group()


def apply_host_setup(host_setup: list) -> None:
    """Sets the host's settings (module, attribute, {name: value}) before its modules use them."""
    for module_name, attribute, values in host_setup:
        target = getattr(importlib.import_module(module_name), attribute)
        for key, value in values.items():
            setattr(target, key, value)


def _ask_parent(inbox, outbox) -> Callable[[dict, int], torch.Tensor]:
    def ask(tensors: dict, expert: int) -> torch.Tensor:
        outbox.put(("guide", tensors["x"], tensors["sigma"], tensors["denoised"], expert))
        return inbox.get()
    return ask


def run_worker(payload: dict, inbox, outbox) -> RankStats:
    device = torch.device(payload["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(payload["threads"])
    dist.init_process_group(payload["backend"], init_method=payload["init_method"], rank=payload["rank"],
                            world_size=payload["world"], timeout=GROUP_TIMEOUT)
    return run_payload(payload, device, progress=lambda done, total: outbox.put(("progress", done, total)),
                       ask_guidance=_ask_parent(inbox, outbox))


def run_payload(payload: dict, device: torch.device, progress: Callable[[int, int], None],
                ask_guidance: Optional[Callable[[dict, int], torch.Tensor]] = None) -> RankStats:
    """Runs one rank's part of a request in the process group this process has joined.
    `ask_guidance`: how the first rank asks the host for guidance (where sampling.host_guidance)."""
    torch.set_grad_enabled(False)
    rank, world = payload["rank"], payload["world"]
    height, width = payload["latent_shape"][3:]
    stages = [WanStage(model.to(device), payload["dtype"], device, height, width) for model in payload["models"]]
    plan, sampling = BlockPlan(**payload["plan"]), Sampling(**payload["sampling"])
    stats = RankStats(rank, str(device), tuple(payload["layers"]))
    guide = relayed_guidance(ask_guidance) if sampling.host_guidance and rank == 0 else None
    first_rank = FirstRank(stages[0], plan, sampling, payload["latent"], payload["noise"],
                           payload["output"], guide) if rank == 0 else None
    slicing = None if payload["slicing"] is None else SliceSettings(**payload["slicing"])
    with rank_prepared([stage.model.blocks for stage in stages], slicing, device, stats):
        ring = Ring(rank, world, device, stats) if world > 1 else None
        run_rank(stages, plan, sampling, stats, ring, first_rank, progress)
    return stats
