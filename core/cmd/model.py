"""A CMD model (autoencoder + motion DiT) and its safetensors file: the weights with the config
in the file's metadata."""
import json
from dataclasses import asdict, fields
from pathlib import Path

import safetensors.torch
from torch import nn

from .autoencoder import CMDAutoencoder
from .config import CMDConfig, CMDError
from .motion_dit import MotionDiT

FORMAT = "streamline-cmd/1"
TRAINING_HINT = "train one with scripts/train_cmd.py (README: CMD) or put a .safetensors from it in models/cmd/"


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
    path = Path(path)
    if not path.is_file():
        raise CMDError(f"no CMD weights at {path}: {TRAINING_HINT}.")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        state = safetensors.torch.load_file(str(path))
    except Exception as error:  # noqa: BLE001 (any unreadable file gets the same advice)
        raise CMDError(f"{path} is not a readable safetensors file ({error}): {TRAINING_HINT}.") from None
    if metadata.get("format") != FORMAT:
        raise CMDError(f"{path} holds no CMD model (its metadata lacks format {FORMAT}): {TRAINING_HINT}.")
    known = {field.name for field in fields(CMDConfig)}
    model = CMDModel(CMDConfig(**{k: v for k, v in json.loads(metadata["config"]).items() if k in known}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CMDError(f"{path} does not match its config ({len(missing)} weights missing, {len(unexpected)} "
                       f"unexpected): {TRAINING_HINT}.")
    return model.eval().requires_grad_(False)
