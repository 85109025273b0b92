"""Exact feature slicing and operator grouping (FME) for video diffusion models."""
from .registry import (UnsupportedModelError, apply_slicing, decode_estimate, remove_slicing,
                       slicing_applied, slicing_patches)
from .settings import SliceSettings

__all__ = ["SliceSettings", "UnsupportedModelError", "apply_slicing", "decode_estimate", "remove_slicing",
           "slicing_applied", "slicing_patches"]
