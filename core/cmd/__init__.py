"""CMD (content-motion latent diffusion): a video as one content frame plus a small motion latent."""
from .autoencoder import CMDAutoencoder
from .clips import decode_clips, encode_clips, sample_clip_motion
from .config import PRESETS, CMDConfig, CMDError
from .model import CMDModel, load_cmd, save_cmd
from .motion_dit import MotionDiT, sample_motion

__all__ = ["PRESETS", "CMDAutoencoder", "CMDConfig", "CMDError", "CMDModel", "MotionDiT", "decode_clips", "encode_clips",
           "load_cmd", "sample_clip_motion", "sample_motion", "save_cmd"]
