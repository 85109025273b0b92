"""CMD model sizes: the small preset trained in this repository and the paper's shapes."""
from dataclasses import dataclass


class CMDError(ValueError):
    pass


# What a config may claim (a file's metadata is checked against these before a model is built);
# other fields (depths, heads, channels) up to 64.
LIMITS = {"frames": 256, "height": 4096, "width": 4096, "patch": 64, "dim": 2048, "dit_dim": 2048}


@dataclass(frozen=True)
class CMDConfig:
    frames: int = 8
    height: int = 64
    width: int = 64
    channels: int = 3
    patch: int = 8  # pixels per token side, in the encoder, the decoder and the content tokens of the DiT
    dim: int = 96
    heads: int = 4
    encoder_depth: int = 2
    decoder_depth: int = 3
    motion_channels: int = 8
    dit_dim: int = 128
    dit_heads: int = 4
    dit_depth: int = 4

    def __post_init__(self):
        for name, value in vars(self).items():
            if type(value) is not int or not 0 < value <= LIMITS.get(name, 64):
                raise CMDError(f"{name} is {value!r}; a CMD model takes a whole number from 1 to "
                               f"{LIMITS.get(name, 64)}")
        if self.height % self.patch or self.width % self.patch:
            raise CMDError(f"a {self.height}x{self.width} frame does not split into {self.patch}-pixel patches")
        if self.dim % self.heads or self.dit_dim % self.dit_heads:
            raise CMDError("the widths must split evenly over the attention heads")

    @property
    def grid(self) -> tuple:
        """Tokens per frame along height and width."""
        return self.height // self.patch, self.width // self.patch

    @property
    def motion_shape(self) -> tuple:
        """(channels, frames, width tokens + height tokens): the x-t plane next to the y-t plane."""
        rows, columns = self.grid
        return self.motion_channels, self.frames, columns + rows


PRESETS = {
    # 8 frames of 64x64, trained on CPU by scripts/train_cmd.py
    "sprites64": CMDConfig(),
    # the paper's autoencoder (TimeSformer width 384, depth 8, 8 motion channels) and a DiT-B motion
    # model for 16 frames of 512x1024; the paper patches Stable Diffusion's 8x-downsampled latents by 2,
    # pixel patches of 16 give the same 32x64 token grid
    "paper": CMDConfig(frames=16, height=512, width=1024, patch=16, dim=384, heads=6, encoder_depth=8,
                       decoder_depth=8, motion_channels=8, dit_dim=768, dit_heads=12, dit_depth=12),
}
