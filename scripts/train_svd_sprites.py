"""Trains a small SVD-architecture image-to-video model on procedural sprite videos, on a CPU, with
ComfyUI's own classes, and measures it on held-out clips.

    nice -n 10 .venv/bin/python scripts/train_svd_sprites.py       # VAE, UNet, evaluation; resumes if stopped
    .venv/bin/python scripts/train_svd_sprites.py svd-vae          # one phase (svd-vae, svd-unet, evaluate)
    .venv/bin/python scripts/train_svd_sprites.py --quick          # a few steps of each, under artifacts/

The data: devkit/sprite_videos.prompt_video clips, 14 frames of 64x64 (SVD's default frame count). The
sprite starts at the edge it leaves, so its first frame tells which way it goes: the first frame in,
the motion out.

1. svd-vae: an SD-style KL autoencoder (ComfyUI's AutoencoderKL, ch 32, 8x spatial compression, 4
   latent channels), per frame as SVD's workflows use it. Afterwards a per-channel affine map is folded
   into quant_conv and post_quant_conv so that ComfyUI's SD15 latent_format.process_in(VAE Encode) has
   zero mean and unit variance on training frames.
2. svd-unet: ComfyUI's SVD_img2vid model (comfy.model_base.SVD_img2vid around VideoUNet: 64 channels,
   two levels, spatial and temporal attention and resblocks, context 1024, adm 768) trained as ComfyUI
   samples it (v-prediction EDM, sigma_data 1): x_t = x0 + sigma noise, log sigma ~ N(0.7, 1.6) (a fifth
   of the samples log-uniform over 0.002-700, the range KSampler's karras schedule covers), the
   conditioning SVD_img2vid_Conditioning makes: c_concat = VAE Encode of the first frame, cross-attention
   = Tiny CLIP Vision's image embedding of it (the fixture node the workflows load), y = the fps /
   motion bucket / augmentation embedding (6, 127, 0); 10 % of the samples get its negative (zeros).
   Loss (sigma^2 + 1) / sigma^2 |denoised - x0|^2.
3. evaluate: loads the file through the Small SVD Checkpoint fixture node's loader, measures the
   held-out denoising loss (with and without the first frame) and samples each held-out clip's first
   frame through SVD_img2vid_Conditioning, VideoLinearCFGGuidance and KSampler; scores the decoded
   videos with devkit/video_metrics; writes bench/results/trained_svd_sprites.json and a PNG strip.

Checkpoints every 50 steps (artifacts/svd_train/) let a stopped run go on.
"""
import argparse
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
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from devkit.comfy_env import comfyui_version, import_comfyui  # noqa: E402
from devkit.sprite_videos import PROMPT_HELD_OUT_SEEDS, prompt_batch  # noqa: E402
from devkit.sprite_workflows import SVD_FILE, SVD_FRAMES, SVD_SAMPLING, SVD_SD_VAE, SVD_UNET  # noqa: E402
from devkit.video_metrics import background_differences, motion_measures  # noqa: E402
from train_video_models import (CHECKPOINT_EVERY, Budget, Stopped, autocast, host_training,  # noqa: E402
                                learning_rate, load_checkpoint, psnr, save_checkpoint, save_strip, summary,
                                kl_autoencoder_loss, optimise, torch_default_init_, train_with_ema)

log = logging.getLogger("train_svd_sprites")
HEIGHT = WIDTH = 64
SEED_BASE = 500_000_000  # training clips: [SEED_BASE, PROMPT_HELD_OUT_SEEDS.start); the Wan models use lower ones
PHASE_OFFSETS = {"svd_vae": 0, "latent_bank": 100_000_000}
EVAL_SIGMAS = (0.1, 0.5, 1.0, 2.0, 5.0, 20.0)
P_MEAN, P_STD = 0.7, 1.6
# a share of the samples log-uniform over the whole range the karras schedule samples (0.002 to 700)
LOG_UNIFORM_SHARE, LOG_SIGMA_RANGE = 0.2, (math.log(0.002), math.log(700.0))


def training_seeds(phase: str, step: int, batch: int) -> range:
    first = SEED_BASE + PHASE_OFFSETS[phase] + step * batch
    assert first + batch <= PROMPT_HELD_OUT_SEEDS.start, "training seeds must stay below the held-out ones"
    return range(first, first + batch)


def frames_of(seeds, frames: int = SVD_FRAMES) -> torch.Tensor:
    """(n, frames, 3, h, w) in [0, 1]."""
    return prompt_batch(seeds, frames, HEIGHT, WIDTH)[0]


def save_checkpoint_file(unet_state: dict, vae_state: dict, path: Path) -> Path:
    """One file as the Small SVD Checkpoint node loads it: model.diffusion_model.* and first_stage_model.*
    in fp16, the configs as JSON in the header."""
    from safetensors.torch import save_file
    state = {f"model.diffusion_model.{k}": v for k, v in unet_state.items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_state.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(path), metadata={"streamline_svd_unet": json.dumps(SVD_UNET), "streamline_sd_vae": json.dumps(SVD_SD_VAE)})
    return path


# --- 1. the SD-style VAE -------------------------------------------------------------------------------

def new_vae() -> torch.nn.Module:
    """ComfyUI's AutoencoderKL with the small config; He-normal convolutions, residual branches that start
    at zero (the signal gets through the untrained network) and a small initial posterior std."""
    import_comfyui()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.model import ResnetBlock
    from devkit.fixture_nodes import small_sd_vae_ddconfig
    vae = torch_default_init_(AutoencoderKL(ddconfig=small_sd_vae_ddconfig(SVD_SD_VAE),
                                            embed_dim=SVD_SD_VAE["z_channels"]).float())
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)
        for module in vae.modules():
            if isinstance(module, ResnetBlock):
                torch.nn.init.zeros_(module.conv2.weight)
        vae.quant_conv.bias[SVD_SD_VAE["z_channels"]:] = -6.0
    return vae


def moments(vae, images: torch.Tensor) -> tuple:
    mu, log_var = vae.quant_conv(vae.encoder(images)).chunk(2, dim=1)
    return mu, log_var.clamp(-30, 20)


def train_vae(args, budget: Budget):
    torch.manual_seed(args.seed)
    vae = new_vae()
    state = {"step": 0, "seconds": 0.0, "losses": [], "step_seconds": [], "done": False}
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    saved = load_checkpoint(args.checkpoint_dir / "svd_vae.pt", args.fresh)
    if saved is not None:
        vae.load_state_dict(saved["model"])
        state = saved["state"]
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
    if state["done"]:
        return vae.eval(), state
    vae.train()
    generator = torch.Generator()
    for step in range(state["step"], args.vae_steps):
        budget.take("svd_vae", step)
        generator.manual_seed(args.seed * 7919 + step)
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.vae_steps, args.vae_lr)
        clips = frames_of(training_seeds("svd_vae", step, args.vae_batch))
        sprite = background_differences(clips) > 0.05  # (n, frames, h, w)
        pick = torch.randint(0, SVD_FRAMES, (len(clips), 2), generator=generator)  # two frames of each clip
        rows = torch.arange(len(clips))[:, None].expand_as(pick)
        images, weights = clips[rows, pick].flatten(0, 1) * 2 - 1, 1 + 9 * sprite[rows, pick].flatten(0, 1)[:, None].float()
        with autocast():
            loss, _, _ = kl_autoencoder_loss(moments(vae, images), vae.decode, images, weights, generator, args.vae_kl)
        optimise(optimizer, vae, loss)
        state["step_seconds"].append(time.perf_counter() - started)
        state["seconds"] += state["step_seconds"][-1]
        state["losses"].append(loss.item())
        state["step"] = step + 1
        if state["step"] % 20 == 0:
            log.info("svd_vae step %d/%d: loss %.4f, %.2f s/step, %.0f s in all", state["step"], args.vae_steps,
                     statistics.mean(state["losses"][-20:]), statistics.mean(state["step_seconds"][-20:]),
                     state["seconds"])
        if state["step"] % CHECKPOINT_EVERY == 0 or budget.left == 0:
            save_checkpoint(args.checkpoint_dir / "svd_vae.pt", {"model": vae.state_dict(),
                                                                  "optimizer": optimizer.state_dict(), "state": state})
    vae.eval()
    state["normalisation"] = normalise_latents_(vae, training_seeds("svd_vae", 10**6, args.norm_clips))
    state["done"] = True
    save_checkpoint(args.checkpoint_dir / "svd_vae.pt", {"model": vae.state_dict(), "optimizer": None, "state": state})
    return vae, state


@torch.no_grad()
def normalise_latents_(vae, seeds) -> dict:
    """Folds z' = scale z + offset into quant_conv (the mean half; the log variance follows the scale)
    and post_quant_conv, so that SD15's process_in (x 0.18215) of the mean latent has zero mean and unit
    variance per channel on these frames; decode(encode(x)) is unchanged."""
    import comfy.latent_formats
    factor = comfy.latent_formats.SD15().scale_factor
    images = frames_of(seeds).flatten(0, 1) * 2 - 1
    mu = torch.cat([moments(vae, chunk)[0] for chunk in images.split(64)])
    mean, std = mu.mean(dim=(0, 2, 3)), mu.std(dim=(0, 2, 3))
    scale = 1 / (factor * std)
    offset = -scale * mean
    z = SVD_SD_VAE["z_channels"]
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:z] *= scale.view(-1, 1, 1, 1)
    quant.bias[:z] = scale * quant.bias[:z] + offset
    quant.bias[z:] += 2 * torch.log(scale)
    weight = post.weight[:, :, 0, 0].clone()
    post.bias -= (weight / scale) @ offset
    post.weight /= scale.view(1, -1, 1, 1)
    return {"frames": len(images), "raw_mean": mean.tolist(), "raw_std": std.tolist()}


# --- 2. the SVD UNet -----------------------------------------------------------------------------------

def new_unet():
    """ComfyUI's SVD_img2vid BaseModel with the small VideoUNet; torch's default init, a zero output conv."""
    import_comfyui()
    import comfy.model_management  # noqa: F401
    from devkit.fixture_nodes import small_svd_unet_config
    import comfy.supported_models
    model_config = comfy.supported_models.SVD_img2vid(small_svd_unet_config(SVD_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    torch_default_init_(model.diffusion_model).requires_grad_(True)  # ComfyUI 0.33 builds it frozen
    torch.nn.init.zeros_(model.diffusion_model.out[-1].weight)
    torch.nn.init.zeros_(model.diffusion_model.out[-1].bias)
    return model


def tiny_clip_vision():
    from devkit.fixture_nodes import TinyCLIPVision
    return TinyCLIPVision().load(0)[0]


@torch.no_grad()
def conditioning(vae, clip_vision, clips: torch.Tensor) -> tuple:
    """(x0 (n * frames, 4, h/8, w/8) after process_in, the first frame's raw latent (n, 4, ...) as
    SVD_img2vid_Conditioning's concat_latent_image, its Tiny CLIP Vision image embedding (n, 1024))."""
    import comfy.latent_formats
    pixels = clips.permute(0, 1, 3, 4, 2)  # IMAGE layout (n, frames, h, w, 3)
    latents = torch.stack([vae.encode(clip) for clip in pixels])  # (n, frames, 4, h/8, w/8), raw
    embeds = torch.cat([clip_vision.encode_image(clip[:1]).image_embeds for clip in pixels])
    return comfy.latent_formats.SD15().process_in(latents.flatten(0, 1)), latents[:, 0], embeds


def latent_bank(args, vae, clip_vision) -> dict:
    path = args.checkpoint_dir / "svd_latent_bank.pt"
    bank = load_checkpoint(path, args.fresh) or {"x0": [], "concat": [], "embeds": [], "seconds": 0.0, "clips": 0}
    seeds = training_seeds("latent_bank", 0, args.bank_clips)
    while bank["clips"] < args.bank_clips:
        started = time.perf_counter()
        count = min(32, args.bank_clips - bank["clips"])
        x0, concat, embeds = conditioning(vae, clip_vision, frames_of(seeds[bank["clips"]:bank["clips"] + count]))
        bank["x0"].append(x0.unflatten(0, (count, SVD_FRAMES)))
        bank["concat"].append(concat)
        bank["embeds"].append(embeds)
        bank["clips"] += count
        bank["seconds"] += time.perf_counter() - started
        save_checkpoint(path, bank)
        log.info("latent bank: %d/%d clips encoded, %.0f s", bank["clips"], args.bank_clips, bank["seconds"])
    return bank


def adm(model, count: int) -> torch.Tensor:
    return model.encode_adm(fps=SVD_SAMPLING["fps"], motion_bucket_id=SVD_SAMPLING["motion_bucket_id"],
                            augmentation_level=0.0).repeat(count, 1)


def edm_loss(model, x0, noise, sigma, concat, embeds) -> torch.Tensor:
    """Per clip: (sigma^2 + 1) / sigma^2 |denoised - x0|^2; x0, noise (n, frames, 4, h, w), sigma (n,)."""
    count, frames = x0.shape[:2]
    sigmas = sigma.repeat_interleave(frames)
    x_t = (x0 + sigma.view(-1, 1, 1, 1, 1) * noise).flatten(0, 1)
    denoised = model.apply_model(x_t, sigmas, c_concat=concat.repeat_interleave(frames, 0),
                                 c_crossattn=embeds.repeat_interleave(frames, 0)[:, None], y=adm(model, count * frames),
                                 num_video_frames=frames)
    weight = (sigma ** 2 + 1) / sigma ** 2
    return (denoised.unflatten(0, (count, frames)) - x0).pow(2).mean(dim=(1, 2, 3, 4)) * weight


def train_unet(args, budget: Budget, vae):
    torch.manual_seed(args.seed + 1)
    bank = latent_bank(args, vae, tiny_clip_vision())
    x0_all, concat_all, embeds_all = torch.cat(bank["x0"]), torch.cat(bank["concat"]), torch.cat(bank["embeds"])
    model = new_unet()

    def batch_loss(generator):
        index = torch.randint(0, len(x0_all), (args.unet_batch,), generator=generator)
        keep = (torch.rand(args.unet_batch, generator=generator) >= args.uncond).float()
        concat = concat_all[index] * keep.view(-1, 1, 1, 1)
        embeds = embeds_all[index] * keep.view(-1, 1)
        noise = torch.randn(x0_all[index].shape, generator=generator)
        log_sigma = P_MEAN + P_STD * torch.randn(args.unet_batch, generator=generator)
        spread = torch.rand(args.unet_batch, generator=generator) < LOG_UNIFORM_SHARE
        log_sigma = torch.where(spread, torch.empty_like(log_sigma).uniform_(*LOG_SIGMA_RANGE, generator=generator),
                                log_sigma)
        return edm_loss(model, x0_all[index], noise, log_sigma.exp(), concat, embeds).mean()
    ema, state = train_with_ema("svd_unet", model, batch_loss, args.unet_steps, args.unet_lr, args, budget,
                                seed_base=args.seed * 7919 + 1_000_003)
    save_checkpoint_file(ema, vae.first_stage_model.state_dict(), args.models_dir / SVD_FILE)
    log.info("svd_unet: %d steps in %.0f s (+ %.0f s encoding); wrote %s", state["step"], state["seconds"],
             bank["seconds"], args.models_dir / SVD_FILE)
    return state, bank["seconds"]


# --- 3. evaluation through ComfyUI's nodes -------------------------------------------------------------

def sample_videos(model, vae, clip_vision, first_frames: torch.Tensor, seed: int, steps: int) -> torch.Tensor:
    """(n, frames, 3, h, w) in [0, 1]: each first frame (n, 3, h, w) through SVD_img2vid_Conditioning,
    VideoLinearCFGGuidance, KSampler and VAE Decode, as devkit/sprite_workflows.svd_sprite_prompt does."""
    import nodes
    from comfy_extras.nodes_video_model import SVD_img2vid_Conditioning, VideoLinearCFGGuidance
    guided = VideoLinearCFGGuidance().patch(model, SVD_SAMPLING["min_cfg"])[0]
    videos = []
    for index, frame in enumerate(first_frames):
        positive, negative, latent = SVD_img2vid_Conditioning().encode(
            clip_vision, frame.permute(1, 2, 0)[None], vae, WIDTH, HEIGHT, SVD_FRAMES, SVD_SAMPLING["motion_bucket_id"],
            SVD_SAMPLING["fps"], 0.0)
        samples = nodes.common_ksampler(guided, seed + index, steps, SVD_SAMPLING["cfg"], SVD_SAMPLING["sampler"],
                                        SVD_SAMPLING["scheduler"], positive, negative, latent)[0]
        videos.append(vae.decode(samples["samples"]).permute(0, 3, 1, 2).clamp(0, 1))
    return torch.stack(videos)


@torch.no_grad()
def held_out_denoising(model, vae, clip_vision, clips: torch.Tensor, seed: int) -> dict:
    x0, concat, embeds = conditioning(vae, clip_vision, clips)
    x0 = x0.unflatten(0, (len(clips), SVD_FRAMES))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    results = {}
    for name, scale in (("first_frame", 1.0), ("no_first_frame", 0.0)):
        per_sigma = {str(s): float(edm_loss(model.model, x0, noise, torch.full((len(clips),), s), concat * scale,
                                            embeds * scale).mean()) for s in EVAL_SIGMAS}
        results[name] = {"mean": statistics.mean(per_sigma.values()), "per_sigma": per_sigma}
    return results


@torch.no_grad()
def evaluate(args, training: dict) -> dict:
    from devkit.fixture_nodes import load_small_svd_checkpoint
    model, vae = load_small_svd_checkpoint(str(args.models_dir / SVD_FILE))
    clip_vision = tiny_clip_vision()
    seeds = PROMPT_HELD_OUT_SEEDS[:args.held_out]
    clips, prompts = prompt_batch(seeds, SVD_FRAMES, HEIGHT, WIDTH)
    started = time.perf_counter()
    denoising = held_out_denoising(model, vae, clip_vision, clips, args.seed + 2)
    log.info("held-out denoising loss: %s", {k: round(v["mean"], 4) for k, v in denoising.items()})
    reconstructed = torch.stack([vae.decode(vae.encode(c.permute(0, 2, 3, 1))).permute(0, 3, 1, 2) for c in clips])
    reconstruction_psnr = psnr(reconstructed.flatten(1), clips.flatten(1))
    samples = sample_videos(model, vae, clip_vision, clips[:args.samples, 0], args.sample_seed, args.sample_steps)
    sample_measures = motion_measures(samples, prompts[:args.samples])
    first_frame_psnr = psnr(samples[:, 0].flatten(1), clips[:args.samples, 0].flatten(1))
    log.info("VAE reconstructions: PSNR %.2f dB, %s", float(reconstruction_psnr.mean()),
             summary(motion_measures(reconstructed, prompts)))
    log.info("samples: %s; first frame PSNR %.2f dB", summary(sample_measures), float(first_frame_psnr.mean()))
    save_strip(torch.stack([row for i in range(min(6, args.samples)) for row in (clips[i], samples[i])]),
               args.results_dir / "trained_svd_samples.png",
               [label for i in range(min(6, args.samples)) for label in (f"held out: {prompts[i]}", "sampled from frame 0")])
    path = args.models_dir / SVD_FILE
    return {
        "comfyui": comfyui_version(),
        "data": {"frames": SVD_FRAMES, "height": HEIGHT, "width": WIDTH, "held_out_seeds": [seeds.start, seeds.stop]},
        "file": {"name": SVD_FILE, "bytes": path.stat().st_size, "mib": round(path.stat().st_size / 2**20, 2)},
        "unet": {"config": SVD_UNET, "parameters": sum(p.numel() for p in model.model.diffusion_model.parameters()),
                 **training.get("svd_unet", {}),
                 "held_out_denoising_loss": {"sigmas": list(EVAL_SIGMAS), "clips": len(clips), **denoising}},
        "vae": {"config": SVD_SD_VAE, **training.get("svd_vae", {}),
                "held_out_reconstruction_psnr_db": float(reconstruction_psnr.mean())},
        "motion": {"ground_truth": summary(motion_measures(clips, prompts)),
                   "vae_reconstructions": summary(motion_measures(reconstructed, prompts)),
                   "samples": {"clips": args.samples, "steps": args.sample_steps, **SVD_SAMPLING,
                               "first_seed": args.sample_seed, "first_frame_psnr_db": float(first_frame_psnr.mean()),
                               **summary(sample_measures)}},
        "evaluation_seconds": round(time.perf_counter() - started, 1),
    }


def training_summary(args) -> dict:
    out = {}
    for phase, batch in (("svd_vae", args.vae_batch), ("svd_unet", args.unet_batch)):
        saved = load_checkpoint(args.checkpoint_dir / f"{phase}.pt", False)
        if saved is not None:
            s = saved["state"]
            out[phase] = {"steps": s["step"], "batch_clips": batch, "training_seconds": round(s["seconds"], 1),
                          "median_step_seconds": round(statistics.median(s["step_seconds"]), 3),
                          "final_loss": statistics.mean(s["losses"][-20:])}
    bank = load_checkpoint(args.checkpoint_dir / "svd_latent_bank.pt", False)
    if bank is not None and "svd_unet" in out:
        out["svd_unet"].update(training_clips=bank["clips"], latent_encoding_seconds=round(bank["seconds"], 1),
                               condition_dropout=args.uncond, ema=args.ema)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", nargs="?", default="all", choices=("all", "svd-vae", "svd-unet", "evaluate"))
    parser.add_argument("--quick", action="store_true", help="a few steps of everything, written under artifacts/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=8, help="clips per step (two frames of each)")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-5)
    parser.add_argument("--norm-clips", type=int, default=32)
    parser.add_argument("--bank-clips", type=int, default=480)
    parser.add_argument("--unet-steps", type=int, default=1800)
    parser.add_argument("--unet-batch", type=int, default=8, help="clips (of 14 frames) per step")
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--uncond", type=float, default=0.1, help="first frame and embedding dropped to zeros")
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--held-out", type=int, default=len(PROMPT_HELD_OUT_SEEDS))
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--sample-steps", type=int, default=SVD_SAMPLING["steps"])
    parser.add_argument("--sample-seed", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--stop-after", type=int, help="train this many steps now, checkpoint and stop")
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--results-dir", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in dict(vae_steps=2, vae_batch=2, norm_clips=2, bank_clips=2, unet_steps=2, unet_batch=2,
                                held_out=2, samples=2, sample_steps=2).items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    quick = REPO_ROOT / "artifacts" / "svd_train_quick"
    args.checkpoint_dir = args.checkpoint_dir or (quick / "checkpoints" if args.quick else REPO_ROOT / "artifacts" / "svd_train")
    args.models_dir = (args.models_dir or (quick / "models" if args.quick else REPO_ROOT / "models" / "sprites")).resolve()
    args.results_dir = args.results_dir or (quick / "results" if args.quick else REPO_ROOT / "bench" / "results")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    import_comfyui()
    from devkit.fixture_nodes import small_sd_vae
    budget = Budget(args.stop_after)
    try:
        with host_training():
            vae, _ = train_vae(args, budget)
            if args.phase in ("all", "svd-unet"):
                train_unet(args, budget, small_sd_vae(vae.state_dict(), SVD_SD_VAE))
    except Stopped as stop:
        log.info("%s", stop)
        return
    if args.phase in ("all", "evaluate"):
        results = evaluate(args, training_summary(args))
        results["command"] = "scripts/train_svd_sprites.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "trained_svd_sprites.json").write_text(json.dumps(results, indent=1) + "\n")
        log.info("wrote %s", args.results_dir / "trained_svd_sprites.json")


if __name__ == "__main__":
    main()
