"""The DualParal pipeline over ranks: the first rank holds the latent blocks and the sampler, every
rank runs its layers for each job in the schedule's order and hands the hidden states on in a ring
(the last rank hands the model's prediction back to the first).

Each block is sampled by the host's own sampler function (samplers.py) with the MODEL's flow model
sampling. Classifier-free guidance combines the denoised predictions as ComfyUI's cfg_function does,
or, for a MODEL with CFG patches, in the host's own sampling function (`Guidance`: the first rank
asks the host process, which holds the patches).
A job needs the states its block and the block before it had at the end of the previous
iteration; with several ranks the first rank takes in pending predictions only when a job needs
them, so the ring stays full while enough blocks are in flight.
"""
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .samplers import BlockSampler, CoordinatedNoise, host_flow_sampling, host_sampler
from .schedule import BlockPlan, DualParalError, Job
from .wan_stage import WanStage


@dataclass
class Sampling:
    sigmas: torch.Tensor  # steps + 1 noise levels, float32
    timesteps: list  # the model's timestep for each step's sigma
    cfg: float
    context: torch.Tensor  # text conditioning, [positive, negative] along the batch (positive only at cfg 1)
    sampler: str = "euler"  # a key of samplers.SAMPLERS
    flow: dict = field(default_factory=lambda: {"shift": 1.0, "multiplier": 1000.0, "noise_scale": 1.0})
    seed: int = 0  # of the samplers' own noise (ancestral samplers)
    # image-to-video: the channels concatenated to the input over the whole video (c_concat: mask + image
    # latents), and CLIP vision tokens; batch rows as `context`'s
    image: Optional[torch.Tensor] = None
    clip: Optional[torch.Tensor] = None
    # Wan 2.2 TI2V-5B image-to-video: the latent's denoise mask (0 where the start image's frames are
    # kept), latent-shaped, and each frame's timestep factor (the host model's process_timestep)
    mask: Optional[torch.Tensor] = None
    frame_scale: Optional[list] = None
    host_guidance: bool = False  # the MODEL's CFG patches run in the host: the first rank asks it (Guidance)

    def frame_factors(self, first: int, stop: int) -> Optional[tuple]:
        """Timestep factors of frames [first, stop), None where every one is 1 (one timestep)."""
        factors = tuple(self.frame_scale[first:stop]) if self.frame_scale is not None else ()
        return factors if any(f != 1.0 for f in factors) else None

    @property
    def batch(self) -> int:
        return self.context.shape[0]


@dataclass
class RankStats:
    rank: int
    device: str
    layers: tuple  # (first, stop) transformer layer indices
    jobs: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    sent_bytes: int = 0
    peak_bytes: int = 0
    phase: str = ""  # with the experts swapped per phase: the expert this rank's run held


class Ring:
    """Point-to-point sends to the next rank and receives from the previous one (wrapping around).

    The way back (last rank -> first) has its own group, so with two ranks the predictions coming
    back do not queue behind the hidden states going out on the same NCCL communicator. The first
    rank posts the receive of a job's prediction as soon as it has sent the job: a send completes
    only once its receive is posted, and the first rank takes a prediction in only when a later job
    needs it, so without that the ring would jam as soon as more blocks are in flight than it holds."""

    def __init__(self, rank: int, world: int, device: torch.device, stats: RankStats):
        self.next, self.previous = (rank + 1) % world, (rank - 1) % world
        self.device, self.stats = device, stats
        back = dist.new_group([0, world - 1])  # every rank takes part in creating it
        self._send_group = back if rank == world - 1 else None
        self._receive_group = back if rank == 0 else None
        self._in_flight = deque()

    def send(self, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        self._in_flight.append((dist.isend(tensor, self.next, group=self._send_group), tensor))
        self.stats.sent_bytes += tensor.numel() * tensor.element_size()
        while len(self._in_flight) > 2:
            self._in_flight.popleft()[0].wait()

    def post_receive(self, shape: tuple, dtype: torch.dtype) -> tuple:
        """(work, buffer) of a receive posted now; `wait` takes it in."""
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return dist.irecv(buffer, self.previous, group=self._receive_group), buffer

    def wait(self, posted: tuple) -> torch.Tensor:
        started = time.perf_counter()
        posted[0].wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.stats.wait_s += time.perf_counter() - started
        return posted[1]

    def receive(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return self.wait(self.post_receive(shape, dtype))

    def close(self) -> None:
        while self._in_flight:
            self._in_flight.popleft()[0].wait()


class _Timer:
    def __init__(self, stats: RankStats, device: torch.device):
        self.stats, self.cuda = stats, device.type == "cuda"

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:  # this stream only: a device-wide sync would also wait for the ring's transfers
            torch.cuda.current_stream().synchronize()
        seconds = time.perf_counter() - self.started
        self.stats.compute_s += seconds
        self.stats.jobs += 1


# (x, sigma, denoised, expert) -> the guided prediction: x the block's model input, sigma of shape (1,),
# denoised the model's predictions for the rows of the text context ([positive, negative] or [positive]),
# expert the index of the expert that made them
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def cfg_guidance(cfg: float) -> Guidance:
    """Plain classifier-free guidance, as ComfyUI's cfg_function without patches."""
    def guide(x, sigma, denoised, expert):
        return denoised if denoised.shape[0] == 1 else denoised[1:] + (denoised[:1] - denoised[1:]) * cfg
    return guide


def relayed_guidance(ask: Callable[[dict, int], torch.Tensor]) -> Guidance:
    """Guidance computed elsewhere: `ask` takes the CPU tensors {x, sigma, denoised} and the expert's
    index and returns the guided prediction."""
    def guide(x, sigma, denoised, expert):
        tensors = {"x": x, "sigma": sigma, "denoised": denoised}
        guided = ask({name: t.detach().to("cpu", torch.float32) for name, t in tensors.items()}, expert)
        if not isinstance(guided, torch.Tensor) or guided.shape != x.shape:
            raise DualParalError(f"the host's guidance answered with {getattr(guided, 'shape', guided)!r}, not a "
                                 f"prediction of shape {tuple(x.shape)}")
        return guided.to(x.device, x.dtype)
    return guide


class FirstRank:
    """The latent blocks being denoised, each with its sampler, and the finished output. `guide`:
    how predictions are combined (plain CFG by default)."""

    def __init__(self, stage: WanStage, plan: BlockPlan, sampling: Sampling, latent: torch.Tensor,
                 noise: torch.Tensor, output: torch.Tensor, guide: Optional[Guidance] = None):
        self.stage, self.plan, self.sampling = stage, plan, sampling
        self.guide = guide or cfg_guidance(sampling.cfg)
        self.latent, self.noise, self.output = latent, noise, output
        self.blocks = plan.blocks
        self.function = host_sampler(sampling.sampler)
        self.model_sampling = host_flow_sampling(sampling.flow)
        self.sampler_noise = CoordinatedNoise(sampling.seed, plan.cache_frames, len(self.blocks))
        self.samplers = {}

    def _frames(self, block: int) -> torch.Tensor:
        if block in self.samplers:
            return self.samplers[block].x
        frames = self.blocks[block]  # finished: its final state is in the output, noise scaling undone
        final = self.output[:, :, frames.start:frames.stop].to(self.stage.device)
        return self.model_sampling.noise_scaling(self.sampling.sigmas[-1:].to(final.device), torch.zeros_like(final),
                                                 final)

    def input(self, job: Job) -> torch.Tensor:
        if job.step == 0:
            frames = self.blocks[job.block]
            sigmas = self.sampling.sigmas.to(self.stage.device)
            x = self.model_sampling.noise_scaling(
                sigmas[:1], self.noise[:, :, frames.start:frames.stop].to(self.stage.device),
                self.latent[:, :, frames.start:frames.stop].to(self.stage.device))
            switch = self.plan.expert_switch
            phases = [sigmas[:switch + 1], sigmas[switch:]] if switch else [sigmas]
            self.samplers[job.block] = BlockSampler(self.function, self.model_sampling, x, phases, self.sampling.seed,
                                                    lambda start, block=job.block: self.sampler_noise.sampler(block, start))
        sampler = self._expect_call(job)
        own = sampler.x
        if job.context_frames:
            own = torch.cat([self._frames(job.block - 1)[:, :, -job.context_frames:], own], dim=2)
        start = self.blocks[job.block].start - job.context_frames
        own = self._keep_masked(own, start).expand(self.sampling.batch, *own.shape[1:])
        if self.sampling.image is None:
            return own
        image = self.sampling.image[:, :, start:start + own.shape[2]].to(own.device, own.dtype)
        return torch.cat([own, image.expand(own.shape[0], *image.shape[1:])], dim=1)

    def _keep_masked(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Frames [start, start + len) of the video with the denoise mask's kept part set to the input
        latent, as ComfyUI's KSamplerX0Inpaint does (for models whose scale_latent_inpaint is the latent)."""
        if self.sampling.mask is None:
            return x
        frames = slice(start, start + x.shape[2])
        mask = self.sampling.mask[:, :, frames].to(x.device, x.dtype)
        return x * mask + self.latent[:, :, frames].to(x.device, x.dtype) * (1.0 - mask)

    def _expect_call(self, job: Job) -> BlockSampler:
        sampler = self.samplers[job.block]
        sigma = float(self.sampling.sigmas[job.step])
        if sampler.finished or sampler.calls != job.step + 1 or not math.isclose(
                float(sampler.sigma), sigma, rel_tol=1e-5, abs_tol=1e-7):
            raise DualParalError(f"the sampler {self.sampling.sampler} does not call the model once per step at the "
                                 f"step's sigma (step {job.step}: sigma {sigma}), which DualParal's pipeline needs.")
        return sampler

    def update(self, job: Job, prediction: torch.Tensor) -> None:
        sampler = self._expect_call(job)
        sigma = self.sampling.sigmas[job.step:job.step + 1].to(prediction.device)
        start = self.blocks[job.block].start
        x = self._keep_masked(sampler.x, start)
        denoised = self.model_sampling.calculate_denoised(sigma, prediction, x)
        sampler.give(self._keep_masked(self.guide(x, sigma, denoised, job.expert), start))
        if job.step == self.plan.steps - 1:
            if not sampler.finished:
                sampler.close()
                raise DualParalError(f"the sampler {self.sampling.sampler} calls the model more often than once per "
                                     f"step, which DualParal's pipeline cannot run.")
            frames = self.blocks[job.block]
            final = self.model_sampling.inverse_noise_scaling(self.sampling.sigmas[-1:].to(sampler.x.device), sampler.x)
            self.output[:, :, frames.start:frames.stop] = final.to(self.output.device)
            del self.samplers[job.block]
            self.sampler_noise.release(job.block)

    def close(self) -> None:
        """Ends the samplers of blocks still in flight (after a failure)."""
        for sampler in self.samplers.values():
            sampler.close()
        self.samplers.clear()


def run_rank(stages: list, plan: BlockPlan, sampling: Sampling, stats: RankStats, ring: Optional[Ring] = None,
             first_rank: Optional[FirstRank] = None, progress: Callable[[int, int], None] = lambda done, total: None):
    """Runs every job of `plan` on this rank: `stages` holds the rank's WanStage of each expert (one
    for a single model). The first rank passes `first_rank`; with one rank (no ring) it runs the
    whole model and updates in place."""
    try:
        _run_jobs(stages, plan, sampling, stats, ring, first_rank, progress)
    finally:
        if first_rank is not None:
            first_rank.close()


def _run_jobs(stages, plan, sampling, stats, ring, first_rank, progress):
    contexts = [stage.text(sampling.context, sampling.clip) for stage in stages]
    batch = sampling.batch
    timer = _Timer(stats, stages[0].device)
    jobs = plan.jobs()
    pending = deque()
    done = 0

    def take_prediction():
        nonlocal done
        job, posted = pending.popleft()
        first_rank.update(job, ring.wait(posted))
        done += 1
        progress(done, len(jobs))

    for job in jobs:
        stage = stages[job.expert]
        start = plan.blocks[job.block].start
        e, e0 = stage.time(sampling.timesteps[job.step], batch,
                           sampling.frame_factors(start - job.context_frames, start + job.frames))
        if stage.first:
            while any(p.iteration < job.iteration and p.block in (job.block, job.block - 1) for p, _ in pending):
                take_prediction()
            hidden = first_rank.input(job)
        else:
            hidden = ring.receive(stage.hidden_shape(job, batch), stage.dtype)
        with timer:
            if stage.first:
                hidden = stage.embed(hidden)
            hidden = stage.layers(hidden, job, e0, contexts[job.expert])
            if stage.last:
                hidden = stage.head(hidden, job, e)
        if ring is None:
            first_rank.update(job, hidden)
            done += 1
            progress(done, len(jobs))
        else:
            ring.send(hidden)
            if stage.first:
                shape = (batch, stage.model.out_dim, job.frames, stage.height, stage.width)
                pending.append((job, ring.post_receive(shape, torch.float32)))
        del hidden
    while pending:
        take_prediction()
    if ring is not None:
        ring.close()
