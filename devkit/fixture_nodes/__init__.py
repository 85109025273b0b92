"""Fixture nodes for tests and the demo: stand-ins for encoders whose ComfyUI configs are fixed at full
size (umt5-xxl for Wan, ViT-H CLIP vision for SVD, the Wan 2.2 VAE), so stock workflows run on a CPU with tiny models,
and a host patch that no slicing can match (the self-check's end-to-end test).
Loaded next to the product by the harness only; never part of a user's install."""
import hashlib
import json
import math
import tempfile

import torch

import comfy.clip_vision

TINY_CLIP_VISION = {
    "hidden_act": "gelu", "hidden_size": 64, "image_size": 224, "intermediate_size": 128,
    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 1024,
}


def _seeded_generator(*parts) -> torch.Generator:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class TinyCLIPVision:
    """A CLIP vision model (ComfyUI's own class) with a tiny config, 1024-d projection and seeded weights."""
    CATEGORY = "Streamline fixtures"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})},
                # 1280 for Wan 2.1 I2V, whose image embedding reads ViT-H's penultimate hidden states
                "optional": {"hidden_size": ("INT", {"default": 64, "min": 8, "max": 1280, "step": 8})}}

    def load(self, seed, hidden_size=64):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({**TINY_CLIP_VISION, "hidden_size": hidden_size}, f)
        clip_vision = comfy.clip_vision.ClipVisionModel(f.name)
        generator = _seeded_generator("clip_vision", seed, *([hidden_size] if hidden_size != 64 else []))
        with torch.no_grad():
            for param in clip_vision.model.parameters():
                values = torch.randn(param.shape, generator=generator)
                param.copy_(values / math.sqrt(param[0].numel()) if param.dim() >= 2 else 1.0 + 0.05 * values)
        return (clip_vision,)


class TextEmbedding:
    """Deterministic text conditioning of the width a model's text encoder would give (4096 for Wan's
    umt5-xxl), seeded by the text itself."""
    CATEGORY = "Streamline fixtures"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "default": ""}),
            "tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
            "width": ("INT", {"default": 4096, "min": 8, "max": 8192}),
        }}

    def encode(self, text, tokens, width):
        embedding = torch.randn((1, tokens, width), generator=_seeded_generator("text", text, width))
        return ([[embedding, {}]],)


class TinyWan22VAE:
    """The Wan 2.2 VAE (TI2V-5B: 48 latent channels, 16x16) as ComfyUI's own VAE object, built by
    ComfyUI's detection from a state dict, with a tiny width and seeded weights: ComfyUI builds this VAE
    at full size only (699 M parameters), so no small file loads through VAELoader."""
    CATEGORY = "Streamline fixtures"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, seed):
        import comfy.ldm.wan.vae2_2
        import comfy.sd

        full_size = comfy.ldm.wan.vae2_2.WanVAE

        def tiny(**config):
            return full_size(**{**config, "dim": 16, "dec_dim": 16})
        generator = _seeded_generator("wan2.2 vae", seed)
        state_dict = {}
        for name, value in tiny(z_dim=48).state_dict().items():
            values = torch.randn(value.shape, generator=generator)
            if name.endswith("bias"):
                values = 0.05 * values
            elif value.dim() >= 2 and value[0].numel() > 1:
                values = values / math.sqrt(value[0].numel())
            else:  # norm scales
                values = 1.0 + 0.05 * values
            state_dict[name] = values
        comfy.ldm.wan.vae2_2.WanVAE = tiny
        try:
            vae = comfy.sd.VAE(sd=state_dict)
        finally:
            comfy.ldm.wan.vae2_2.WanVAE = full_size
        return (vae,)


class ChunkSensitiveLayer:
    """A host patch that is not per token, for the self-check test: the output projection of one Wan
    block's self-attention scales its result by a factor that depends on how many tokens it is given,
    so that block sliced into token chunks cannot equal the stock block, and Streamline's self-check
    must notice and run it stock."""
    CATEGORY = "Streamline fixtures"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "block": ("INT", {"default": 0, "min": 0, "max": 100})}}

    def patch(self, model, block):
        name = f"diffusion_model.blocks.{block}.self_attn.o"
        layer = model.get_model_object(name)

        def forward(x):
            return type(layer).forward(layer, x) * (1.0 + 0.01 * math.sin(x.shape[1]))
        clone = model.clone()
        clone.add_object_patch(f"{name}.forward", forward)
        return (clone,)


NODE_CLASS_MAPPINGS = {
    "StreamlineFixtureTinyCLIPVision": TinyCLIPVision,
    "StreamlineFixtureTextEmbedding": TextEmbedding,
    "StreamlineFixtureChunkSensitiveLayer": ChunkSensitiveLayer,
    "StreamlineFixtureTinyWan22VAE": TinyWan22VAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StreamlineFixtureTinyCLIPVision": "Tiny CLIP Vision (fixture)",
    "StreamlineFixtureTextEmbedding": "Text Embedding (fixture)",
    "StreamlineFixtureChunkSensitiveLayer": "Chunk-Sensitive Layer (fixture)",
    "StreamlineFixtureTinyWan22VAE": "Tiny Wan 2.2 VAE (fixture)",
}
