"""Trains a CMD model (autoencoder, then motion DiT) on procedurally generated sprite videos, on a CPU.

    .venv/bin/python scripts/train_cmd.py            # about 25 minutes on 2 cores; resumes if interrupted

Writes the weights (safetensors + config) for the CMD Loader, the held-out reconstruction PSNR
(JSON), a PNG strip of reconstructions and a PNG grid of motion-sampler outputs. Every batch is drawn
from seeds, so a run is reproducible; a checkpoint every 50 steps lets a stopped run go on.
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
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from core.cmd import PRESETS, CMDModel, sample_motion, save_cmd  # noqa: E402
from devkit.sprite_videos import HELD_OUT_SEEDS, sprite_batch  # noqa: E402

log = logging.getLogger("train_cmd")
CHECKPOINT_EVERY = 50


def batch_seeds(seed: int, phase: int, step: int, batch: int) -> range:
    first = ((seed * 2 + phase) * 100_000 + step) * batch
    return range(first, first + batch)


def videos(seeds, config) -> torch.Tensor:
    """Clips in the model's [-1, 1] range."""
    return sprite_batch(seeds, config.frames, config.height, config.width) * 2 - 1


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def autoencoder_loss(model: CMDModel, clips: torch.Tensor) -> torch.Tensor:
    return (model.autoencoder(clips) - clips).pow(2).mean()


def motion_loss(model: CMDModel, clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        content, motion = model.autoencoder.encode(clips)
    noise = torch.randn(motion.shape, generator=generator)
    t = torch.rand(motion.shape[0], generator=generator)
    noisy = (1 - t)[:, None, None, None] * motion + t[:, None, None, None] * noise
    return (model.motion_dit(noisy, t, content) - (noise - motion)).pow(2).mean()


PHASES = (("autoencoder", autoencoder_loss, 1e-3), ("motion_dit", motion_loss, 5e-4))


class Stopped(Exception):
    pass


def train(args) -> CMDModel:
    torch.manual_seed(args.seed)
    config = PRESETS[args.preset]
    model = CMDModel(config)
    steps = {"autoencoder": args.autoencoder_steps, "motion_dit": args.motion_steps}
    state = {"phase": 0, "step": 0, "seconds": 0.0, "losses": {name: [] for name, _, _ in PHASES},
             "step_seconds": {name: [] for name, _, _ in PHASES}}
    optimizer_state = None
    if args.checkpoint.is_file() and not args.fresh:
        saved = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        state, optimizer_state = saved["state"], saved["optimizer"]
        log.info("resuming at %s step %d", PHASES[state["phase"]][0], state["step"])
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    budget = args.stop_after
    for phase in range(state["phase"], len(PHASES)):
        name, loss_of, peak = PHASES[phase]
        module = getattr(model, name)
        optimizer = torch.optim.AdamW(module.parameters(), lr=peak, weight_decay=0.01)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        model.train()
        generator = torch.Generator()
        bar = tqdm(range(state["step"], steps[name]), initial=state["step"], total=steps[name], desc=name)
        for step in bar:
            if budget == 0:
                raise Stopped(f"stopped after {args.stop_after} steps, at {name} step {step}; run again to go on")
            generator.manual_seed(args.seed * 7919 + phase * 1_000_003 + step)
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps[name], peak)
            clips = videos(batch_seeds(args.seed, phase, step, args.batch), config)
            loss = loss_of(model, clips) if phase == 0 else loss_of(model, clips, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            state["step_seconds"][name].append(time.perf_counter() - started)
            state["seconds"] += state["step_seconds"][name][-1]
            state["losses"][name].append(float(loss))
            state["step"] = step + 1
            bar.set_postfix(loss=f"{float(loss):.4f}")
            budget = None if budget is None else budget - 1
            if state["step"] % CHECKPOINT_EVERY == 0 or state["step"] == steps[name] or budget == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
                           args.checkpoint)
        state.update(phase=phase + 1, step=0)
        torch.save({"model": model.state_dict(), "optimizer": None, "state": state}, args.checkpoint)
    model.training_state = state
    return model.eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per clip, on [0, 1] images."""
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def evaluate(model: CMDModel, args) -> dict:
    config = model.config
    clips = videos(HELD_OUT_SEEDS, config)
    content, motion = model.autoencoder.encode(clips)
    reconstructed = model.autoencoder.decode(content, motion)
    truth = (clips + 1) / 2
    ours = psnr((reconstructed + 1) / 2, truth)
    content_only = psnr(((content + 1) / 2)[:, None].expand_as(truth), truth)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for index in range(4):
        noise = torch.randn((3, *config.motion_shape), generator=generator)
        sampled = model.autoencoder.decode(content[index:index + 1].expand(3, -1, -1, -1),
                                           sample_motion(model.motion_dit, content[index:index + 1].expand(3, -1, -1, -1),
                                                         noise, steps=args.sample_steps))
        rows.extend((sampled + 1) / 2)
    _save_strip(torch.stack(rows), args.samples)
    _save_strip(torch.stack([row for i in range(4) for row in (truth[i], (reconstructed[i] + 1) / 2)]),
                args.reconstructions)
    return {"held_out_clips": len(HELD_OUT_SEEDS), "reconstruction_psnr_db": float(ours.mean()),
            "reconstruction_psnr_min_db": float(ours.min()), "content_frame_only_psnr_db": float(content_only.mean())}


def _save_strip(clips: torch.Tensor, path: Path) -> None:
    """One clip per row, frames left to right."""
    from PIL import Image
    count, frames, channels, height, width = clips.shape
    grid = clips.clamp(0, 1).permute(0, 3, 1, 4, 2).reshape(count * height, frames * width, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().byte().numpy()).resize((frames * width * 2, count * height * 2),
                                                                Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sprites64", choices=sorted(PRESETS))
    parser.add_argument("--autoencoder-steps", type=int, default=1200)
    parser.add_argument("--motion-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--stop-after", type=int, help="train this many steps now, checkpoint and stop")
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "artifacts" / "cmd_train" / "checkpoint.pt")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "cmd" / "cmd_sprites64.safetensors")
    parser.add_argument("--report", type=Path, default=REPO_ROOT / "bench" / "results" / "cmd_training.json")
    parser.add_argument("--samples", type=Path, default=REPO_ROOT / "docs" / "cmd_motion_samples.png")
    parser.add_argument("--reconstructions", type=Path, default=REPO_ROOT / "docs" / "cmd_reconstructions.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = train(args)
    except Stopped as stop:
        log.info("%s", stop)
        return
    results = {**evaluate(model, args), "preset": args.preset, "autoencoder_steps": args.autoencoder_steps,
               "motion_steps": args.motion_steps, "batch": args.batch, "seed": args.seed,
               "training_seconds": round(model.training_state["seconds"], 1),
               "median_step_seconds": {k: statistics.median(v) for k, v in model.training_state["step_seconds"].items()},
               "final_losses": {k: sum(v[-50:]) / max(1, len(v[-50:])) for k, v in model.training_state["losses"].items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_cmd(model, args.out, {"reconstruction_psnr_db": f"{results['reconstruction_psnr_db']:.2f}"})
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(results, indent=1) + "\n")
    log.info("%s", json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
