"""A CMD model (autoencoder + motion DiT) and its safetensors file: the weights with the config
in the file's metadata."""
import json
from dataclasses import asdict, fields
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .autoencoder import CMDAutoencoder
from .config import CMDConfig, CMDError
from .motion_dit import MotionDiT

FORMAT = "streamline-cmd/1"
TRAINING_HINT = "train one with scripts/train_cmd.py (docs/cmd.md) or put a .safetensors from it in models/cmd/"


class CMDModel(nn.Module):
    def __init__(self, config: CMDConfig):
        super().__init__()
        self.config = config
        self.autoencoder = CMDAutoencoder(config)
        self.motion_dit = MotionDiT(config)


def save_cmd(model: CMDModel, path: Path, extra: dict = None) -> None:
    metadata = {"format": FORMAT, "config": json.dumps(asdict(model.config)), **(extra or {})}
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    safetensors.torch.save_file(state, str(path), metadata=metadata)


def load_cmd(path: Path) -> CMDModel:
    """The model of a file save_cmd wrote. Its config and every weight's shape are checked (on a
    weightless model) before anything is allocated."""
    path = Path(path)
    if not path.is_file():
        raise CMDError(f"no CMD weights at {path}: {TRAINING_HINT}.")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as error:  # noqa: BLE001 (any unreadable file gets the same advice)
        raise CMDError(f"{path} is not a readable safetensors file ({error}): {TRAINING_HINT}.") from None
    if metadata.get("format") != FORMAT:
        raise CMDError(f"{path} holds no CMD model (its metadata lacks format {FORMAT}): {TRAINING_HINT}.")
    config = _config(metadata.get("config"), path)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in CMDModel(config).state_dict().items()}
    if shapes != expected:
        wrong = sorted(set(shapes) ^ set(expected)) or [n for n in expected if shapes[n] != expected[n]]
        raise CMDError(f"{path} does not match its config ({len(wrong)} weights missing, unexpected or of another "
                       f"shape, e.g. {wrong[0]}): {TRAINING_HINT}.")
    model = CMDModel(config)
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    return model.eval().requires_grad_(False)


def _config(text, path: Path) -> CMDConfig:
    try:
        values = json.loads(text)
        known = {field.name for field in fields(CMDConfig)}
        return CMDConfig(**{k: v for k, v in values.items() if k in known})
    except CMDError as error:
        raise CMDError(f"{path}: {error}: {TRAINING_HINT}.") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise CMDError(f"{path} has no readable CMD config in its metadata ({error}): {TRAINING_HINT}.") from None
