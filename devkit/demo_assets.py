"""Inputs the demo and the end-to-end tests give a headless ComfyUI: tiny models and a start image."""
from pathlib import Path

from .model_fixtures import write_tiny_models

INPUT_IMAGE = "streamline_demo_input.png"


def write_input_image(path: Path, width: int = 64, height: int = 64) -> Path:
    """A smooth colour gradient with a disc: enough structure for img2vid conditioning."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    image.putdata([(int(255 * x / width), int(255 * y / height), 128) for y in range(height) for x in range(width)])
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 200, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def prepare_base_dir(base_dir: Path) -> None:
    """Fills a ComfyUI base folder with the tiny models and the demo input image (kept if present)."""
    write_tiny_models(Path(base_dir) / "models")
    image = Path(base_dir) / "input" / INPUT_IMAGE
    if not image.exists():
        write_input_image(image)
