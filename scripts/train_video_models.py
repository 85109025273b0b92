"""Trains small Wan 2.1 text-to-video models on procedural sprite videos, on a CPU, with ComfyUI's own
classes, and measures them on held-out clips.

    nice -n 10 .venv/bin/python scripts/train_video_models.py          # VAE, DiT, evaluation; resumes if stopped
    .venv/bin/python scripts/train_video_models.py wan-vae             # one phase (wan-vae, wan-dit, evaluate)
    .venv/bin/python scripts/train_video_models.py --quick             # a few steps of each, under artifacts/

The data: devkit/sprite_videos.prompt_video, one sprite ("disc", "square", "triangle") moving left,
right, up or down, 17 frames of 64x64, the prompt saying which ("square moving up": 12 prompts).

1. wan-vae: ComfyUI's WanVAE (comfy.ldm.wan.vae, the architecture VAELoader detects; dim 16, z_dim 16,
   8x spatial and 4x temporal compression, trained through its own chunked causal encode/decode) as a
   KL autoencoder. Afterwards a per-channel affine map is folded into its 1x1x1 conv1 (mean half) and
   conv2, so that what VAE Encode gives, after ComfyUI's Wan21 latent_format.process_in, has zero mean and
   unit variance per channel on training clips (reconstructions are unchanged).
2. wan-dit: ComfyUI's Wan 2.1 T2V model (comfy.model_base.WAN21 around comfy.ldm.wan.model.WanModel:
   dim 256, 2 heads, text_dim 4096, freq_dim 256) trained by rectified flow exactly as ComfyUI samples it:
   x0 = process_in(VAE encode), x_t = model_sampling.noise_scaling(sigma, noise, x0) = (1 - sigma) x0 +
   sigma noise, the prediction is BaseModel.apply_model(x_t, sigma, c_crossattn=text) (timestep
   sigma * 1000 inside), whose velocity (x_t - denoised) / sigma is regressed on noise - x0. sigma is
   time_snr_shift(SHIFT, u), u uniform: the schedule ModelSamplingSD3 gives with shift 3 (its default).
   The text is the fixture TextEmbedding node's output for the prompt (16 tokens of width 4096); 10 % of
   the samples get the embedding of "" instead, the negative prompt for CFG.
3. evaluate: loads the saved files through ComfyUI's UNETLoader and VAELoader, measures the held-out
   denoising loss at fixed sigmas, samples every prompt with ComfyUI's KSampler (common_ksampler) and
   scores the decoded videos with devkit/video_metrics next to the held-out ground truth and its VAE
   reconstructions; writes bench/results/trained_models.json and PNG strips.

Every batch is drawn from seeds (disjoint from the held-out ones) and every step's noise from a seeded
generator, so a run is reproducible; checkpoints every 50 steps (artifacts/video_train/) let a
stopped run go on.
"""
import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from devkit.comfy_env import comfyui_version, import_comfyui  # noqa: E402
from devkit.sprite_workflows import (CFG, DIT_FILE, FRAMES, HEIGHT, SAMPLER, SHIFT, STEPS, TEXT_TOKENS,  # noqa: E402
                                      TEXT_WIDTH, VAE_FILE, WIDTH)
from devkit.sprite_videos import PROMPT_HELD_OUT_SEEDS, PROMPTS, parse_prompt, prompt_batch  # noqa: E402
from devkit.video_metrics import motion_measures  # noqa: E402

log = logging.getLogger("train_video_models")
CHECKPOINT_EVERY = 50
LATENT_SHAPE = (16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
DIT_CONFIG = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, out_dim=16,
                  freq_dim=256, text_dim=4096, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
                  dim=256, ffn_dim=1024, num_heads=2, num_layers=4)
VAE_DIM = 16
EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
PHASE_IDS = {"wan_vae": 0, "latent_bank": 1, "wan_dit": 2}


class Stopped(Exception):
    pass


# --- common ------------------------------------------------------------------------------------------

def batch_seeds(seed: int, phase: str, step: int, batch: int) -> range:
    first = ((seed * 4 + PHASE_IDS[phase]) * 1_000_000 + step) * batch
    seeds = range(first, first + batch)
    assert seeds[-1] < PROMPT_HELD_OUT_SEEDS.start, "training seeds must stay below the held-out ones"
    return seeds


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def clips_in(seeds, frames: int = FRAMES) -> tuple:
    """(clips (n, 3, frames, h, w) in [-1, 1] as the VAE takes them, prompts)."""
    clips, prompts = prompt_batch(seeds, frames, HEIGHT, WIDTH)
    return clips.permute(0, 2, 1, 3, 4) * 2 - 1, prompts


def torch_default_init_(module: torch.nn.Module) -> torch.nn.Module:
    """ComfyUI's ops leave weights uninitialised: torch's default init for convolutions and linear
    layers, ones and zeros for norms."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            torch.nn.Linear.reset_parameters(sub)
        elif isinstance(sub, torch.nn.modules.conv._ConvNd):
            torch.nn.modules.conv._ConvNd.reset_parameters(sub)
        elif isinstance(sub, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and sub.weight is not None:
            torch.nn.init.ones_(sub.weight)
            if sub.bias is not None:
                torch.nn.init.zeros_(sub.bias)
        elif "RMS" in type(sub).__name__:
            for name, param in sub.named_parameters(recurse=False):
                torch.nn.init.ones_(param) if name in ("weight", "gamma", "scale") else torch.nn.init.zeros_(param)
    return module


def save_fp16(state_dict: dict, path: Path) -> Path:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous()
               for k, v in state_dict.items()}, str(path))
    return path


def kl_autoencoder_loss(moments: tuple, decode, target: torch.Tensor, weights: torch.Tensor,
                        generator: torch.Generator, kl_weight: float) -> tuple:
    """(loss, weighted reconstruction MSE, KL to N(0, 1)) of a KL autoencoder on a batch, decoding a
    sample of the posterior (mu, log variance) the encoder gave."""
    mu, log_var = (m.float() for m in moments)
    z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=generator)
    recon = ((decode(z).float() - target).pow(2) * weights).mean() / weights.mean()
    kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).mean()
    return recon + kl_weight * kl, recon, kl


def optimise(optimizer, module: torch.nn.Module, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def host_training():
    """ComfyUI 0.33 runs fused kernels without autograd formulas (comfy_kitchen's RoPE) unless its
    model_management.in_training is set, as its own training nodes do; 0.3.75 has no such switch."""
    import comfy.model_management
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before, comfy.model_management.in_training = comfy.model_management.in_training, True
    try:
        yield
    finally:
        comfy.model_management.in_training = before


def load_checkpoint(path: Path, fresh: bool):
    if path.is_file() and not fresh:
        return torch.load(path, weights_only=False)
    return None


def save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)


class Budget:
    """--stop-after: steps left in this run over all phases."""

    def __init__(self, steps):
        self.left = steps

    def take(self, phase, step):
        if self.left == 0:
            raise Stopped(f"stopped after the requested steps, at {phase} step {step}; run again to go on")
        if self.left is not None:
            self.left -= 1


# --- 1. the Wan 2.1 VAE --------------------------------------------------------------------------------

def new_wan_vae() -> torch.nn.Module:
    """ComfyUI's WanVAE exactly as its VAE detection builds it for a Wan 2.1 file of this width."""
    import_comfyui()
    import comfy.ldm.wan.vae
    vae = comfy.ldm.wan.vae.WanVAE(dim=VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    return init_wan_vae_(vae.float())


@torch.no_grad()
def init_wan_vae_(vae: torch.nn.Module) -> torch.nn.Module:
    """An init that lets the signal through the untrained network (torch's default one, biases
    included, leaves the decoder's output nearly independent of its input, and a few hundred steps
    do not get it out): He-normal convolutions without biases, residual branches and attention
    projections that start at zero, and the temporal resampling convolutions as copies of the current
    frame (as Wan's own code initialises them)."""
    import comfy.ldm.wan.vae as wan_vae
    torch_default_init_(vae)
    for module in vae.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    for module in vae.modules():
        if isinstance(module, wan_vae.ResidualBlock):
            torch.nn.init.zeros_(module.residual[-1].weight)
        elif isinstance(module, wan_vae.AttentionBlock):
            torch.nn.init.zeros_(module.proj.weight)
        elif isinstance(module, wan_vae.Resample) and hasattr(module, "time_conv"):
            weight = module.time_conv.weight  # (out, in, 3, 1, 1): out is in or 2 x in (two frames out)
            weight.zero_()
            eye = torch.eye(weight.shape[1])
            for half in range(weight.shape[0] // weight.shape[1]):
                weight[half * weight.shape[1]:(half + 1) * weight.shape[1], :, -1, 0, 0] = eye
    vae.conv1.bias[vae.z_dim:] = -6.0  # posterior std 0.05 at first: the noise does not drown the code
    return vae


def channels_last_(module: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """channels_last_3d convolutions: with bf16 autocast about 5x faster on this CPU (oneDNN)."""
    fmt = torch.channels_last_3d if on else torch.contiguous_format
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv3d):
            sub.to(memory_format=fmt)
    return module


def encode_moments(vae, clips: torch.Tensor) -> tuple:
    """(mean, log variance) of the posterior, through WanVAE.encode itself (which returns the mean only:
    the log variance is read off its last conv, conv1)."""
    captured = {}
    handle = vae.conv1.register_forward_hook(lambda module, args, output: captured.update(out=output))
    try:
        vae.encode(clips)
    finally:
        handle.remove()
    mu, log_var = captured["out"].chunk(2, dim=1)
    return mu, log_var.clamp(-30, 20)


def sprite_weights(clips: torch.Tensor, seeds) -> torch.Tensor:
    """Per-pixel loss weights: 1 on the background, 10 on the sprite (about 3 % of the pixels), found as
    where the full 17-frame clip differs from its per-pixel median."""
    from devkit.video_metrics import background_differences
    full, _ = prompt_batch(seeds, FRAMES, HEIGHT, WIDTH)
    sprite = background_differences(full)[:, :clips.shape[2]] > 0.05  # (n, t, h, w)
    return 1 + 9 * sprite[:, None].float()


def crop_around_sprites(clips: torch.Tensor, weights: torch.Tensor, size: int, generator: torch.Generator) -> tuple:
    """size x size windows (the VAE is convolutional: it trains on crops, 4x cheaper at 32 of 64, and
    runs on whole frames), each placed around its sprite's middle frame, jittered by up to size / 4."""
    height, width = clips.shape[-2:]
    sprite = (weights[:, 0, clips.shape[2] // 2] > 1).float()  # (n, h, w)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    area = sprite.sum(dim=(1, 2)).clamp(min=1)
    centre = torch.stack([(sprite * y).sum(dim=(1, 2)), (sprite * x).sum(dim=(1, 2))], dim=1) / area[:, None]
    jitter = (torch.rand(len(clips), 2, generator=generator) * 2 - 1) * size / 4
    limits = torch.tensor([height - size, width - size], dtype=torch.float32)
    corner = (centre - size / 2 + jitter).round().clamp(min=0).minimum(limits).long()
    crops = [(c[..., top:top + size, left:left + size], w[..., top:top + size, left:left + size])
             for c, w, (top, left) in zip(clips, weights, corner.tolist())]
    return torch.stack([c for c, _ in crops]), torch.stack([w for _, w in crops])


def train_wan_vae(args, budget: Budget) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    vae = new_wan_vae()
    state = {"step": 0, "seconds": 0.0, "losses": [], "recon": [], "kl": [], "step_seconds": [], "done": False}
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    saved = load_checkpoint(args.checkpoint_dir / "wan_vae.pt", args.fresh)
    if saved is not None:
        vae.load_state_dict(saved["model"])
        state = saved["state"]
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if not state["done"]:
            log.info("resuming at wan_vae step %d", state["step"])
    if state["done"]:
        if not (args.models_dir / VAE_FILE).is_file():
            save_fp16(vae.state_dict(), args.models_dir / VAE_FILE)
        return vae.eval()
    channels_last_(vae)
    vae.train()
    generator = torch.Generator()
    for step in range(state["step"], args.vae_steps):
        budget.take("wan_vae", step)
        generator.manual_seed(args.seed * 7919 + 1_000_003 * PHASE_IDS["wan_vae"] + step)
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.vae_steps, args.vae_lr)
        seeds = batch_seeds(args.seed, "wan_vae", step, args.vae_batch)
        clips, _ = clips_in(seeds, args.vae_frames)
        weights = sprite_weights(clips, seeds)
        if args.vae_crop:
            clips, weights = crop_around_sprites(clips, weights, args.vae_crop, generator)
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
        with autocast():
            loss, recon, kl = kl_autoencoder_loss(encode_moments(vae, clips), vae.decode, clips, weights, generator,
                                                  args.vae_kl)
        optimise(optimizer, vae, loss)
        state["step_seconds"].append(time.perf_counter() - started)
        state["seconds"] += state["step_seconds"][-1]
        state["losses"].append(loss.item())
        state["recon"].append(recon.item())
        state["kl"].append(kl.item())
        state["step"] = step + 1
        if state["step"] % 10 == 0 or state["step"] == args.vae_steps:
            log.info("wan_vae step %d/%d: loss %.4f (weighted mse %.4f, kl %.3f), %.2f s/step, %.0f s in all",
                     state["step"], args.vae_steps, statistics.mean(state["losses"][-10:]),
                     statistics.mean(state["recon"][-10:]), statistics.mean(state["kl"][-10:]),
                     statistics.mean(state["step_seconds"][-10:]), state["seconds"])
        if state["step"] % CHECKPOINT_EVERY == 0 or state["step"] == args.vae_steps or budget.left == 0:
            save_checkpoint(args.checkpoint_dir / "wan_vae.pt", {"model": channels_last_(vae, False).state_dict(),
                                                                  "optimizer": optimizer.state_dict(), "state": state})
            channels_last_(vae)
    channels_last_(vae, False).eval()
    started = time.perf_counter()
    state["normalisation"] = normalise_latents_(vae, batch_seeds(args.seed, "wan_vae", 10**5, args.norm_clips))
    state["seconds"] += time.perf_counter() - started
    state["done"] = True
    save_checkpoint(args.checkpoint_dir / "wan_vae.pt", {"model": vae.state_dict(), "optimizer": None, "state": state})
    save_fp16(vae.state_dict(), args.models_dir / VAE_FILE)
    log.info("wan_vae: %d steps in %.0f s; wrote %s", state["step"], state["seconds"], args.models_dir / VAE_FILE)
    return vae


@torch.no_grad()
def normalise_latents_(vae, seeds) -> dict:
    """Folds a per-channel affine map into conv1 (the mean half) and conv2 so that ComfyUI's
    Wan21.process_in(encode(x)) has zero mean and unit variance per channel on these clips; decode(encode(x))
    is unchanged."""
    import_comfyui()
    import comfy.latent_formats
    latent_format = comfy.latent_formats.Wan21()
    means = []
    for chunk in range(0, len(seeds), 8):
        clips, _ = clips_in(seeds[chunk:chunk + 8])
        means.append(vae.encode(clips).float())
    mu = torch.cat(means)
    mean, std = mu.mean(dim=(0, 2, 3, 4)), mu.std(dim=(0, 2, 3, 4))
    target_mean, target_std = latent_format.latents_mean.flatten(), latent_format.latents_std.flatten()
    scale = target_std / std  # z' = scale * z + offset
    offset = target_mean - scale * mean
    z_dim = mu.shape[1]
    conv1, conv2 = vae.conv1, vae.conv2
    conv1.weight[:z_dim] *= scale.view(-1, 1, 1, 1, 1)
    conv1.bias[:z_dim] = scale * conv1.bias[:z_dim] + offset
    conv1.bias[z_dim:] += 2 * torch.log(scale)  # the log variance follows the scale
    weight = conv2.weight[:, :, 0, 0, 0].clone()  # (out, in) on z
    conv2.bias -= (weight / scale) @ offset
    conv2.weight /= scale.view(1, -1, 1, 1, 1)
    check = latent_format.process_in(vae.encode(clips_in(seeds[:8])[0]).float())
    log.info("latents normalised: per-channel std before %s; after process_in on 8 clips mean %.3f, std %.3f",
             [round(v, 3) for v in std.tolist()], float(check.mean()), float(check.std()))
    return {"clips": len(seeds), "raw_mean": mean.tolist(), "raw_std": std.tolist()}


# --- 2. the Wan 2.1 T2V DiT ----------------------------------------------------------------------------

def new_wan_dit():
    """ComfyUI's WAN21 BaseModel (WanModel inside) with Wan's own init: xavier linears, N(0, 0.02) text and
    time embeddings, modulation N(0, 1/dim), a zero head."""
    import_comfyui()
    import comfy.model_management  # noqa: F401
    import comfy.supported_models
    model_config = comfy.supported_models.WAN21_T2V(dict(DIT_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    net = torch_default_init_(model.diffusion_model).requires_grad_(True)  # ComfyUI 0.33 builds it frozen
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    torch.nn.init.xavier_uniform_(net.patch_embedding.weight.flatten(1))
    for name, module in net.named_modules():
        if name.startswith(("text_embedding", "time_embedding")) and isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
    for name, param in net.named_parameters():
        if name.endswith("modulation"):
            torch.nn.init.normal_(param, std=DIT_CONFIG["dim"] ** -0.5)
    torch.nn.init.zeros_(net.head.head.weight)
    model.model_sampling.set_parameters(shift=SHIFT)
    return model


def text_embeddings() -> dict:
    """The fixture TextEmbedding node's conditioning tensor for every prompt and for "" (1, 16, 4096)."""
    import_comfyui()
    from devkit.fixture_nodes import TextEmbedding
    return {text: TextEmbedding().encode(text, TEXT_TOKENS, TEXT_WIDTH)[0][0][0] for text in ("", *PROMPTS)}


def load_comfy_vae(path: Path):
    """The VAE as ComfyUI's VAELoader makes it from the file."""
    import_comfyui()
    import comfy.sd
    import comfy.utils
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    vae.throw_exception_if_invalid()
    return vae


def vae_encode(vae, clips: torch.Tensor) -> torch.Tensor:
    """VAE Encode of each clip (frames, 3, h, w) in [0, 1] as ComfyUI's VAEEncode node gives a video (one
    IMAGE batch of frames; a 5-d batch would have its frame count cropped to a multiple of 8)."""
    return torch.cat([vae.encode(clip.permute(0, 2, 3, 1)).float() for clip in clips])


def latent_bank(args) -> dict:
    """Training clips through the shipped VAE file's WanVAE.encode (as ComfyUI loads it; in bf16 here, for
    speed) and Wan21.process_in: the DiT's x0. Kept in the checkpoint folder; resumes chunk by chunk."""
    import comfy.latent_formats
    path = args.checkpoint_dir / "latent_bank.pt"
    bank = load_checkpoint(path, args.fresh) or {"latents": [], "prompts": [], "seconds": 0.0}
    if len(bank["prompts"]) >= args.bank_clips:
        return bank
    vae = channels_last_(load_comfy_vae(args.models_dir / VAE_FILE).first_stage_model)
    latent_format = comfy.latent_formats.Wan21()
    seeds = batch_seeds(args.seed, "latent_bank", 0, args.bank_clips)
    while len(bank["prompts"]) < args.bank_clips:
        started = time.perf_counter()
        chunk = seeds[len(bank["prompts"]):len(bank["prompts"]) + 32]
        clips, prompts = clips_in(chunk)
        with torch.no_grad(), autocast():  # the shipped weights' WanVAE.encode, in bf16 for speed
            latents = latent_format.process_in(vae.encode(clips.contiguous(memory_format=torch.channels_last_3d)).float())
        bank["latents"].append(latents)
        bank["prompts"].extend(prompts)
        bank["seconds"] += time.perf_counter() - started
        save_checkpoint(path, bank)
        log.info("latent bank: %d/%d clips encoded, %.0f s", len(bank["prompts"]), args.bank_clips, bank["seconds"])
    return bank


def velocity_loss(model, x0, noise, sigma, context) -> torch.Tensor:
    x_t = model.model_sampling.noise_scaling(sigma, noise, x0)
    denoised = model.apply_model(x_t, sigma, c_crossattn=context)
    velocity = (x_t - denoised) / sigma.view(-1, 1, 1, 1, 1)
    return (velocity - (noise - x0)).pow(2).mean(dim=(1, 2, 3, 4))


def train_wan_dit(args, budget: Budget):
    import comfy.model_sampling
    torch.manual_seed(args.seed + 1)
    bank = latent_bank(args)
    latents = torch.cat(bank["latents"])
    embeddings = text_embeddings()
    prompt_index = {p: i for i, p in enumerate(PROMPTS)}
    labels = torch.tensor([prompt_index[p] for p in bank["prompts"]])
    table = torch.cat([embeddings[p] for p in PROMPTS] + [embeddings[""]])  # (13, tokens, width); 12 is ""
    model = new_wan_dit()

    def batch_loss(generator):
        index = torch.randint(0, len(labels), (args.dit_batch,), generator=generator)
        x0 = latents[index]
        text = torch.where(torch.rand(args.dit_batch, generator=generator) < args.uncond, len(PROMPTS), labels[index])
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.rand(args.dit_batch, generator=generator) * 0.999 + 0.001
        sigma = comfy.model_sampling.time_snr_shift(SHIFT, u)
        return velocity_loss(model, x0, noise, sigma, table[text]).mean()
    ema, state = train_with_ema("wan_dit", model, batch_loss, args.dit_steps, args.dit_lr, args, budget,
                                seed_base=args.seed * 7919 + 1_000_003 * PHASE_IDS["wan_dit"])
    save_fp16(ema, args.models_dir / DIT_FILE)
    log.info("wan_dit: %d steps in %.0f s (+ %.0f s encoding %d clips); wrote %s", state["step"], state["seconds"],
             bank["seconds"], len(labels), args.models_dir / DIT_FILE)
    return state, bank["seconds"]


def train_with_ema(name: str, model, batch_loss, steps: int, lr: float, args, budget: Budget, seed_base: int) -> tuple:
    """AdamW on model.diffusion_model with an EMA of its weights (what ships), warm-up + cosine learning
    rate, gradients clipped at 1; step i draws its batch (`batch_loss(generator)` -> loss) from a generator
    seeded with seed_base + i. Checkpoints (artifacts/.../<name>.pt) every CHECKPOINT_EVERY steps, resumes
    from the last one; returns (EMA state dict, state)."""
    net = model.diffusion_model
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state = {"step": 0, "seconds": 0.0, "losses": [], "step_seconds": [], "done": False}
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    path = args.checkpoint_dir / f"{name}.pt"
    saved = load_checkpoint(path, args.fresh)
    if saved is not None:
        net.load_state_dict(saved["model"])
        ema, state = saved["ema"], saved["state"]
        optimizer.load_state_dict(saved["optimizer"])
        if not state["done"]:
            log.info("resuming at %s step %d", name, state["step"])
    if state["done"]:
        return ema, state
    model.train()
    generator = torch.Generator()
    for step in range(state["step"], steps):
        budget.take(name, step)
        generator.manual_seed(seed_base + step)
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        with autocast():
            loss = batch_loss(generator)
        optimise(optimizer, net, loss)
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        state["step_seconds"].append(time.perf_counter() - started)
        state["seconds"] += state["step_seconds"][-1]
        state["losses"].append(loss.item())
        state["step"] = step + 1
        if state["step"] % 10 == 0 or state["step"] == steps:
            log.info("%s step %d/%d: loss %.4f, %.2f s/step, %.0f s in all", name, state["step"], steps,
                     statistics.mean(state["losses"][-10:]), statistics.mean(state["step_seconds"][-10:]),
                     state["seconds"])
        if state["step"] % CHECKPOINT_EVERY == 0 or budget.left == 0:
            save_checkpoint(path, {"model": net.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
                                   "state": state})
    state["done"] = True
    save_checkpoint(path, {"model": net.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(), "state": state})
    return ema, state


# --- 3. evaluation through ComfyUI's loaders and sampler -----------------------------------------------

def register_models_dir(models_dir: Path) -> None:
    """Lets UNETLoader and VAELoader list the files (as if copied to models/diffusion_models and models/vae)."""
    import folder_paths
    for folder in ("diffusion_models", "vae"):
        if str(models_dir) not in folder_paths.get_folder_paths(folder):
            folder_paths.add_model_folder_path(folder, str(models_dir))


def load_with_comfy_nodes(models_dir: Path) -> tuple:
    """(MODEL, VAE) through ComfyUI's own UNETLoader and VAELoader nodes."""
    import_comfyui()
    import nodes
    register_models_dir(models_dir)
    model = nodes.UNETLoader().load_unet(DIT_FILE, "default")[0]
    vae = nodes.VAELoader().load_vae(VAE_FILE)[0]
    return model, vae


def sample_videos(model, vae, prompt: str, seed: int, count: int, steps: int, cfg: float, sampler: str,
                  scheduler: str = "simple") -> torch.Tensor:
    """`count` videos (count, frames, 3, h, w) in [0, 1] for a prompt, the way a ComfyUI graph makes them:
    TextEmbedding fixture (positive: the prompt, negative: ""), ModelSamplingSD3 (shift 3),
    EmptyHunyuanLatentVideo, KSampler, VAE Decode."""
    import nodes
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from devkit.fixture_nodes import TextEmbedding
    patched = ModelSamplingSD3().patch(model, SHIFT)[0]
    positive = TextEmbedding().encode(prompt, TEXT_TOKENS, TEXT_WIDTH)[0]
    negative = TextEmbedding().encode("", TEXT_TOKENS, TEXT_WIDTH)[0]
    latent = EmptyHunyuanLatentVideo.execute(WIDTH, HEIGHT, FRAMES, count)
    latent = latent.result[0] if hasattr(latent, "result") else latent[0]
    samples = nodes.common_ksampler(patched, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]
    frames = vae.decode(samples["samples"])  # (count, frames, h, w, 3)
    return frames.permute(0, 1, 4, 2, 3).clamp(0, 1)


@torch.no_grad()
def held_out_denoising(model, latents: torch.Tensor, prompts, seed: int) -> dict:
    """Flow-matching MSE (velocity) at fixed sigmas on held-out clips' latents (VAE Encode), with their
    prompt, with "" and with the opposite direction's prompt (how much the text tells the model)."""
    from devkit.fixture_nodes import TextEmbedding
    base = model.model
    x0 = base.process_latent_in(latents)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    texts = {"prompt": list(prompts), "empty": [""] * len(prompts),
             "opposite_direction": [f"{parse_prompt(p)[0]} moving {opposite[parse_prompt(p)[1]]}" for p in prompts]}
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    results = {}
    for name, text in texts.items():
        context = torch.cat([TextEmbedding().encode(t, TEXT_TOKENS, TEXT_WIDTH)[0][0][0] for t in text])
        per_sigma = {}
        for sigma in EVAL_SIGMAS:
            sigmas = torch.full((len(prompts),), sigma)
            per_sigma[str(sigma)] = float(velocity_loss(base, x0, noise, sigmas, context).mean())
        results[name] = {"mean": statistics.mean(per_sigma.values()), "per_sigma": per_sigma}
    return results


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def summary(measures: dict) -> dict:
    return {k: v for k, v in measures.items() if k != "per_clip"}


def save_strip(rows: torch.Tensor, path: Path, labels=None) -> None:
    """Clips (n, frames, 3, h, w) one per row, frames left to right, 2x nearest; optional row labels."""
    from PIL import Image, ImageDraw
    count, frames, channels, height, width = rows.shape
    grid = rows.clamp(0, 1).permute(0, 3, 1, 4, 2).reshape(count * height, frames * width, channels)
    image = Image.fromarray((grid * 255).round().byte().numpy()).resize((frames * width * 2, count * height * 2),
                                                                         Image.NEAREST)
    if labels:
        margin = 150
        labelled = Image.new("RGB", (image.width + margin, image.height), "white")
        labelled.paste(image, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for row, label in enumerate(labels):
            draw.text((6, row * height * 2 + height - 6), label, fill="black")
        image = labelled
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@torch.no_grad()
def evaluate(args, training: dict) -> dict:
    import_comfyui()
    model, vae = load_with_comfy_nodes(args.models_dir)
    channels_last_(vae.first_stage_model)  # fp32 as loaded; about 4x faster decoding on this CPU
    seeds = PROMPT_HELD_OUT_SEEDS[:args.held_out]
    clips, prompts = prompt_batch(seeds, FRAMES, HEIGHT, WIDTH)
    started = time.perf_counter()
    latents = vae_encode(vae, clips)
    denoising = held_out_denoising(model, latents, prompts, args.seed + 2)
    log.info("held-out denoising loss: %s", {k: round(v["mean"], 4) for k, v in denoising.items()})
    reconstructed = vae.decode(latents).permute(0, 1, 4, 2, 3)
    reconstruction_psnr = psnr(reconstructed.flatten(1), clips.flatten(1))
    truth_measures = motion_measures(clips, prompts)
    reconstruction_measures = motion_measures(reconstructed, prompts)
    log.info("ground truth: %s", summary(truth_measures))
    log.info("VAE reconstructions (PSNR %.2f dB): %s", float(reconstruction_psnr.mean()), summary(reconstruction_measures))
    sample_prompts = PROMPTS[:args.sample_prompts]
    samples, sample_labels, runs = [], [], {}
    for index, prompt in enumerate(sample_prompts):
        samples.append(sample_videos(model, vae, prompt, args.sample_seed + index, args.samples_per_prompt,
                                     args.sample_steps, args.cfg, args.sampler))
        sample_labels.extend([prompt] * args.samples_per_prompt)
    samples = torch.cat(samples)
    sample_measures = motion_measures(samples, sample_labels)
    log.info("samples (%s, %d steps, cfg %.1f): %s", args.sampler, args.sample_steps, args.cfg, summary(sample_measures))
    runs[f"{args.sampler}_{args.sample_steps}_steps_cfg_{args.cfg:g}"] = summary(sample_measures)
    if args.test_steps != args.sample_steps:  # what the test samples (fewer steps)
        few = torch.cat([sample_videos(model, vae, p, args.sample_seed + i, args.samples_per_prompt, args.test_steps,
                                       args.cfg, args.sampler) for i, p in enumerate(sample_prompts)])
        runs[f"{args.sampler}_{args.test_steps}_steps_cfg_{args.cfg:g}"] = summary(motion_measures(few, sample_labels))
        log.info("samples with %d steps: %s", args.test_steps, runs[f"{args.sampler}_{args.test_steps}_steps_cfg_{args.cfg:g}"])
    no_cfg = torch.cat([sample_videos(model, vae, p, args.sample_seed + i, args.samples_per_prompt, args.sample_steps,
                                      1.0, args.sampler) for i, p in enumerate(sample_prompts)])
    runs[f"{args.sampler}_{args.sample_steps}_steps_cfg_1"] = summary(motion_measures(no_cfg, sample_labels))
    log.info("samples without CFG: %s", runs[f"{args.sampler}_{args.sample_steps}_steps_cfg_1"])
    evaluation_seconds = time.perf_counter() - started
    per = args.samples_per_prompt
    save_strip(samples[::per], args.results_dir / "trained_wan21_t2v_samples.png", list(sample_prompts))
    save_strip(torch.stack([row for i in range(0, min(4, len(clips))) for row in (clips[i], reconstructed[i])]),
               args.results_dir / "trained_wan21_vae_reconstructions.png",
               [label for i in range(min(4, len(clips))) for label in (prompts[i], "VAE reconstruction")])
    files = {name: args.models_dir / name for name in (DIT_FILE, VAE_FILE)}
    return {
        "comfyui": comfyui_version(),
        "data": {"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "prompts": list(PROMPTS),
                 "held_out_seeds": [seeds.start, seeds.stop], "latent_shape": list(LATENT_SHAPE)},
        "files": {name: {"bytes": path.stat().st_size, "mib": round(path.stat().st_size / 2**20, 2)}
                  for name, path in files.items()},
        "wan21_vae": {"dim": VAE_DIM, "z_dim": 16, **training.get("wan_vae", {}),
                      "held_out_reconstruction_psnr_db": float(reconstruction_psnr.mean()),
                      "held_out_reconstruction_psnr_min_db": float(reconstruction_psnr.min())},
        "wan21_t2v": {"config": {k: v for k, v in DIT_CONFIG.items() if k in ("dim", "ffn_dim", "num_heads", "num_layers")},
                      "parameters": sum(p.numel() for p in model.model.diffusion_model.parameters()),
                      "shift": SHIFT, "text": {"node": "StreamlineFixtureTextEmbedding", "tokens": TEXT_TOKENS,
                                               "width": TEXT_WIDTH, "negative": ""},
                      **training.get("wan_dit", {}),
                      "held_out_denoising_loss": {"sigmas": list(EVAL_SIGMAS), "clips": len(seeds), **denoising}},
        "motion": {"ground_truth": summary(truth_measures), "vae_reconstructions": summary(reconstruction_measures),
                   "samples": {"prompts": len(sample_prompts), "per_prompt": per, "sampler": args.sampler,
                               "scheduler": "simple", "steps": args.sample_steps, "cfg": args.cfg,
                               "first_seed": args.sample_seed, **summary(sample_measures)},
                   "sample_runs": runs},
        "test_steps": args.test_steps,
        "evaluation_seconds": round(evaluation_seconds, 1),
    }


# --- command line --------------------------------------------------------------------------------------

def training_summary(args) -> dict:
    out = {}
    vae = load_checkpoint(args.checkpoint_dir / "wan_vae.pt", False)
    if vae is not None:
        s = vae["state"]
        out["wan_vae"] = {"steps": s["step"], "batch": args.vae_batch, "clip_frames": args.vae_frames,
                          "training_seconds": round(s["seconds"], 1),
                          "median_step_seconds": round(statistics.median(s["step_seconds"]), 3) if s["step_seconds"] else None,
                          "final_loss": statistics.mean(s["losses"][-20:]) if s["losses"] else None}
    dit = load_checkpoint(args.checkpoint_dir / "wan_dit.pt", False)
    bank = load_checkpoint(args.checkpoint_dir / "latent_bank.pt", False)
    if dit is not None:
        s = dit["state"]
        out["wan_dit"] = {"steps": s["step"], "batch": args.dit_batch, "training_clips": len(bank["prompts"]) if bank else None,
                          "training_seconds": round(s["seconds"], 1),
                          "latent_encoding_seconds": round(bank["seconds"], 1) if bank else None,
                          "median_step_seconds": round(statistics.median(s["step_seconds"]), 3) if s["step_seconds"] else None,
                          "final_loss": statistics.mean(s["losses"][-20:]) if s["losses"] else None,
                          "prompt_dropout": args.uncond, "ema": args.ema}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", nargs="?", default="all", choices=("all", "wan-vae", "wan-dit", "evaluate"))
    parser.add_argument("--quick", action="store_true", help="a few steps of everything, written under artifacts/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--vae-crop", type=int, default=32, help="train on crops this wide (0: whole frames)")
    parser.add_argument("--vae-frames", type=int, default=17,
                        help="clip length the VAE trains on (4k+1; 9 left latent frames 3 and 4 unseen: they drifted)")
    parser.add_argument("--vae-lr", type=float, default=5e-4)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--norm-clips", type=int, default=96)
    parser.add_argument("--bank-clips", type=int, default=720)
    parser.add_argument("--dit-steps", type=int, default=2000)
    parser.add_argument("--dit-batch", type=int, default=16)
    parser.add_argument("--dit-lr", type=float, default=1e-3)
    parser.add_argument("--uncond", type=float, default=0.1, help="prompt dropout to the embedding of ''")
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--held-out", type=int, default=len(PROMPT_HELD_OUT_SEEDS))
    parser.add_argument("--sample-prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=STEPS)
    parser.add_argument("--test-steps", type=int, default=8, help="also sampled with this many steps (the test's)")
    parser.add_argument("--sample-seed", type=int, default=500)
    parser.add_argument("--sampler", default=SAMPLER)
    parser.add_argument("--cfg", type=float, default=CFG)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1: on a shared 2-core machine a second thread waits on the first and "
                             "a step took 3-40x longer")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--stop-after", type=int, help="train this many steps now, checkpoint and stop")
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in dict(vae_steps=2, vae_batch=2, vae_frames=5, norm_clips=4, bank_clips=4, dit_steps=2,
                                dit_batch=2, held_out=2, sample_prompts=2, samples_per_prompt=1, sample_steps=2,
                                test_steps=2).items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    quick = REPO_ROOT / "artifacts" / "video_train_quick"
    args.checkpoint_dir = args.checkpoint_dir or (quick / "checkpoints" if args.quick else REPO_ROOT / "artifacts" / "video_train")
    args.models_dir = (args.models_dir or (quick / "models" if args.quick else REPO_ROOT / "models" / "sprites")).resolve()
    args.results_dir = args.results_dir or (quick / "results" if args.quick else REPO_ROOT / "bench" / "results")
    args.report = args.report or args.results_dir / "trained_models.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    import_comfyui()
    budget = Budget(args.stop_after)
    try:
        with host_training():
            if args.phase in ("all", "wan-vae"):
                train_wan_vae(args, budget)
            if args.phase in ("all", "wan-dit"):
                train_wan_dit(args, budget)
    except Stopped as stop:
        log.info("%s", stop)
        return
    if args.phase in ("all", "evaluate"):
        results = evaluate(args, training_summary(args))
        results["command"] = "scripts/train_video_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(results, indent=1) + "\n")
        log.info("wrote %s", args.report)


if __name__ == "__main__":
    main()
