"""Fixture nodes for tests and the demo: stand-ins for encoders whose ComfyUI configs are fixed at full
size (umt5-xxl for Wan, ViT-H CLIP vision for SVD, the Wan 2.2 VAE), so stock workflows run on a CPU with tiny models,
a loader for the small SVD-architecture sprite model trained here (ComfyUI detects SVD only at full size),
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


SMALL_SVD_UNET_KEYS = {"model_channels", "channel_mult", "num_res_blocks", "transformer_depth",
                       "transformer_depth_output", "transformer_depth_middle"}
SMALL_SVD_VAE_KEYS = {"ch", "ch_mult", "num_res_blocks", "z_channels"}


def _config_from_metadata(metadata: dict, key: str, allowed: set) -> dict:
    """A JSON object of ints and lists of ints under `key` in a safetensors header, only `allowed` keys."""
    config = json.loads(metadata.get(key, "null"))
    if not isinstance(config, dict) or not set(config) <= allowed or not all(
            isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v)) for v in config.values()):
        raise ValueError(f"not a small SVD checkpoint: its header has no valid {key!r} (keys {sorted(allowed)})")
    return config


def small_svd_unet_config(small: dict) -> dict:
    """SVD img2vid's VideoUNet config (what ComfyUI's detection gives for SVD) with the small sizes."""
    import comfy.supported_models
    return {**comfy.supported_models.SVD_img2vid.unet_config, "use_checkpoint": False, "image_size": 32,
            "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "out_channels": 4,
            "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
            "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "disable_temporal_crossattention": False, **small}


def small_sd_vae_ddconfig(small: dict) -> dict:
    """An SD-style KL autoencoder's ddconfig (what ComfyUI builds for SD VAEs) with the small sizes."""
    return {"double_z": True, "resolution": 256, "in_channels": 3, "out_ch": 3, "attn_resolutions": [],
            "dropout": 0.0, **small}


def small_sd_vae(state_dict: dict, small: dict):
    """ComfyUI's VAE object around an AutoencoderKL of the small config, weights loaded strictly."""
    import comfy.sd
    vae = comfy.sd.VAE(sd=state_dict, config={"params": {"ddconfig": small_sd_vae_ddconfig(small),
                                                         "embed_dim": small["z_channels"]}})
    missing, unexpected = vae.first_stage_model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"not a small SVD checkpoint: VAE weights missing {missing[:3]}, unexpected {unexpected[:3]}")
    return vae


def load_small_svd_checkpoint(path: str) -> tuple:
    """(MODEL, VAE) from a file written by scripts/train_svd_sprites.py: ComfyUI's SVD_img2vid model
    (VideoUNet) and an SD-style AutoencoderKL, built from the small configs in the file's header (JSON)
    with ComfyUI's own classes, weights loaded strictly."""
    import comfy.latent_formats
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    unet_config = small_svd_unet_config(_config_from_metadata(metadata, "streamline_svd_unet", SMALL_SVD_UNET_KEYS))
    state_dict = comfy.utils.load_torch_file(path)
    model_config = comfy.supported_models.SVD_img2vid(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    unet_weights = {k[len("model.diffusion_model."):]: v for k, v in state_dict.items()
                    if k.startswith("model.diffusion_model.")}
    model.diffusion_model.load_state_dict(unet_weights, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    vae_weights = {k[len("first_stage_model."):]: v for k, v in state_dict.items() if k.startswith("first_stage_model.")}
    vae_config = _config_from_metadata(metadata, "streamline_sd_vae", SMALL_SVD_VAE_KEYS)
    return patcher, small_sd_vae(vae_weights, vae_config)


class SmallSVDCheckpoint:
    """The small SVD-architecture image-to-video model trained here, with its VAE (MODEL, VAE as
    ImageOnlyCheckpointLoader gives them; CLIP vision: Tiny CLIP Vision)."""
    CATEGORY = "Streamline fixtures"
    RETURN_TYPES = ("MODEL", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    def load(self, ckpt_name):
        import folder_paths
        return load_small_svd_checkpoint(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))


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
    "StreamlineFixtureSmallSVDCheckpoint": SmallSVDCheckpoint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StreamlineFixtureTinyCLIPVision": "Tiny CLIP Vision (fixture)",
    "StreamlineFixtureTextEmbedding": "Text Embedding (fixture)",
    "StreamlineFixtureChunkSensitiveLayer": "Chunk-Sensitive Layer (fixture)",
    "StreamlineFixtureTinyWan22VAE": "Tiny Wan 2.2 VAE (fixture)",
    "StreamlineFixtureSmallSVDCheckpoint": "Small SVD Checkpoint (fixture)",
}
