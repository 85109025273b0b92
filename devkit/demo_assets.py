"""Inputs the demo and the end-to-end tests give a headless ComfyUI: tiny models (also under the official
file names the shipped example workflows load), the sprite models trained here and the example inputs."""
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .model_fixtures import _save, build_wan, save_svd_checkpoint, save_wan_diffusion_model, save_wan_vae, write_tiny_models
from .sprite_videos import HELD_OUT_SEEDS, sprite_video
from .sprite_workflows import link_sprite_models, write_first_frames

INPUT_IMAGE = "streamline_demo_input.png"
SPRITE_CLIP = "streamline_sprites_clip.webp"  # 8 frames of 64x64, a held-out CMD clip
SPRITE_STILL = "streamline_sprites_still.png"  # a still of another held-out clip: a content frame for generation
START_IMAGE = "streamline_start_image.png"  # the start image of the shipped image-to-video workflows


def save_wan_i2v_diffusion_model(path: Path, seed: int = 0) -> Path:
    """A tiny Wan 2.1 I2V diffusion model (36 input channels, CLIP image embedding) for UNETLoader."""
    import torch
    return _save(build_wan("tiny", seed=seed, variant="2.1 i2v").diffusion_model.state_dict(), Path(path), torch.float16)


def save_wan_lora(path: Path, variant: str, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA (kohya key names, as the CausVid LoRAs the VACE templates load) for some of the linear
    layers of the tiny Wan `variant`'s blocks, VACE blocks included."""
    import torch
    model = build_wan("tiny", variant=variant).diffusion_model
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(("self_attn.q", "cross_attn.v", "ffn.0")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.05
            state[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.05
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return _save(state, Path(path), torch.float16)


# Tiny random-weight models under the names ComfyUI's own templates (and this pack's example workflows)
# give the real files; the two Wan 2.2 A14B experts are Wan 2.1-structured DiTs.
OFFICIAL_NAME_FIXTURES = {
    "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors": lambda p: save_wan_diffusion_model(p, seed=0),
    "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": lambda p: save_wan_diffusion_model(p, seed=1),
    "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": lambda p: save_wan_diffusion_model(p, seed=2),
    "diffusion_models/wan2.1_i2v_480p_14B_fp16.safetensors": lambda p: save_wan_i2v_diffusion_model(p, seed=3),
    "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors": lambda p: save_wan_diffusion_model(p, seed=4,
                                                                                          variant="2.2 ti2v 5B"),
    "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors": lambda p: save_wan_diffusion_model(
        p, seed=5, variant="2.2 i2v A14B"),
    "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors": lambda p: save_wan_diffusion_model(
        p, seed=6, variant="2.2 i2v A14B"),
    "diffusion_models/wan2.1_vace_14B_fp16.safetensors": lambda p: save_wan_diffusion_model(p, seed=7,
                                                                                           variant="2.1 vace"),
    "loras/Wan21_CausVid_14B_T2V_lora_rank32.safetensors": lambda p: save_wan_lora(p, "2.1 vace"),
    "vae/wan_2.1_vae.safetensors": lambda p: save_wan_vae(p, seed=0),
    "checkpoints/svd_xt.safetensors": lambda p: save_svd_checkpoint(p, seed=0),
}
# Files the shipped workflows name whose loaders the fixtures replace (devkit/workflows.py): empty
# stand-ins, never loaded, so the frontend finds every file a workflow names, as on a user's machine
# that has them (it would otherwise open its missing-models dialog).
SWAPPED_FILES = ("text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "clip_vision/clip_vision_h.safetensors",
                 "vae/wan2.2_vae.safetensors")


def write_input_image(path: Path, width: int = 64, height: int = 64) -> Path:
    """A smooth colour gradient with a disc: enough structure for img2vid conditioning."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    image.putdata([(int(255 * x / width), int(255 * y / height), 128) for y in range(height) for x in range(width)])
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 200, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _images(video):
    from PIL import Image
    return [Image.fromarray((frame.permute(1, 2, 0) * 255).round().byte().numpy()) for frame in video]


def write_sprite_inputs(input_dir: Path) -> None:
    """A held-out sprite clip as a lossless animated WEBP (LoadImage reads every frame) and a still."""
    input_dir.mkdir(parents=True, exist_ok=True)
    frames = _images(sprite_video(HELD_OUT_SEEDS[0]))
    frames[0].save(input_dir / SPRITE_CLIP, save_all=True, append_images=frames[1:], lossless=True, duration=125)
    _images(sprite_video(HELD_OUT_SEEDS[1]))[0].save(input_dir / SPRITE_STILL)


def write_example_inputs(input_dir: Path) -> None:
    """The input files of the shipped example workflows (example_workflows/input/)."""
    if not (Path(input_dir) / START_IMAGE).exists():
        write_input_image(Path(input_dir) / START_IMAGE, 416, 240)
    if not (Path(input_dir) / SPRITE_CLIP).exists():
        write_sprite_inputs(Path(input_dir))


def prepare_base_dir(base_dir: Path) -> None:
    """Fills a ComfyUI base folder with the tiny models (also under the official names), the trained
    sprite models (linked from models/sprites) and the inputs: the shipped example inputs, copied to
    input/ as the README tells users to (kept if present)."""
    from .workflows import EXAMPLE_INPUTS_DIR

    write_tiny_models(Path(base_dir) / "models")
    link_sprite_models(Path(base_dir) / "models")
    for relative, save in OFFICIAL_NAME_FIXTURES.items():
        if not (Path(base_dir) / "models" / relative).exists():
            save(Path(base_dir) / "models" / relative)
    for relative in SWAPPED_FILES:
        path = Path(base_dir) / "models" / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({}, str(path))
    (Path(base_dir) / "input").mkdir(parents=True, exist_ok=True)
    write_first_frames(Path(base_dir) / "input")
    for source in sorted(EXAMPLE_INPUTS_DIR.glob("*")) if EXAMPLE_INPUTS_DIR.is_dir() else []:
        if not (Path(base_dir) / "input" / source.name).exists():
            shutil.copy(source, Path(base_dir) / "input" / source.name)
    image = Path(base_dir) / "input" / INPUT_IMAGE
    if not image.exists():
        write_input_image(image)
    if not (Path(base_dir) / "input" / SPRITE_CLIP).exists():
        write_sprite_inputs(Path(base_dir) / "input")
