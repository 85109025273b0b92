"""The sprite video models trained here (scripts/train_video_models.py, shipped in models/sprites): the
prompt clips are seeded with held-out seeds apart, the motion measures (devkit/video_metrics) score the
ground-truth clips near perfect and broken clips badly, the training script resumes, and the shipped
models load through ComfyUI's loaders and make the prompted motion through the HTTP API, also through
Step Rehash."""
import math
import re

import pytest
import torch

from devkit.comfy_env import REPO_ROOT
from devkit.sprite_workflows import (DIT_FILE, SPRITE_MODELS_DIR, SVD_FILE, SVD_FIRST_FRAMES, VAE_FILE, saved_frames,
                                     sprite_prompt, svd_sprite_prompt)
from devkit.sprite_videos import (PROMPT_HELD_OUT_SEEDS, PROMPTS, REFERENCE_FRAMES, parse_prompt, prompt_batch,
                                  prompt_of, prompt_video)
from devkit.video_metrics import centre_tracks, motion_measures


def test_prompt_clips_are_seeded_and_held_out_seeds_are_apart():
    assert len(PROMPTS) == 12 and PROMPTS[0] == "disc moving left" and PROMPTS[-1] == "triangle moving down"
    video, prompt = prompt_video(PROMPT_HELD_OUT_SEEDS[0])
    again, _ = prompt_video(PROMPT_HELD_OUT_SEEDS[0])
    assert video.shape == (REFERENCE_FRAMES, 3, 64, 64) and torch.equal(video, again) and prompt == prompt_of(10**9)
    assert 0 <= video.min() and video.max() <= 1
    start, _ = prompt_video(PROMPT_HELD_OUT_SEEDS[0], frames=9)
    assert torch.allclose(start, video[:9])  # a shorter clip is the start of the longer one: same speed
    assert prompt_video(5, prompt="square moving up")[1] == "square moving up"
    assert sorted({prompt_of(s) for s in PROMPT_HELD_OUT_SEEDS}) == sorted(PROMPTS)  # every prompt held out
    with pytest.raises(ValueError, match="not one of the sprite prompts"):
        parse_prompt("a cat moving left")


def test_ground_truth_clips_score_near_perfect_and_broken_ones_do_not():
    clips, prompts = prompt_batch(PROMPT_HELD_OUT_SEEDS)
    truth = motion_measures(clips, prompts)
    assert truth["direction_accuracy"] == 1.0 and truth["survival"] == 1.0
    assert truth["smoothness_px"] < 0.1 and max(truth["per_clip"]["smoothness_px"]) < 0.2  # sub-pixel centres
    assert 2.1 < truth["speed_px_per_frame"] < 2.7  # 55-65 % of 64 px over 16 frames
    centres, areas = centre_tracks(clips[:1])
    assert not centres.isnan().any() and (areas > 20).all()

    backwards = motion_measures(clips.flip(1), prompts)
    assert backwards["direction_accuracy"] == 0.0 and backwards["speed_px_per_frame"] < -2
    still = motion_measures(clips[:, :1].expand_as(clips), prompts)  # nothing moves: no foreground at all
    assert still["direction_accuracy"] == 0.0 and still["survival"] == 0.0 and math.isnan(still["smoothness_px"])
    noise = motion_measures(torch.rand_like(clips), prompts)  # the whole frame differs: no sprite
    assert noise["direction_accuracy"] == 0.0 and noise["survival"] == 0.0
    shuffled = motion_measures(clips[:, torch.randperm(REFERENCE_FRAMES, generator=torch.Generator().manual_seed(0))],
                               prompts)
    assert shuffled["smoothness_px"] > 10 * truth["smoothness_px"] + 2
    vanishing = clips.clone()
    vanishing[:, 9:] = clips.median(dim=1, keepdim=True).values  # the background: the sprite gone after frame 8
    assert motion_measures(vanishing, prompts)["survival"] < 0.6


def test_the_training_script_stops_resumes_and_writes_files_comfyuis_loaders_detect(tmp_path):
    """`--quick` (two steps of each model) in two parts: stopped after three steps, then resumed."""
    import subprocess
    import sys

    import comfy.sd
    import comfy.utils

    command = [sys.executable, str(REPO_ROOT / "scripts" / "train_video_models.py"), "wan-dit", "--quick",
               "--checkpoint-dir", str(tmp_path / "checkpoints"), "--models-dir", str(tmp_path / "models"),
               "--results-dir", str(tmp_path / "results")]
    subprocess.run([*command[:2], "wan-vae", *command[3:]], capture_output=True, text=True, timeout=300, check=True)
    stopped = subprocess.run([*command, "--stop-after", "1"], capture_output=True, text=True, timeout=300, check=True)
    assert "stopped after the requested steps, at wan_dit step 1" in stopped.stderr
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "resuming at wan_dit step 1" in resumed.stderr
    model = comfy.sd.load_diffusion_model(str(tmp_path / "models" / "streamline_sprites_wan21_t2v.safetensors"))
    assert type(model.model.model_config).__name__ == "WAN21_T2V"
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tmp_path / "models" / "streamline_sprites_wan21_vae.safetensors")))
    assert vae.latent_channels == 16 and type(vae.first_stage_model).__name__ == "WanVAE"


def test_the_svd_training_script_stops_resumes_and_writes_a_file_the_fixture_loader_builds(tmp_path):
    import subprocess
    import sys

    from devkit.fixture_nodes import load_small_svd_checkpoint

    command = [sys.executable, str(REPO_ROOT / "scripts" / "train_svd_sprites.py"), "svd-unet", "--quick",
               "--checkpoint-dir", str(tmp_path / "checkpoints"), "--models-dir", str(tmp_path / "models"),
               "--results-dir", str(tmp_path / "results")]
    stopped = subprocess.run([*command, "--stop-after", "3"], capture_output=True, text=True, timeout=300, check=True)
    assert "stopped after the requested steps, at svd_unet step 1" in stopped.stderr  # 2 VAE steps, 1 UNet step
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "resuming at svd_unet step 1" in resumed.stderr
    model, vae = load_small_svd_checkpoint(str(tmp_path / "models" / SVD_FILE))
    assert type(model.model).__name__ == "SVD_img2vid"  # ComfyUI's UNetModel with SVD's temporal layers:
    assert any(".time_stack." in key for key in model.model.diffusion_model.state_dict())
    assert vae.latent_channels == 4 and vae.encode(torch.rand(2, 64, 64, 3)).shape == (2, 4, 8, 8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean().clamp_min(1e-10)))


REHASH = {"interval": 3, "shallow_blocks": 1, "full_first_steps": 2, "full_last_steps": 1}


@pytest.mark.parametrize("seed, text", [(0, "disc moving right"), (1, "triangle moving up")])
def test_the_shipped_sprite_model_makes_the_prompted_motion_through_the_api_also_under_step_rehash(
        comfy_server, seed, text):
    """UNETLoader / VAELoader load the shipped files (each <= 20 MB); the sampled video shows the
    prompt's sprite moving the prompt's way; Step Rehash (interval 3: 11 of 20 steps reuse) keeps that
    motion and stays close to stock; at interval 1 it gives stock's frames."""
    assert all((SPRITE_MODELS_DIR / name).stat().st_size <= 20 * 2**20 for name in (DIT_FILE, VAE_FILE))
    videos = {}
    for label, rehash in (("stock", None), ("rehash", REHASH), ("interval_1", {**REHASH, "interval": 1})):
        result = comfy_server.run(sprite_prompt(text, seed, f"test_sprites/{label}_{seed}", rehash))
        assert result.status == "success", result.error
        videos[label] = saved_frames(result, comfy_server.output_dir)
    # steps 0, 1 and 19 full, then every third from step 2: 11 of the 20 (batched cond + uncond) calls reuse
    assert re.search(r"Step Rehash: 11 of 20 model calls reused the deep features", comfy_server.log())
    for label in ("stock", "rehash"):
        measures = motion_measures(videos[label], [text])
        assert measures["direction_accuracy"] == 1.0 and measures["survival"] >= 0.8, (label, measures)
        assert 1.5 < measures["speed_px_per_frame"] < 3.5, (label, measures)
    assert 0 < (videos["rehash"] - videos["stock"]).abs().max()
    assert psnr(videos["rehash"], videos["stock"]) > 25
    assert torch.equal(videos["interval_1"], videos["stock"])


@pytest.mark.parametrize("image", list(SVD_FIRST_FRAMES)[:2])
def test_the_shipped_svd_sprite_model_moves_the_first_frame_through_the_api_also_under_step_rehash(
        comfy_server, image):
    """The Small SVD Checkpoint fixture node loads the shipped file (<= 20 MB); from a held-out clip's
    first frame the sampled video keeps that frame and moves its sprite the way the clip goes; Step
    Rehash (interval 3, the 8x8 level reused) keeps the motion and stays close to stock; at interval 1
    it gives stock's frames."""
    from devkit.sprite_videos import prompt_of

    assert (SPRITE_MODELS_DIR / SVD_FILE).stat().st_size <= 20 * 2**20
    text = prompt_of(SVD_FIRST_FRAMES[image])
    first_frame = prompt_video(SVD_FIRST_FRAMES[image], frames=1)[0][0]
    rehash = {**REHASH, "shallow_blocks": 2}
    videos = {}
    for label, settings in (("stock", None), ("rehash", rehash), ("interval_1", {**rehash, "interval": 1})):
        result = comfy_server.run(svd_sprite_prompt(image, 3, f"test_svd_sprites/{label}_{image}", settings))
        assert result.status == "success", result.error
        videos[label] = saved_frames(result, comfy_server.output_dir)
    for label in ("stock", "rehash"):
        measures = motion_measures(videos[label], [text])
        assert measures["direction_accuracy"] == 1.0 and measures["survival"] >= 0.8, (label, measures)
        assert psnr(videos[label][0], first_frame) > 20, label
    assert 0 < (videos["rehash"] - videos["stock"]).abs().max()
    assert psnr(videos["rehash"], videos["stock"]) > 25
    assert torch.equal(videos["interval_1"], videos["stock"])
