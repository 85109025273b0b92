"""DualParal Multi-GPU Sampler on the tiny Wan fixture with CPU ranks (gloo): same latent for any
number of ranks, stock sampling for a single block, flat per-rank memory over the video's length,
a killed worker, and input it refuses before any process starts."""
import gc
import os
import threading
import time
from contextlib import contextmanager

import psutil
import pytest
import torch

from conftest import load_workflow
from devkit.model_fixtures import build_svd, build_wan, build_wan_vae
from streamline_helpers import (NEGATIVE, POSITIVE, SAMPLING_TOLERANCE, cfg_patched, dualparal, dualparal_i2v,
                               empty_latent, image_to_video, node_output, patcher, relative_difference,
                               run_in_thread, ti2v_5b_conditioning, two_experts, worker_processes)


@pytest.fixture(scope="module")
def wan3(pack):
    """Three transformer layers: enough for three ranks."""
    return patcher(build_wan("tiny", layers=3))


@pytest.mark.parametrize("devices, frames, steps", [("cpu:2", 7, 3), ("cpu:3", 7, 3), ("cpu:2", 12, 8)])
def test_ranks_give_the_latent_of_one_rank(wan3, devices, frames, steps):
    """7 latent frames: blocks of 2, 2, 2, 1 (the last shorter), cache 1, CFG. 12 frames over 8 steps:
    six blocks in flight at once, more than the ring holds."""
    one, one_stats, _ = dualparal(wan3, empty_latent(frames), "cpu:1", steps=steps)
    many, stats, _ = dualparal(wan3, empty_latent(frames), devices, steps=steps)
    assert relative_difference(many["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    assert one["samples"].abs().max() > 0 and not torch.isnan(many["samples"]).any()
    ranks = int(devices[-1])
    assert [s.rank for s in stats] == list(range(ranks)) and len(one_stats) == 1
    assert [s.layers for s in stats] == {2: [(0, 2), (2, 3)], 3: [(0, 1), (1, 2), (2, 3)]}[ranks]
    assert all(s.jobs == one_stats[0].jobs for s in stats)  # every rank runs every block forward
    assert not worker_processes()


SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "lcm", "uni_pc"]


@pytest.mark.parametrize("sampler, scheduler", [(name, "simple") for name in SAMPLERS] + [("dpmpp_2m", "beta")])
def test_a_single_block_samples_exactly_like_stock_ksampler(wan3, sampler, scheduler):
    """With the whole latent in one block and no cache, DualParal is ComfyUI's own sampling: the same
    sampler and scheduler, the MODEL's model sampling (here ModelSamplingSD3's shift), the same seed."""
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    latent = empty_latent(5)
    shifted = ModelSamplingSD3().patch(wan3, 5.0)[0]
    stock = nodes.common_ksampler(shifted, 5, 4, 4.0, sampler, scheduler, POSITIVE, NEGATIVE, latent, denoise=1.0)[0]
    ours, _, _ = dualparal(shifted, latent, "cpu:1", frames_per_block=5, cache_frames=0, steps=4, cfg=4.0,
                           sampler=sampler, scheduler=scheduler)
    assert relative_difference(ours["samples"], stock["samples"]) <= 1e-4
    unshifted, _, _ = dualparal(wan3, latent, "cpu:1", frames_per_block=5, cache_frames=0, steps=4, cfg=4.0,
                                sampler=sampler, scheduler=scheduler)
    assert relative_difference(unshifted["samples"], ours["samples"]) > 1e-3  # the MODEL's shift is the one used


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m", "uni_pc"])
def test_ranks_give_the_latent_of_one_rank_with_each_sampler(wan3, sampler):
    """Per-block sampler state (multistep history, ancestral noise) over several blocks and ranks."""
    one, _, _ = dualparal(wan3, empty_latent(7), "cpu:1", steps=4, sampler=sampler)
    two, _, _ = dualparal(wan3, empty_latent(7), "cpu:2", steps=4, sampler=sampler)
    assert relative_difference(two["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    euler, _, _ = dualparal(wan3, empty_latent(7), "cpu:1", steps=4)
    assert relative_difference(one["samples"], euler["samples"]) > 1e-3
    assert not worker_processes()


def test_partial_denoise_starts_from_the_input_latent_and_zero_returns_it(wan3):
    latent = {"samples": torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(3))}
    light, _, _ = dualparal(wan3, latent, "cpu:1", denoise=0.3)
    full, _, _ = dualparal(wan3, latent, "cpu:1", denoise=1.0)
    assert relative_difference(light["samples"], latent["samples"]) < relative_difference(full["samples"], latent["samples"])
    assert torch.equal(dualparal(wan3, latent, "cpu:2", denoise=0.0)[0]["samples"], latent["samples"])
    assert not worker_processes()


def test_feature_slicer_runs_inside_every_rank(wan3):
    """The Feature Slicer's settings travel to each worker, which slices its own layers: same latent,
    lower peak on every rank."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, wan3, 6, 0))
    stock, stock_stats, _ = dualparal(wan3, empty_latent(8, 8, 12), "cpu:2", frames_per_block=4, cache_frames=2)
    ours, stats, _ = dualparal(sliced, empty_latent(8, 8, 12), "cpu:2", frames_per_block=4, cache_frames=2)
    assert relative_difference(ours["samples"], stock["samples"]) <= SAMPLING_TOLERANCE
    for rank, (sliced_rank, stock_rank) in enumerate(zip(stats, stock_stats)):
        assert sliced_rank.peak_bytes < stock_rank.peak_bytes, rank


def test_a_latent_four_times_longer_keeps_every_rank_peak_flat(wan3):
    _, short, _ = dualparal(wan3, empty_latent(8), "cpu:2")
    _, long, _ = dualparal(wan3, empty_latent(32), "cpu:2")
    for rank, (s, l) in enumerate(zip(short, long)):
        assert l.jobs > 3 * s.jobs
        assert l.peak_bytes <= 1.05 * s.peak_bytes, (rank, s.peak_bytes, l.peak_bytes)


def test_a_killed_worker_stops_the_run_with_a_clear_error_and_the_next_run_works(wan3):
    from comfyui_streamline.core.dualparal.processes import WorkerError

    with run_in_thread(wan3, "cpu:2") as (thread, outcome):
        workers = worker_processes()
        assert len(workers) == 2
        workers[-1].kill()
        thread.join(timeout=60)
    assert not thread.is_alive()
    error = outcome["error"]
    assert isinstance(error, WorkerError)
    assert "stopped (killed by signal 9)" in str(error) and "all workers were stopped" in str(error)
    assert not worker_processes()
    result, stats, _ = dualparal(wan3, empty_latent(4), "cpu:2")
    assert len(stats) == 2 and not torch.isnan(result["samples"]).any()


def test_local_workers_listen_on_loopback_only(wan3):
    """cpu:N workers' process group (gloo) binds to the loopback interface, not to whatever address
    the host name resolves to."""
    with run_in_thread(wan3, "cpu:2") as (thread, outcome):
        listening = {c.laddr.ip for worker in worker_processes() for c in worker.net_connections("inet")
                     if c.status == "LISTEN"}
        __import__("comfy.model_management").model_management.interrupt_current_processing(True)
    __import__("comfy.model_management").model_management.interrupt_current_processing(False)
    assert listening and listening <= {"127.0.0.1", "::1"}, listening


@pytest.mark.parametrize("change, message", [
    (dict(devices="cpu:4"), "4 ranks for a model with 3 transformer layers: use at most 3 devices"),
    (dict(devices="cuda:0"), "cuda:0 does not exist; this machine has 0 visible GPU(s)"),
    (dict(devices="gpu"), "'gpu' is not a device"),
    (dict(cache_frames=2), "cache frames is 2: it must be at least 0 and below frames per block (2)"),
    (dict(frames_per_block=9), "frames per block is 9, but the latent has 8 frames"),
    (dict(latent_image={"samples": torch.zeros(1, 16, 8, 8)}), "the latent has shape (1, 16, 8, 8), not a video latent"),
    (dict(denoise=float("nan")), "denoise is nan; give a finite number"),
    (dict(cfg=float("inf")), "cfg is inf; give a finite number"),
    (dict(devices="torchrun://127.0.0.1:99999"), "with a port from 1 to 65535"),
    (dict(sampler_name="heun"), "sampler 'heun' is not one DualParal runs; choose one of euler, euler_ancestral"),
    (dict(scheduler="fast"), "scheduler 'fast' is not one of this ComfyUI's: simple"),
])
def test_input_it_cannot_run_is_refused_before_any_process_starts(wan3, change, message):
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    if "cuda" in change.get("devices", "") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    inputs = dict(model=wan3, positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(8), seed=0, steps=2,
                  cfg=4.0, sampler_name="euler", scheduler="simple", devices="cpu:2", frames_per_block=2, cache_frames=1, denoise=1.0)
    with pytest.raises(ValueError) as raised:
        DualParalSampler.execute(**{**inputs, **change})
    assert message in str(raised.value) and str(raised.value).startswith("DualParal Multi-GPU Sampler: ")
    assert not worker_processes()


def test_a_model_that_is_not_wan_and_a_masked_latent_are_refused(pack):
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    inputs = dict(positive=POSITIVE, negative=NEGATIVE, seed=0, steps=2, cfg=4.0, sampler_name="euler",
                  scheduler="simple", devices="cpu:1", frames_per_block=2, cache_frames=1, denoise=1.0)
    with pytest.raises(ValueError, match="DualParal runs ComfyUI's plain Wan 2.1 / 2.2 DiT .text- or image-to-video.; this MODEL is UNetModel"):
        DualParalSampler.execute(model=patcher(build_svd("tiny")), latent_image=empty_latent(4), **inputs)
    masked = {**empty_latent(4), "noise_mask": torch.ones(1, 1, 4, 4, 6)}
    with pytest.raises(ValueError, match="noise mask"):
        DualParalSampler.execute(model=patcher(build_wan("tiny")), latent_image=masked, **inputs)


def open_handles() -> tuple:
    """File descriptors, threads and multiprocessing semaphores (/dev/shm/sem.mp-*) of this process,
    and the shared-memory segments, once the resource sharer is done with every earlier request."""
    gc.collect()  # queues in reference cycles unlink their semaphores when collected
    _resource_sharer_settled()
    shm = os.listdir("/dev/shm")
    return (len(os.listdir("/proc/self/fd")), threading.active_count(),
            len([f for f in shm if f.startswith("sem.")]), len([f for f in shm if not f.startswith("sem.")]))


def settled_handles(until=None, timeout_s: float = 30.0) -> tuple:
    """open_handles() once it holds still (two readings alike; on a busy machine a killed worker's
    last handles close a moment late) or, with `until`, once it reads that; the last reading after
    `timeout_s`."""
    deadline, reading = time.monotonic() + timeout_s, open_handles()
    while time.monotonic() < deadline:
        time.sleep(0.2)  # between two readings of a count that settles: not a wait for an event
        previous, reading = reading, open_handles()
        if reading == until or until is None and reading == previous:
            break
    return reading


def _resource_sharer_settled() -> None:
    """multiprocessing's resource sharer serves one request at a time, in order: a handle fetched
    through it now comes back once it has finished (and closed) every earlier one, such as a killed
    worker's."""
    from multiprocessing import resource_sharer
    read, write = os.pipe()
    try:
        os.close(resource_sharer.DupFd(read).detach())
    finally:
        os.close(read)
        os.close(write)


@pytest.fixture(scope="module")
def wan40(pack):
    """Forty layers: a payload bigger than a pipe's buffer (the queue's feeder thread blocks writing it)."""
    return patcher(build_wan("tiny", layers=40))


class _InterruptingHandles(dict):
    """The resource sharer's handles. When a worker fetches the `after`-th of its shared tensors, the
    run is interrupted (as /interrupt does) and that fetch is held until the workers are gone: they
    are killed halfway through their weights."""

    def __init__(self, handles: dict, interrupt, after: int):
        super().__init__(handles)
        self.interrupt, self.left = interrupt, after

    def pop(self, *args):
        handle = super().pop(*args)
        self.left -= 1
        if self.left == 0:
            self.interrupt()
            deadline = time.monotonic() + 60
            while worker_processes() and time.monotonic() < deadline:
                time.sleep(0.05)  # polls for the workers' end (the run's cancellation), not a fixed wait
        return handle


@contextmanager
def _interrupted_at(moment: str, interrupt):
    import comfy.utils
    from multiprocessing import resource_sharer
    sharer = resource_sharer._resource_sharer
    if moment == "while the workers start":
        interrupt()  # polled once the processes have started and been handed their payloads
    elif moment == "while they fetch their weights":
        sharer._cache = _InterruptingHandles(sharer._cache, interrupt, after=10)
    elif moment == "while sampling":
        comfy.utils.set_progress_bar_global_hook(lambda *args, **kwargs: interrupt())
    else:  # after the last step, while the ranks report and the latent comes back
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: value >= total and interrupt())
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        sharer._cache = dict(sharer._cache)


@pytest.mark.parametrize("moment", ["while the workers start", "while they fetch their weights", "while sampling",
                                    "while the results come back"])
def test_interrupted_runs_release_every_thread_descriptor_semaphore_and_segment(wan40, moment):
    """Ten interrupts at each moment of a cpu:2 run leave the counts flat: workers killed before they
    fetch their shared tensors or halfway through them, the queue feeder threads blocked writing a
    payload nobody reads, runs cancelled mid-sampling and once the last step is done."""
    import comfy.model_management

    def interrupt():
        comfy.model_management.interrupt_current_processing(True)

    def interrupted_run():
        try:
            with _interrupted_at(moment, interrupt), pytest.raises(comfy.model_management.InterruptProcessingException):
                dualparal(wan40, empty_latent(8), "cpu:2", steps=2 if moment == "while the results come back" else 50)
        finally:
            comfy.model_management.interrupt_current_processing(False)
        assert not worker_processes()
    interrupted_run()  # the first run moves the weights into shared memory, once
    before = settled_handles()
    for _ in range(10):
        interrupted_run()
    assert settled_handles(until=before) == before


def _server_workers(comfy_server) -> list:
    return [p for p in psutil.Process(comfy_server.process.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]


def _saved_latent(result, comfy_server) -> torch.Tensor:
    import safetensors.torch
    node = result.outputs["11"]["latents"][0]
    path = comfy_server.output_dir / node["subfolder"] / node["filename"]
    return safetensors.torch.load_file(path)["latent_tensor"]


def _run_on_two_ranks_and_one(comfy_server, prompt):
    """Queues a DualParal example (node 7) on its two CPU ranks, then on one rank: both succeed, the
    video is saved whole, and the saved latents agree. Returns both results; `prompt` is left at one rank."""
    from streamline_helpers import frame_count, saved_files

    two = comfy_server.run(prompt)
    assert two.status == "success", two.error
    videos = saved_files(two, comfy_server, ".webp")
    assert len(videos) == 1 and frame_count(videos[0]) == prompt["6"]["inputs"]["length"]
    prompt["7"]["inputs"]["devices"] = "cpu:1"
    one = comfy_server.run(prompt)
    assert one.status == "success", one.error
    assert relative_difference(_saved_latent(two, comfy_server), _saved_latent(one, comfy_server)) <= SAMPLING_TOLERANCE
    return two, one


def test_dualparal_workflow_runs_through_the_api_with_two_ranks_like_one(comfy_server):
    """The long-video example: 49 frames (13 latent frames in blocks of 4) on two CPU ranks, decoded
    and saved, with the per-rank report; one rank in the server's own process samples the same latent."""
    prompt = load_workflow("wan2.1_t2v_1.3B_dualparal_long")
    two, one = _run_on_two_ranks_and_one(comfy_server, prompt)
    report = two.outputs["12"]["text"][0]
    assert "4 blocks of 4 latent frames" in report and "rank 0 cpu: layers 0-0" in report and "rank 1 cpu: layers 1-1" in report
    assert "rank 1" not in one.outputs["12"]["text"][0]
    assert not _server_workers(comfy_server)


def test_the_wan22_a14b_image_to_video_workflow_runs_both_experts_through_the_api(comfy_server):
    """The long A14B image-to-video example: WanImageToVideo's conditioning, both experts on two CPU
    ranks, decoded and saved; one rank samples the same latent; the stock two-KSamplerAdvanced graph
    on the same models gives it too when the whole latent is one block without cache."""
    prompt = load_workflow("wan2.2_i2v_A14B_dualparal_long")
    two, _ = _run_on_two_ranks_and_one(comfy_server, prompt)
    report = two.outputs["12"]["text"][0]
    assert "experts: high noise for steps 0-1, low noise for steps 2-3; both resident on every rank" in report
    dualparal_node = prompt["7"]["inputs"]
    dualparal_node.update(frames_per_block=7, cache_frames=0)  # 25 frames: 7 latent frames, one block
    whole = comfy_server.run(prompt)
    assert whole.status == "success", whole.error
    shared = {k: dualparal_node[k] for k in ("steps", "cfg", "sampler_name", "scheduler", "positive", "negative")}
    prompt["7"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **shared, "model": dualparal_node["model"], "add_noise": "enable", "noise_seed": dualparal_node["seed"],
        "latent_image": dualparal_node["latent_image"], "start_at_step": 0, "end_at_step": 2,
        "return_with_leftover_noise": "enable"}}
    prompt["27"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **shared, "model": dualparal_node["low_noise_model"], "add_noise": "disable",
        "noise_seed": dualparal_node["seed"], "latent_image": ["7", 0], "start_at_step": 2, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == ["7", 0] and node is not prompt["27"]:
                node["inputs"][name] = ["27", 0]
    del prompt["12"]
    stock = comfy_server.run(prompt)
    assert stock.status == "success", stock.error
    assert relative_difference(_saved_latent(whole, comfy_server), _saved_latent(stock, comfy_server)) <= 1e-4
    assert not _server_workers(comfy_server)


def test_interrupting_a_dualparal_prompt_stops_its_workers_and_the_next_prompt_runs(comfy_server):
    import json
    import uuid

    import requests
    import websocket

    prompt = load_workflow("wan2.1_t2v_1.3B_dualparal_long")
    prompt["7"]["inputs"]["steps"] = 10000
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{comfy_server.port}/ws?clientId={client_id}", timeout=120)
    try:
        prompt_id = comfy_server.queue(prompt, client_id)
        while True:  # the ranks are sampling once the sampler reports progress
            message = ws.recv()
            if isinstance(message, str) and json.loads(message).get("type") == "progress" \
                    and json.loads(message)["data"].get("node") == "7":
                break
    finally:
        ws.close()
    assert len(_server_workers(comfy_server)) == 2
    requests.post(f"{comfy_server.url}/interrupt", timeout=10).raise_for_status()
    result = comfy_server.wait(prompt_id, timeout=60)
    assert any(name == "execution_interrupted" for name, _ in result.messages), result.messages
    deadline = time.monotonic() + 30
    while _server_workers(comfy_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _server_workers(comfy_server)
    follow_up = comfy_server.run(load_workflow("wan2.1_t2v_1.3B_dualparal_long"))
    assert follow_up.status == "success", follow_up.error


@pytest.fixture(scope="module")
def wan_i2v(pack):
    """A tiny Wan 2.1 image-to-video model (36 input channels, CLIP image tokens), three layers."""
    return patcher(build_wan("tiny", layers=3, variant="2.1 i2v"))


def test_image_to_video_with_one_block_samples_like_the_stock_workflow(wan_i2v):
    """WanImageToVideo's concat latent + mask and CLIP vision tokens, as ComfyUI's model takes them."""
    import nodes

    conditioning = image_to_video()
    positive, negative, latent = conditioning
    stock = nodes.common_ksampler(wan_i2v, 5, 3, 4.0, "uni_pc", "simple", positive, negative, latent)[0]
    ours, _, _ = dualparal_i2v(wan_i2v, conditioning, "cpu:1", latent["samples"].shape[2], 0, "uni_pc")
    assert relative_difference(ours["samples"], stock["samples"]) <= 1e-4
    without_image = [[t, {k: v for k, v in d.items() if k == "pooled_output"}] for t, d in positive]
    plain = nodes.common_ksampler(wan_i2v, 5, 3, 4.0, "uni_pc", "simple", without_image, without_image, latent)[0]
    assert relative_difference(plain["samples"], stock["samples"]) > 1e-3  # the image conditioning is used


def test_first_last_frame_with_one_block_samples_like_the_stock_workflow(pack):
    """WanFirstLastFrameToVideo: both images in the concat latent, both CLIP outputs (with the FLF
    model's learnt token positions); ranks give the one-rank latent."""
    import nodes
    from comfy_extras.nodes_wan import WanFirstLastFrameToVideo
    from devkit.fixture_nodes import TinyCLIPVision

    flf = patcher(build_wan("tiny", layers=2, variant="2.1 flf2v"))
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(6))
    clip_vision = TinyCLIPVision().load(0, 1280)[0]
    out = WanFirstLastFrameToVideo.execute(POSITIVE, NEGATIVE, build_wan_vae("tiny"), 64, 48, 13, 1, images[:1],
                                           images[1:], clip_vision.encode_image(images[:1]),
                                           clip_vision.encode_image(images[1:]))
    conditioning = out.result if hasattr(out, "result") else out
    positive, negative, latent = conditioning
    stock = nodes.common_ksampler(flf, 5, 3, 4.0, "euler", "simple", positive, negative, latent)[0]
    ours, _, _ = dualparal_i2v(flf, conditioning, "cpu:1", latent["samples"].shape[2], 0)
    assert relative_difference(ours["samples"], stock["samples"]) <= 1e-4
    one, _, _ = dualparal_i2v(flf, conditioning, "cpu:1", 2, 1)
    two, _, _ = dualparal_i2v(flf, conditioning, "cpu:2", 2, 1)
    assert relative_difference(two["samples"], one["samples"]) <= SAMPLING_TOLERANCE


def test_image_to_video_ranks_give_the_latent_of_one_rank(wan_i2v):
    conditioning = image_to_video()
    one, _, _ = dualparal_i2v(wan_i2v, conditioning, "cpu:1", 2, 1)
    three, _, _ = dualparal_i2v(wan_i2v, conditioning, "cpu:3", 2, 1)
    assert relative_difference(three["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    assert not worker_processes()


def test_image_conditioning_that_does_not_fit_the_model_is_refused(wan3, wan_i2v):
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    positive, negative, latent = image_to_video()
    inputs = dict(positive=positive, negative=negative, latent_image=latent, seed=0, steps=2, cfg=4.0,
                  sampler_name="euler", scheduler="simple", devices="cpu:2", frames_per_block=2, cache_frames=1,
                  denoise=1.0)
    with pytest.raises(ValueError, match="carries a start image .WanImageToVideo., but this is a text-to-video model"):
        DualParalSampler.execute(model=wan3, **inputs)
    with pytest.raises(ValueError, match="make both with the same WanImageToVideo node"):
        DualParalSampler.execute(model=wan_i2v, **{**inputs, "latent_image": empty_latent(6, 6, 8)})
    assert not worker_processes()


@pytest.fixture(scope="module")
def low_noise3(pack):
    """A second expert of the same structure as `wan3`, other weights (Wan 2.2 A14B's low-noise one)."""
    return patcher(build_wan("tiny", layers=3, seed=11))


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "uni_pc"])
def test_two_experts_with_one_block_sample_like_the_stock_two_ksampler_advanced_workflow(wan3, low_noise3, sampler):
    """Wan 2.2 A14B as ComfyUI's workflows run it: the high-noise expert for steps 0-1 (leftover noise
    returned), the low-noise one from step 2 (no noise added), both after ModelSamplingSD3."""
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    high, low = (ModelSamplingSD3().patch(m, 8.0)[0] for m in (wan3, low_noise3))
    latent = empty_latent(5)
    first = nodes.KSamplerAdvanced().sample(high, "enable", 5, 4, 4.0, sampler, "simple", POSITIVE, NEGATIVE, latent,
                                            0, 2, "enable")[0]
    stock = nodes.KSamplerAdvanced().sample(low, "disable", 5, 4, 4.0, sampler, "simple", POSITIVE, NEGATIVE, first,
                                            2, 10000, "disable")[0]
    ours, stats, _ = two_experts(high, low, latent, "cpu:1", 2, frames_per_block=5, cache_frames=0, sampler=sampler)
    assert relative_difference(ours["samples"], stock["samples"]) <= 1e-4
    high_only, _, _ = two_experts(high, None, latent, "cpu:1", 2, frames_per_block=5, cache_frames=0, sampler=sampler)
    assert relative_difference(high_only["samples"], ours["samples"]) > 1e-3  # the low-noise expert ran


def test_two_experts_over_ranks_give_the_latent_of_one_rank(wan3, low_noise3):
    """Blocks on both sides of the switch in flight at once; every rank holds its layers of both."""
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    one, _, _ = two_experts(wan3, low_noise3, empty_latent(7), "cpu:1", 2, sampler="uni_pc")
    three, _, _ = two_experts(wan3, low_noise3, empty_latent(7), "cpu:3", 2, sampler="uni_pc")
    assert relative_difference(three["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    assert not worker_processes()
    out = DualParalSampler.execute(model=wan3, positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4),
                                   seed=0, steps=4, cfg=4.0, sampler_name="euler", scheduler="simple", devices="cpu:2",
                                   frames_per_block=2, cache_frames=1, denoise=1.0, low_noise_model=low_noise3,
                                   low_noise_from_step=3)
    report = out.result[1] if hasattr(out, "result") else out[1]
    assert "experts: high noise for steps 0-2, low noise for steps 3-3; both resident on every rank" in report


@pytest.mark.parametrize("sampler", ["euler_ancestral", "uni_pc"])
def test_experts_swapped_per_phase_give_the_latent_of_both_resident(wan3, low_noise3, sampler):
    """One expert on the ranks at a time: every block to the switch with the high-noise expert, then
    every block on with the low-noise one. Each block sees its neighbours at the same steps as with both
    resident, so the latent is the same, over any ranks; the report says which it did."""
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    resident, _, _ = two_experts(wan3, low_noise3, empty_latent(7), "cpu:1", 2, sampler=sampler)
    swapped, stats, _ = two_experts(wan3, low_noise3, empty_latent(7), "cpu:2", 2, sampler=sampler,
                                    placement="swap per phase")
    assert relative_difference(swapped["samples"], resident["samples"]) <= SAMPLING_TOLERANCE
    assert [(s.phase, s.rank) for s in stats] == [("high noise", 0), ("high noise", 1), ("low noise", 0),
                                                  ("low noise", 1)]
    assert not worker_processes()
    inputs = dict(model=wan3, positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4), seed=0, steps=4,
                  cfg=4.0, sampler_name="euler", scheduler="simple", devices="cpu:1", frames_per_block=2,
                  cache_frames=1, denoise=1.0, low_noise_model=low_noise3, low_noise_from_step=3)
    report = DualParalSampler.execute(**inputs, experts_on_ranks="swap per phase").result[1]
    assert "low noise for steps 3-3; swapped per phase: each rank held one expert's layers at a time" in report
    assert "[low noise] rank 0 cpu" in report
    assert "both resident" in DualParalSampler.execute(**inputs).result[1]  # auto on CPU ranks
    with pytest.raises(ValueError, match="experts_on_ranks 'sometimes' is not one of auto, both resident"):
        DualParalSampler.execute(**inputs, experts_on_ranks="sometimes")


def test_auto_swaps_the_experts_where_both_would_not_fit_a_gpu(wan3, low_noise3, monkeypatch):
    """The rule auto follows on GPU ranks, against each GPU's memory (no GPU here: its size is given)."""
    from types import SimpleNamespace
    from comfyui_streamline.core.dualparal import BlockPlan, DualParalRequest, Sampling, rank_weight_bytes
    from comfyui_streamline.glue.dualparal import RESIDENT_SHARE, _swap_experts

    high, low = (m.model.diffusion_model for m in (wan3, low_noise3))
    request = DualParalRequest(high, torch.float32, [], BlockPlan(4, 2, 1, 4, 2), Sampling(torch.ones(5), [1.0] * 4,
                               4.0, torch.zeros(2, 1, 1)), torch.zeros(1, 16, 4, 4, 6), 0, low_noise_model=low)
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    largest = max(rank_weight_bytes(request, 2))
    for memory, swapped in ((largest / RESIDENT_SHARE * 1.01, False), (largest / RESIDENT_SHARE * 0.99, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=memory))
        assert _swap_experts("auto", request, gpus) is swapped
        assert _swap_experts("both resident", request, gpus) is False
    assert sum(rank_weight_bytes(request, 2)) == sum(p.numel() * p.element_size() for m in (high, low)
                                                     for p in m.parameters()) + sum(
        p.numel() * p.element_size() for m in (high, low) for name, p in m.named_parameters()
        if not name.startswith(("blocks.", "patch_embedding.", "head.")))  # time and text embeddings on both ranks


def test_experts_that_do_not_pair_are_refused_before_any_process(wan3, low_noise3):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    inputs = dict(positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4), seed=0, steps=4, cfg=4.0,
                  sampler_name="euler", scheduler="simple", devices="cpu:2", frames_per_block=2, cache_frames=1,
                  denoise=1.0)
    two_layers = patcher(build_wan("tiny", layers=2, seed=11))
    with pytest.raises(ValueError, match="the low-noise expert does not match the model .layers 3 vs 2.: give the two "
                                         "experts of one Wan 2.2 A14B model"):
        DualParalSampler.execute(model=wan3, low_noise_model=two_layers, low_noise_from_step=2, **inputs)
    with pytest.raises(ValueError, match="set low_noise_from_step between 1 and 3"):
        DualParalSampler.execute(model=wan3, low_noise_model=low_noise3, low_noise_from_step=4, **inputs)
    with pytest.raises(ValueError, match="the experts' model sampling differs"):
        DualParalSampler.execute(model=ModelSamplingSD3().patch(wan3, 5.0)[0], low_noise_model=low_noise3,
                                 low_noise_from_step=2, **inputs)
    with pytest.raises(ValueError, match="low_noise_model: the MODEL's model sampling is .*, not Wan's flow matching"):
        DualParalSampler.execute(model=wan3, low_noise_model=patcher(build_svd("tiny")), low_noise_from_step=2,
                                 **inputs)
    assert not worker_processes()


def test_attention_patches_and_wrappers_it_cannot_run_are_refused_not_ignored(wan3, low_noise3):
    """Attention patches, model wrappers and caching hooks live in the MODEL's options as Python
    callables around the layers, which the ranks do not run: refused before any process, naming
    them; its own slicing settings and the Memory Planner's retry pass."""
    from comfyui_streamline.nodes.dualparal import DualParalSampler
    from comfyui_streamline.nodes.planner import MemoryPlanner

    inputs = dict(positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4), seed=0, steps=2, cfg=4.0,
                  sampler_name="euler", scheduler="simple", devices="cpu:1", frames_per_block=2, cache_frames=1,
                  denoise=1.0)
    attention = wan3.clone()
    attention.set_model_attn1_patch(lambda q, k, v, extra_options: (q, k, v))
    with pytest.raises(ValueError, match=r"the low_noise_model carries patches .*transformer_options patches"):
        DualParalSampler.execute(model=wan3, low_noise_model=attention, low_noise_from_step=1, **inputs)
    wrapped = wan3.clone()
    wrapped.add_wrapper_with_key("outer_sample", "some_cache", lambda executor, *a, **k: executor(*a, **k))
    with pytest.raises(ValueError, match=r"wrapper outer_sample \(some_cache\)"):
        DualParalSampler.execute(model=wrapped, **inputs)
    batched = wan3.clone()
    batched.set_model_sampler_calc_cond_batch_function(lambda args: None)
    with pytest.raises(ValueError, match=r"\(sampler_calc_cond_batch_function\)"):
        DualParalSampler.execute(model=batched, **inputs)
    planned = node_output(MemoryPlanner, wan3, empty_latent(4), 64.0, True)
    assert "experts" not in DualParalSampler.execute(model=planned, **inputs).result[1]


def test_cfg_patches_are_honoured_like_stock_ksampler_and_over_ranks(wan3, low_noise3):
    """RescaleCFG, CFGZeroStar and APG run in ComfyUI's own sampling function on each block's
    predictions: one block equals stock KSampler with the same patches, any ranks equal one rank,
    and each expert's own patches apply to its steps."""
    import nodes

    latent = empty_latent(5)
    patched = cfg_patched(wan3)
    stock = nodes.common_ksampler(patched, 5, 3, 4.0, "euler", "simple", POSITIVE, NEGATIVE, latent, denoise=1.0)[0]
    ours, _, _ = dualparal(patched, latent, "cpu:1", frames_per_block=5, cache_frames=0)
    assert relative_difference(ours["samples"], stock["samples"]) <= 1e-4
    plain, _, _ = dualparal(wan3, latent, "cpu:1", frames_per_block=5, cache_frames=0)
    assert relative_difference(plain["samples"], ours["samples"]) > 1e-3  # the patches changed the result

    one, _, _ = dualparal(patched, empty_latent(7), "cpu:1", sampler="dpmpp_2m")
    two, _, _ = dualparal(patched, empty_latent(7), "cpu:2", sampler="dpmpp_2m")
    assert relative_difference(two["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    assert not worker_processes()

    high, low = cfg_patched(wan3), low_noise3
    common = dict(add_noise="enable", steps=4, cfg=4.0, sampler_name="euler", scheduler="simple",
                  positive=POSITIVE, negative=NEGATIVE)
    first = nodes.KSamplerAdvanced().sample(high, noise_seed=5, latent_image=latent, start_at_step=0, end_at_step=2,
                                            return_with_leftover_noise="enable", **common)[0]
    stock = nodes.KSamplerAdvanced().sample(low, noise_seed=5, latent_image=first, start_at_step=2, end_at_step=4,
                                            return_with_leftover_noise="disable", **{**common, "add_noise": "disable"})[0]
    ours, _, _ = two_experts(high, low, latent, "cpu:1", 2, frames_per_block=5, cache_frames=0)
    assert relative_difference(ours["samples"], stock["samples"]) <= 1e-4


def test_cfg_patches_that_run_the_model_or_carry_state_are_refused_before_any_process(wan3):
    from comfy_extras.nodes_apg import APG
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    inputs = dict(positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4), seed=0, steps=2, cfg=4.0,
                  sampler_name="euler", scheduler="simple", devices="cpu:2", frames_per_block=2, cache_frames=1,
                  denoise=1.0)
    runs_the_model = wan3.clone()
    runs_the_model.set_model_sampler_post_cfg_function(lambda args: args["model"].apply_model(args["input"]))
    with pytest.raises(ValueError, match=r"a CFG patch of the MODEL \(sampler_post_cfg_function\) runs the model "
                                         r"itself \(it reads model.apply_model\)"):
        DualParalSampler.execute(model=runs_the_model, **inputs)
    momentum = node_output(APG, wan3, 1.5, 0.0, 0.5)
    with pytest.raises(ValueError, match="carries state from step to step, such as APG's momentum"):
        DualParalSampler.execute(model=momentum, **inputs)
    assert not worker_processes()
    one_block, _, _ = dualparal(momentum, empty_latent(4), "cpu:1", frames_per_block=4, cache_frames=0)
    stock = __import__("nodes").common_ksampler(momentum, 5, 3, 4.0, "euler", "simple", POSITIVE, NEGATIVE,
                                                empty_latent(4), denoise=1.0)[0]
    assert relative_difference(one_block["samples"], stock["samples"]) <= 1e-4  # the probe left no state behind


@pytest.mark.parametrize("guidance", ["PerturbedAttentionGuidance", "SkipLayerGuidanceDiT"])
def test_guidance_that_runs_the_model_is_refused_before_any_process_whatever_its_window(wan3, guidance):
    """PerturbedAttentionGuidance and SkipLayerGuidanceDiT (its default window: 1 to 15 % of the
    schedule) run the model from their CFG patch: refused with the fix before any process starts."""
    import importlib
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    if guidance == "PerturbedAttentionGuidance":
        guided = node_output(importlib.import_module("comfy_extras.nodes_pag").PerturbedAttentionGuidance, wan3, 3.0)
    else:  # its defaults: scale 3, 1 % to 15 % of the schedule; layer 1 of the tiny model
        guided = node_output(importlib.import_module("comfy_extras.nodes_slg").SkipLayerGuidanceDiT, wan3, 3.0,
                             0.01, 0.15, "1", "1", 0.0)
    inputs = dict(positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4), seed=0, steps=20, cfg=4.0,
                  sampler_name="euler", scheduler="simple", devices="cpu:2", frames_per_block=2, cache_frames=1,
                  denoise=1.0)
    with pytest.raises(ValueError, match=r"^DualParal Multi-GPU Sampler: a CFG patch of the MODEL .*runs the model "
                                         r"itself.*Remove that node"):
        DualParalSampler.execute(model=guided, **inputs)
    assert not worker_processes()


def test_layers_that_cannot_be_sent_to_workers_are_refused_before_any_process(pack):
    """ComfyUI makes fp8-scaled / quantized layer classes inside functions: pickling them to a worker
    would fail deep inside multiprocessing. A run in ComfyUI's own process does not send them."""
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    model = patcher(build_wan("tiny", layers=2))
    linear = model.model.diffusion_model.blocks[0].ffn[0]

    class ScaledLinear(type(linear)):  # defined in a function, as ComfyUI's scaled_fp8_ops / mixed_precision_ops
        pass
    linear.__class__ = ScaledLinear
    inputs = dict(model=model, positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4), seed=0, steps=2,
                  cfg=4.0, sampler_name="euler", scheduler="simple", frames_per_block=2, cache_frames=1, denoise=1.0)
    with pytest.raises(ValueError, match="fp8-scaled or quantized weights.*load the fp16 / bf16 files"):
        DualParalSampler.execute(devices="cpu:2", **inputs)
    assert not worker_processes()
    assert DualParalSampler.execute(devices="cpu:1", **inputs).result[0]["samples"].abs().max() > 0


def test_wan22_ti2v_5b_image_to_video_samples_like_stock_and_over_ranks(pack):
    """The 5B model's start image: frame 0 kept at the image latent (KSamplerX0Inpaint's blend) and
    one timestep per frame (0 for the kept frame, WAN22's process_timestep)."""
    import nodes

    ti2v = patcher(build_wan("tiny", layers=2, variant="2.2 ti2v 5B"))
    latent = ti2v_5b_conditioning()
    assert "noise_mask" in latent
    stock = nodes.common_ksampler(ti2v, 5, 3, 4.0, "uni_pc", "simple", POSITIVE, NEGATIVE, latent)[0]
    frames = latent["samples"].shape[2]
    from comfyui_streamline.glue.dualparal import sample
    ours, _, _ = sample(ti2v, POSITIVE, NEGATIVE, latent, 5, 3, 4.0, "uni_pc", "simple", "cpu:1", frames, 0, 1.0)
    assert relative_difference(ours["samples"], stock["samples"]) <= 1e-4
    unmasked = {"samples": latent["samples"]}
    plain, _, _ = sample(ti2v, POSITIVE, NEGATIVE, unmasked, 5, 3, 4.0, "uni_pc", "simple", "cpu:1", frames, 0, 1.0)
    assert relative_difference(plain["samples"], ours["samples"]) > 1e-3  # the mask is applied
    one, _, _ = sample(ti2v, POSITIVE, NEGATIVE, latent, 5, 3, 4.0, "euler", "simple", "cpu:1", 2, 1, 1.0)
    two, _, _ = sample(ti2v, POSITIVE, NEGATIVE, latent, 5, 3, 4.0, "euler", "simple", "cpu:2", 2, 1, 1.0)
    assert relative_difference(two["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    assert not worker_processes()


def test_wan22_ti2v_5b_with_the_feature_slicer_inside_every_rank(pack):
    """Per-frame timesteps through sliced blocks: the same latent as unsliced ranks."""
    from comfyui_streamline.glue.dualparal import sample
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    ti2v = patcher(build_wan("tiny", layers=2, variant="2.2 ti2v 5B"))
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, ti2v, 3, 0))
    latent = ti2v_5b_conditioning(17)
    stock, _, _ = sample(ti2v, POSITIVE, NEGATIVE, latent, 5, 3, 4.0, "euler", "simple", "cpu:2", 3, 1, 1.0)
    ours, _, _ = sample(sliced, POSITIVE, NEGATIVE, latent, 5, 3, 4.0, "euler", "simple", "cpu:2", 3, 1, 1.0)
    assert relative_difference(ours["samples"], stock["samples"]) <= SAMPLING_TOLERANCE
