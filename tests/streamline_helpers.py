"""What several test modules share: tolerances, model and node helpers, sampling calls, DualParal
runs and recordings. Fixtures live in conftest.py."""
import random
import threading
from contextlib import contextmanager

import psutil
import torch
from PIL import Image

from devkit.model_fixtures import SVD_CONTEXT_DIM, WAN_TEXT_DIM, build_wan_vae


# ---- exactness, ModelPatcher, nodes, SVD -------------------------------------------------------

TOLERANCE = 1e-5  # fp32: max abs difference relative to the output's scale


# A sampled latent carries the sampler's amplification of fp32 rounding: on the micro SVD, stock fp32
# sampling is itself 5.6e-5 away from the same sampling in float64
# (test_sliced_sampling_is_as_close_to_float64_as_stock checks slicing adds no more than that).
SAMPLING_TOLERANCE = 1e-4


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def patcher(model):
    import comfy.model_management
    import comfy.model_patcher
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def svd_conditioning(frames: int, height: int, width: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    concat = torch.randn(1, 4, height, width, generator=generator)
    extra = {"fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0, "concat_latent_image": concat}
    positive = [[torch.randn(1, 1, SVD_CONTEXT_DIM, generator=generator), dict(extra)]]
    negative = [[torch.zeros(1, 1, SVD_CONTEXT_DIM), {**extra, "concat_latent_image": torch.zeros_like(concat)}]]
    return positive, negative


def sample_svd(model, frames=5, height=5, width=7, steps=2, cfg=2.5, seed=3):
    import comfy.sample
    latent = torch.zeros(frames, 4, height, width)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = svd_conditioning(frames, height, width)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "karras", positive, negative, latent,
                               seed=seed, disable_pbar=True)


def node_output(node_class, *args):
    return node_class.execute(*args).result[0]

# ---- Wan ---------------------------------------------------------------------------------------

def wan_forward(model, frames, height, width, seed=0, timestep=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, height, width, generator=generator)
    context = torch.randn(1, 20, WAN_TEXT_DIM, generator=generator)
    model.patch_model()
    try:
        with torch.inference_mode():
            return model.model.diffusion_model(x, torch.tensor([0.6]) if timestep is None else timestep, context,
                                               transformer_options=model.model_options.get("transformer_options", {}))
    finally:
        model.unpatch_model()


def sample_wan(model, frames=3):
    import comfy.sample

    latent = torch.zeros(1, 16, frames, 6, 8)
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 12, WAN_TEXT_DIM, generator=generator), {}]]
    negative = [[torch.zeros(1, 12, WAN_TEXT_DIM), {}]]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 4), 3, 4.0, "euler", "simple",
                               positive, negative, latent, seed=4, disable_pbar=True)

# ---- DualParal ---------------------------------------------------------------------------------

def wan_conditioning(seed: int, tokens: int = 12):
    return [[torch.randn(1, tokens, WAN_TEXT_DIM, generator=torch.Generator().manual_seed(seed)), {}]]


POSITIVE, NEGATIVE = wan_conditioning(1), wan_conditioning(2, tokens=8)


def empty_latent(frames, height=4, width=6):
    return {"samples": torch.zeros(1, 16, frames, height, width)}


def dualparal(model, latent, devices, frames_per_block=2, cache_frames=1, steps=3, cfg=4.0, seed=5, denoise=1.0,
              sampler="euler", scheduler="simple"):
    from comfyui_streamline.glue.dualparal import sample
    return sample(model, POSITIVE, NEGATIVE, latent, seed, steps, cfg, sampler, scheduler, devices, frames_per_block,
                  cache_frames, denoise)


def worker_processes() -> list:
    """This process's DualParal workers (spawned children, not multiprocessing's resource tracker)."""
    def is_worker(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(process.cmdline())
        except psutil.Error:  # ended meanwhile
            return False
    return [p for p in psutil.Process().children(recursive=True) if is_worker(p)]


@contextmanager
def run_in_thread(model, devices):
    """A long DualParal run in a thread, yielded once its ranks are sampling (the first progress)."""
    import comfy.utils

    sampling, outcome = threading.Event(), {}
    comfy.utils.set_progress_bar_global_hook(lambda *args, **kwargs: sampling.set())

    def run():
        try:
            outcome["result"] = dualparal(model, empty_latent(8), devices, steps=100000)
        except BaseException as error:  # noqa: BLE001 (the test inspects it)
            outcome["error"] = error
    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert sampling.wait(120) and thread.is_alive(), outcome
        yield thread, outcome
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        thread.join(timeout=60)


def image_to_video(start_frames: int = 1, length: int = 13):
    """WanImageToVideo's conditioning and latent for a start image (and its CLIP vision tokens)."""
    from comfy_extras.nodes_wan import WanImageToVideo
    from devkit.fixture_nodes import TinyCLIPVision

    image = torch.rand(start_frames, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    clip_vision = TinyCLIPVision().load(0, 1280)[0].encode_image(image[:1])
    out = WanImageToVideo.execute(POSITIVE, NEGATIVE, build_wan_vae("tiny"), 64, 48, length, 1, image, clip_vision)
    positive, negative, latent = out.result if hasattr(out, "result") else out
    return positive, negative, latent


def dualparal_i2v(model, conditioning, devices, frames_per_block, cache_frames, sampler="euler"):
    from comfyui_streamline.glue.dualparal import sample
    positive, negative, latent = conditioning
    return sample(model, positive, negative, latent, 5, 3, 4.0, sampler, "simple", devices, frames_per_block,
                  cache_frames, 1.0)


def two_experts(high, low, latent, devices, switch, frames_per_block=2, cache_frames=1, steps=4, sampler="euler",
                seed=5, placement="auto"):
    from comfyui_streamline.glue.dualparal import sample
    return sample(high, POSITIVE, NEGATIVE, latent, seed, steps, 4.0, sampler, "simple", devices, frames_per_block,
                  cache_frames, 1.0, low, switch, placement)


def cfg_patched(model):
    """The MODEL with three of ComfyUI's CFG patches: a cfg function, a post-cfg and a pre-cfg function."""
    from comfy_extras.nodes_apg import APG
    from comfy_extras.nodes_cfg import CFGZeroStar
    from comfy_extras.nodes_model_advanced import RescaleCFG

    model = RescaleCFG().patch(model, 0.7)[0]
    model = node_output(CFGZeroStar, model)
    return node_output(APG, model, 1.5, 0.0, 0.0)


def ti2v_5b_conditioning(length: int = 21):
    """Wan22ImageToVideoLatent: the start image's latent in frame 0, kept by the noise mask."""
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent
    from devkit.fixture_nodes import TinyWan22VAE

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(8))
    out = Wan22ImageToVideoLatent.execute(TinyWan22VAE().load(0)[0], 64, 64, length, 1, image)
    return (out.result if hasattr(out, "result") else out)[0]

# ---- a headless ComfyUI's outputs --------------------------------------------------------------

def frame_count(path) -> int:
    with Image.open(path) as image:
        return getattr(image, "n_frames", 1)


def saved_files(result, comfy_server, suffix):
    return [p for p in result.files(comfy_server.output_dir) if p.suffix == suffix]

# ---- Memory Monitor recordings -----------------------------------------------------------------

GIB = 1024 ** 3


LONG_TITLE = "A Very Long Custom Node Title That Somebody Typed Into The Title Field (copy)"


def recording_of(n_steps: int, durations: str, vram: bool, long_labels: bool):
    """A recording as the Recorder makes it: steps back to back, samples every 0.1 s (at most 2000)."""
    from comfyui_streamline.core.memory.recording import Recording, Sample, StepRecord

    rng = random.Random(n_steps * 7 + len(durations))
    recording = Recording(f"{n_steps}-{durations}")
    if not vram:
        recording.vram_note = "VRAM unavailable: no CUDA device visible to this process"
    t = 0.0
    for i in range(n_steps):
        length = {"short": 1e-4, "long": 900.0, "mixed": rng.choice([1e-4, 0.01, 0.5, 30.0, 600.0])}[durations]
        label = f"#{i + 1} {LONG_TITLE if long_labels and i % 2 == 0 else 'KSampler'}"
        recording.steps.append(StepRecord(str(i + 1), label, t, t + length, ram_peak=int((1 + rng.random()) * GIB),
                                          vram_peak=int(rng.random() * 20 * GIB) if vram else None))
        t += length
    count = min(2000, max(2, int(t / 0.1)))
    for k in range(count):
        st = t * k / (count - 1)
        vram_now = int(rng.random() * 18 * GIB) if vram else None
        device_now = int(rng.random() * 22 * GIB) if vram else None
        recording.samples.append(Sample(st, int((1 + rng.random()) * GIB), vram_now, device_now, None))
    return recording
