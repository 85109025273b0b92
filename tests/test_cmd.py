"""CMD content/motion nodes: the autoencoder's content frame and motion latent, the shipped weights'
reconstructions and sampled motion, what the nodes refuse, the training script, and both example
workflows through a real headless ComfyUI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from conftest import REPO_ROOT, load_workflow
from devkit.sprite_videos import HELD_OUT_SEEDS, sprite_batch, sprite_video

SHIPPED = REPO_ROOT / "models" / "cmd" / "cmd_sprites64.safetensors"
# measured on the 64 held-out clips when the shipped weights were trained (bench/results/cmd_training.json)
TRAINING_REPORT = json.loads((REPO_ROOT / "bench" / "results" / "cmd_training.json").read_text())


@pytest.fixture(scope="module")
def cmd(pack):
    from comfyui_streamline.core.cmd import load_cmd
    return load_cmd(SHIPPED)


def images(video: torch.Tensor) -> torch.Tensor:
    """(frames, 3, h, w) -> ComfyUI's IMAGE layout."""
    return video.permute(0, 2, 3, 1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def node_output(node, **inputs):
    return node.execute(**inputs).result


def test_the_content_frame_is_a_per_pixel_softmax_over_time_weighted_sum(pack):
    from comfyui_streamline.core.cmd import CMDAutoencoder, CMDConfig

    config = CMDConfig(frames=4, height=16, width=24, patch=4, dim=32, heads=2, encoder_depth=1, decoder_depth=1)
    autoencoder = CMDAutoencoder(config).eval()
    video = torch.rand(2, 4, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        weights = autoencoder.frame_weights(video)
        content, motion = autoencoder.encode(video)
        static_content, _ = autoencoder.encode(video[:, :1].expand_as(video))
    assert weights.shape == video.shape and torch.allclose(weights.sum(dim=1), torch.ones(2, 3, 16, 24), atol=1e-6)
    assert weights.std() > 0  # per pixel and channel, not one weight per frame
    assert torch.allclose(content, (weights * video).sum(dim=1), atol=1e-6)
    assert torch.allclose(static_content, video[:, 0], atol=1e-5)  # a still video is its own content frame
    assert motion.shape == (2, *config.motion_shape) == (2, 8, 4, 6 + 4) and motion.abs().max() < 1


def test_shipped_weights_reconstruct_held_out_clips_better_than_their_content_frame(cmd):
    from comfyui_streamline.core.cmd import decode_clips, encode_clips

    clips = sprite_batch(HELD_OUT_SEEDS[:8])
    frames = images(clips.flatten(0, 1))
    content, motion = encode_clips(cmd, frames)
    decoded = decode_clips(cmd, content, motion)
    assert content.shape == (8, 64, 64, 3) and motion.shape == (8, *cmd.config.motion_shape)
    ours, still = psnr(decoded, frames), psnr(content.repeat_interleave(8, dim=0), frames)
    assert ours > still + 3.0 and ours > TRAINING_REPORT["reconstruction_psnr_min_db"], (ours, still)


def test_sampled_motion_depends_on_the_seed_and_moves(cmd):
    from comfyui_streamline.core.cmd import decode_clips, sample_clip_motion

    content = images(sprite_video(HELD_OUT_SEEDS[1])[:1])
    first, again, other = (sample_clip_motion(cmd, content, seed, steps=10) for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    frames = decode_clips(cmd, content, first)
    assert frames.shape == (8, 64, 64, 3) and 0 <= frames.min() and frames.max() <= 1
    assert (frames[1:] - frames[:-1]).abs().mean() > 1e-3  # the frames differ: there is motion


def test_nodes_run_several_clips_and_refuse_what_the_model_cannot_take(pack):
    from comfyui_streamline.nodes.cmd import CMDDecoder, CMDEncode, CMDLoader, CMDMotionSampler

    model = node_output(CMDLoader, model_name=SHIPPED.name)[0]
    two_clips = images(sprite_batch(HELD_OUT_SEEDS[:2]).flatten(0, 1))
    content, motion = node_output(CMDEncode, cmd_model=model, frames=two_clips)
    assert content.shape[0] == 2 and node_output(CMDDecoder, cmd_model=model, content=content,
                                                 motion=motion)[0].shape == (16, 64, 64, 3)
    with pytest.raises(ValueError, match="CMD Encode: got 12 frames; this CMD model encodes clips of exactly 8"):
        node_output(CMDEncode, cmd_model=model, frames=two_clips[:12])
    with pytest.raises(ValueError, match="the video is 48x64 with 3 channels; this CMD model takes 64x64 RGB"):
        node_output(CMDEncode, cmd_model=model, frames=two_clips[:8, :, :48])
    with pytest.raises(ValueError, match="the content frame is 32x32 .* takes 64x64"):
        node_output(CMDMotionSampler, cmd_model=model, content=two_clips[:1, :32, :32], seed=0, steps=2)
    with pytest.raises(ValueError, match="2 content frames for 3 motion latents"):
        node_output(CMDDecoder, cmd_model=model, content=content, motion={"motion": motion["motion"][[0, 1, 1]]})


def test_missing_or_foreign_weights_are_named_with_how_to_train_them(pack, tmp_path):
    import safetensors.torch
    from comfyui_streamline.core.cmd import load_cmd
    from comfyui_streamline.nodes.cmd import CMDLoader

    message = CMDLoader.validate_inputs("cmd_missing.safetensors")
    assert "no CMD weights named 'cmd_missing.safetensors' in" in message and "models/cmd" in message
    assert "scripts/train_cmd.py" in message and CMDLoader.validate_inputs(SHIPPED.name) is True
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match=f"{foreign} holds no CMD model .*scripts/train_cmd.py"):
        load_cmd(foreign)
    with pytest.raises(ValueError, match=f"no CMD weights at {tmp_path / 'absent.safetensors'}"):
        load_cmd(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("claim, message", [
    ({"dim": 1536, "heads": 4}, "does not match its config .*weights missing, unexpected or of another shape"),
    ({"dim": 10 ** 6}, "dim is 1000000; a CMD model takes a whole number from 1 to 2048"),
    ({"frames": -3}, "frames is -3"), ({"dim": "96"}, "dim is '96'")])
def test_a_config_that_does_not_fit_its_weights_is_refused_before_a_model_is_allocated(pack, tmp_path, claim, message):
    import json

    import psutil
    import safetensors
    import safetensors.torch
    from comfyui_streamline.core.cmd import load_cmd

    with safetensors.safe_open(str(SHIPPED), framework="pt") as file:
        metadata = file.metadata()
    forged = tmp_path / "forged.safetensors"
    state = safetensors.torch.load_file(str(SHIPPED))
    safetensors.torch.save_file(state, str(forged), metadata={
        **metadata, "config": json.dumps({**json.loads(metadata["config"]), **claim})})
    del state
    before = psutil.Process().memory_info().rss
    with pytest.raises(ValueError, match=message) as refused:
        load_cmd(forged)
    assert "scripts/train_cmd.py" in str(refused.value)
    assert psutil.Process().memory_info().rss - before < 64 * 2 ** 20


def _train(tmp_path, *extra) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train_cmd.py"), "--autoencoder-steps", "3", "--motion-steps", "3",
         "--batch", "2", "--sample-steps", "2", "--checkpoint", str(out / "checkpoint.pt"),
         "--out", str(out / "cmd.safetensors"), "--report", str(out / "report.json"),
         "--samples", str(out / "samples.png"), "--reconstructions", str(out / "reconstructions.png"), *extra],
        capture_output=True, text=True, timeout=600, check=True)


def test_training_stopped_and_resumed_gives_the_weights_of_an_uninterrupted_run(pack, tmp_path):
    import safetensors.torch

    _train(tmp_path / "whole")
    stopped = _train(tmp_path / "parts", "--stop-after", "4")
    assert "stopped after 4 steps, at motion_dit step 1" in stopped.stderr
    resumed = _train(tmp_path / "parts")
    assert "resuming at motion_dit step 1" in resumed.stderr
    whole = safetensors.torch.load_file(tmp_path / "whole" / "out" / "cmd.safetensors")
    parts = safetensors.torch.load_file(tmp_path / "parts" / "out" / "cmd.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    report = json.loads((tmp_path / "parts" / "out" / "report.json").read_text())
    assert report["held_out_clips"] == 64 and report["reconstruction_psnr_db"] > 0
    assert Image.open(tmp_path / "parts" / "out" / "samples.png").size == (8 * 64 * 2, 12 * 64 * 2)


def _webp_frames(result, server, prefix) -> list:
    [path] = [p for p in result.files(server.output_dir) if p.name.startswith(prefix) and p.suffix == ".webp"]
    return [np.asarray(frame.convert("RGB"), dtype=np.float32) / 255 for frame in ImageSequence.Iterator(Image.open(path))]


def test_reconstruction_workflow_runs_through_the_api(comfy_server):
    result = comfy_server.run(load_workflow("cmd_reconstruction"))
    assert result.status == "success", result.error
    frames = torch.from_numpy(np.stack(_webp_frames(result, comfy_server, "cmd_reconstruction")))
    assert frames.shape == (8, 64, 64, 3)
    assert psnr(frames, images(sprite_video(HELD_OUT_SEEDS[0]))) > TRAINING_REPORT["reconstruction_psnr_min_db"] - 1


def test_generation_workflow_runs_through_the_api_and_a_missing_model_is_named(comfy_server):
    from devkit.comfy_server import PromptRejected

    prompt = load_workflow("cmd_generation")
    prompt["1"]["inputs"]["model_name"] = "cmd_missing.safetensors"
    with pytest.raises(PromptRejected) as refused:
        comfy_server.queue(prompt)
    assert "no CMD weights named 'cmd_missing.safetensors'" in json.dumps(refused.value.body["node_errors"])
    assert "scripts/train_cmd.py" in json.dumps(refused.value.body["node_errors"])
    result = comfy_server.run(load_workflow("cmd_generation"))
    assert result.status == "success", result.error
    frames = _webp_frames(result, comfy_server, "cmd_generation")
    assert len(frames) == 8 and np.abs(frames[-1] - frames[0]).mean() > 1e-3
