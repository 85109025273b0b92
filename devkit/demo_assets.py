"""Inputs the demo and the end-to-end tests give a headless ComfyUI: tiny models and a start image."""
from pathlib import Path

from .model_fixtures import write_tiny_models
from .sprite_videos import HELD_OUT_SEEDS, sprite_video

INPUT_IMAGE = "streamline_demo_input.png"
SPRITE_CLIP = "streamline_sprites_clip.webp"  # 8 frames of 64x64, a held-out CMD clip
SPRITE_STILL = "streamline_sprites_still.png"  # a still of another held-out clip: a content frame for generation


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


def prepare_base_dir(base_dir: Path) -> None:
    """Fills a ComfyUI base folder with the tiny models and the demo inputs (kept if present)."""
    write_tiny_models(Path(base_dir) / "models")
    image = Path(base_dir) / "input" / INPUT_IMAGE
    if not image.exists():
        write_input_image(image)
    if not (Path(base_dir) / "input" / SPRITE_CLIP).exists():
        write_sprite_inputs(Path(base_dir) / "input")
