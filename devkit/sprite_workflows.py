"""API prompts on the sprite models trained here (models/sprites), optionally through this pack's Step
Rehash:
- Wan 2.1 text to video (scripts/train_video_models.py) through ComfyUI's own UNETLoader, VAELoader,
  ModelSamplingSD3, KSampler and VAEDecode, with the fixture Text Embedding in place of umt5-xxl;
- SVD image to video (scripts/train_svd_sprites.py): a held-out clip's first frame through LoadImage,
  SVD_img2vid_Conditioning, VideoLinearCFGGuidance, KSampler and VAEDecode, with the Small SVD
  Checkpoint and Tiny CLIP Vision fixture nodes for the loaders."""
from pathlib import Path

import torch

from .comfy_env import REPO_ROOT

SPRITE_MODELS_DIR = REPO_ROOT / "models" / "sprites"
DIT_FILE = "streamline_sprites_wan21_t2v.safetensors"
VAE_FILE = "streamline_sprites_wan21_vae.safetensors"
FRAMES, HEIGHT, WIDTH = 17, 64, 64  # what the models were trained on: latent 16 x 5 x 8 x 8
SHIFT = 3.0
TEXT_TOKENS, TEXT_WIDTH = 16, 4096  # the Text Embedding fixture node's defaults
SAMPLER, SCHEDULER, STEPS, CFG = "euler", "simple", 20, 4.5

# The small SVD-architecture image-to-video model (scripts/train_svd_sprites.py): one checkpoint file with
# the VideoUNet and an SD-style VAE, loaded by the Small SVD Checkpoint fixture node (ComfyUI detects SVD
# only at full size); the configs travel as JSON in the file's header.
SVD_FILE = "streamline_sprites_svd_img2vid.safetensors"
SVD_FRAMES = 14  # SVD's default video_frames
SVD_UNET = {"model_channels": 64, "channel_mult": [1, 1], "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1}
SVD_SD_VAE = {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "z_channels": 4}
SVD_SAMPLING = {"sampler": "euler", "scheduler": "karras", "steps": 20, "cfg": 2.5, "min_cfg": 1.0, "fps": 6,
                "motion_bucket_id": 127}


# held-out clips whose first frames the image-to-video prompts start from (input/ file name -> seed)
SVD_FIRST_FRAMES = {f"streamline_sprites_first_frame_{k}.png": 10**9 + k for k in (0, 5, 10, 15)}


def link_sprite_models(models_dir: Path) -> bool:
    """Links the trained files there are into a ComfyUI models folder (diffusion_models/, vae/,
    checkpoints/); False when some are missing (the training scripts write them)."""
    links = {SPRITE_MODELS_DIR / DIT_FILE: Path(models_dir) / "diffusion_models" / DIT_FILE,
             SPRITE_MODELS_DIR / VAE_FILE: Path(models_dir) / "vae" / VAE_FILE,
             SPRITE_MODELS_DIR / SVD_FILE: Path(models_dir) / "checkpoints" / SVD_FILE}
    for source, link in links.items():
        if source.is_file() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
    return all(source.is_file() for source in links)


def sprite_prompt(text: str, seed: int, prefix: str, rehash: dict | None = None, steps: int = STEPS) -> dict:
    """One sprite video: its frames saved as PNGs (node "9") and as an animated WebP (node "10");
    `rehash` = Step Rehash's inputs (interval, shallow_blocks, full_first_steps, full_last_steps)."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "3": {"class_type": "StreamlineFixtureTextEmbedding",
              "inputs": {"text": text, "tokens": TEXT_TOKENS, "width": TEXT_WIDTH}},
        "4": {"class_type": "StreamlineFixtureTextEmbedding",
              "inputs": {"text": "", "tokens": TEXT_TOKENS, "width": TEXT_WIDTH}},
        "5": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": WIDTH, "height": HEIGHT, "length": FRAMES, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": steps, "cfg": CFG, "sampler_name": SAMPLER,
            "scheduler": SCHEDULER, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
    }
    return _with_outputs_and_rehash(prompt, prefix, rehash, "2")


def _with_outputs_and_rehash(prompt: dict, prefix: str, rehash: dict | None, model_node: str) -> dict:
    """Saves node "8"'s frames (PNGs: "9", animated WebP: "10"); Step Rehash ("11") between `model_node`
    and the KSampler ("6") when `rehash` gives its inputs."""
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"{prefix}_frame"}}
    prompt["10"] = {"class_type": "SaveAnimatedWEBP", "inputs": {
        "images": ["8", 0], "filename_prefix": prefix, "fps": 8.0, "lossless": True, "quality": 100,
        "method": "default"}}
    if rehash is not None:
        prompt["11"] = {"class_type": "StreamlineStepRehash", "inputs": {"model": [model_node, 0], **rehash}}
        prompt["6"]["inputs"]["model"] = ["11", 0]
    return prompt


def write_first_frames(input_dir: Path) -> None:
    from PIL import Image

    from .sprite_videos import prompt_video
    for name, seed in SVD_FIRST_FRAMES.items():
        if not (Path(input_dir) / name).exists():
            frame = prompt_video(seed, frames=1)[0][0]
            Image.fromarray((frame.permute(1, 2, 0) * 255).round().byte().numpy()).save(Path(input_dir) / name)


def svd_sprite_prompt(image: str, seed: int, prefix: str, rehash: dict | None = None,
                      steps: int = SVD_SAMPLING["steps"]) -> dict:
    """One image-to-video sprite video from `image` (in input/); outputs as sprite_prompt's."""
    prompt = {
        "1": {"class_type": "StreamlineFixtureSmallSVDCheckpoint", "inputs": {"ckpt_name": SVD_FILE}},
        "2": {"class_type": "StreamlineFixtureTinyCLIPVision", "inputs": {"seed": 0}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "4": {"class_type": "SVD_img2vid_Conditioning", "inputs": {
            "clip_vision": ["2", 0], "init_image": ["3", 0], "vae": ["1", 1], "width": WIDTH, "height": HEIGHT,
            "video_frames": SVD_FRAMES, "motion_bucket_id": SVD_SAMPLING["motion_bucket_id"],
            "fps": SVD_SAMPLING["fps"], "augmentation_level": 0.0}},
        "5": {"class_type": "VideoLinearCFGGuidance", "inputs": {"model": ["1", 0],
                                                                 "min_cfg": SVD_SAMPLING["min_cfg"]}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": seed, "steps": steps, "cfg": SVD_SAMPLING["cfg"],
            "sampler_name": SVD_SAMPLING["sampler"], "scheduler": SVD_SAMPLING["scheduler"],
            "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 1]}},
    }
    return _with_outputs_and_rehash(prompt, prefix, rehash, "5")


def saved_frames(result, output_dir: Path) -> torch.Tensor:
    """The PNG frames node "9" saved, as one video (frames, 3, h, w) in [0, 1]."""
    import numpy
    from PIL import Image

    images = result.outputs["9"]["images"]
    frames = [numpy.asarray(Image.open(Path(output_dir) / i["subfolder"] / i["filename"]).convert("RGB"))
              for i in images]
    return torch.from_numpy(numpy.stack(frames)).permute(0, 3, 1, 2).float() / 255
