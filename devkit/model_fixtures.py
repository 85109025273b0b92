"""ComfyUI's real video model classes with tiny or full-size configs and random weights.

Tiny models run on a CPU in seconds and are saved as safetensors that ComfyUI's stock loaders detect
(ImageOnlyCheckpointLoader for SVD img2vid, UNETLoader and VAELoader for Wan 2.1). Full-size models are
built on the meta device (no memory) for memory work under fake tensors.
"""
import contextlib
import copy
import logging
import math
import sys
from pathlib import Path

import torch

from .comfy_env import import_comfyui, import_pack

# SVD img2vid is only detected with model_channels 320, context_dim 1024, adm_in_channels 768 and this
# transformer_depth; the tiny config keeps those and the four-level layout but no channel growth.
_SVD_COMMON = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=768, in_channels=8, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    use_linear_in_transformer=True, context_dim=1024, extra_ff_mix_layer=True, use_spatial_context=True,
    merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
    use_temporal_resblock=True, use_temporal_attention=True, disable_temporal_crossattention=False,
)
SVD_CONFIGS = {
    "tiny": {**_SVD_COMMON, "channel_mult": [1, 1, 1, 1]},
    "full": {**_SVD_COMMON, "channel_mult": [1, 2, 4, 4]},  # SVD img2vid, 1.52 B parameters
    # In-process only (not detectable from a file): two levels, 64 channels, every video block kind.
    "micro": {**_SVD_COMMON, "model_channels": 64, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
              "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]},
}

# Wan 2.1 detection fixes num_heads = dim // 128, text_dim 4096 and freq_dim 256.
_WAN_COMMON = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16,
                   out_dim=16, freq_dim=256, text_dim=4096, window_size=(-1, -1), qk_norm=True,
                   cross_attn_norm=True, eps=1e-6)
WAN_CONFIGS = {
    "tiny": {**_WAN_COMMON, "dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2},
    "1.3B": {**_WAN_COMMON, "dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30},
    "14B": {**_WAN_COMMON, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40},
}
WAN_VAE_DIMS = {"tiny": 16, "full": 96}
WAN_TEXT_DIM = 4096
SVD_CONTEXT_DIM = 1024


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fills every parameter with seeded values of a trained-like scale
    (ComfyUI's ops leave parameters uninitialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.dim() >= 2:
                values /= math.sqrt(max(1, param[0].numel()))
            elif name.endswith("weight") or name.endswith("gamma"):
                values = 1.0 + 0.05 * values
            else:
                values *= 0.05
            param.copy_(values.to(param.dtype))
    return module


def _build(config_class, unet_config, dtype, device, seed):
    import comfy.model_management  # noqa: F401  (initialises devices before the model is built)

    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    if device == "meta":
        with torch.device("meta"):
            # .to("meta"): a few parameters are made by legacy constructors (torch.Tensor([alpha]) in
            # AlphaBlender) that ignore the default device; torch 2.9 cannot make those fake later
            return model_config.get_model({}).to("meta")
    return randomize_(model_config.get_model({}), seed).to(device)


def build_svd(size: str = "tiny", dtype=torch.float32, device: str = "cpu", seed: int = 0):
    """ComfyUI's SVD img2vid BaseModel (VideoUNet inside `.diffusion_model`)."""
    import_comfyui()
    import comfy.supported_models as sm
    return _build(sm.SVD_img2vid, SVD_CONFIGS[size], dtype, device, seed)


WAN_VARIANTS = {  # variant -> (ComfyUI model config class, config changes)
    "2.1 t2v": ("WAN21_T2V", {}),
    "2.1 i2v": ("WAN21_I2V", {"model_type": "i2v", "in_dim": 36}),  # CLIP image tokens in cross-attention
    # first-last-frame: both images' CLIP tokens, with learnt positions (img_emb.emb_pos, ViT-H's 2 x 257)
    # Wan 2.2 A14B image-to-video experts: the image latents concatenated to the input, no CLIP tokens
    "2.2 i2v A14B": ("WAN21_T2V", {"in_dim": 36}),
    "2.1 flf2v": ("WAN21_I2V", {"model_type": "i2v", "in_dim": 36, "flf_pos_embed_token_number": 514}),
    "2.2 ti2v 5B": ("WAN22_T2V", {"in_dim": 48, "out_dim": 48}),  # per-frame timesteps from the denoise mask
    # VACE: a control stream through vace_blocks, its hints added after the main blocks they map to
    "2.1 vace": ("WAN21_Vace", {"model_type": "vace", "vace_layers": 2, "vace_in_dim": 96}),
    "2.1 fun camera": ("WAN21_Camera", {"model_type": "camera", "in_dim": 32}),
    "2.2 s2v": ("WAN22_S2V", {"model_type": "s2v"}),
    "2.2 animate": ("WAN22_Animate", {"model_type": "animate", "in_dim": 36}),
    "2.1 scail": ("WAN21_SCAIL", {"model_type": "scail", "in_dim": 20}),
    "2.2 wandancer": ("WAN22_WanDancer", {"model_type": "wandancer", "in_dim": 36}),
    "2.1 humo": ("WAN21_HuMo", {"model_type": "humo"}),
    "animate 2": ("WAN_Animate2", {"model_type": "animate2", "in_dim": 36}),
    "2.1 causal forcing": ("WAN21_CausalAR_T2V", {"causal_ar": True}),
}


def host_has_wan_variant(variant: str) -> bool:
    """Whether the ComfyUI under test has the model config class of a WAN_VARIANTS entry."""
    import_comfyui()
    import comfy.supported_models as sm
    return hasattr(sm, WAN_VARIANTS[variant][0])


def build_wan(size: str = "tiny", dtype=torch.float32, device: str = "cpu", seed: int = 0, variant: str = "2.1 t2v",
              layers: int | None = None, **config_changes):
    """ComfyUI's Wan BaseModel (WanModel inside `.diffusion_model`): Wan 2.1 text-to-video unless
    `variant` names another of WAN_VARIANTS; `layers` overrides the number of transformer blocks,
    `config_changes` other entries of the config (e.g. vace_layers)."""
    import_comfyui()
    import comfy.supported_models as sm
    config_class, changes = WAN_VARIANTS[variant]
    config = {**WAN_CONFIGS[size], **changes, **({"num_layers": layers} if layers else {}), **config_changes}
    return _build(getattr(sm, config_class), config, dtype, device, seed)


def materialize_fake(module: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """The pack's core.memory.predictor.materialize_fake on a copy of a meta module (fake weights;
    the meta module stays as it is, so it can be materialized again under another FakeTensorMode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with unset_fake_temporarily():
        module = copy.deepcopy(module)
    return sys.modules[import_pack().__name__ + ".core.memory.predictor"].materialize_fake(module, device)


def offload_every_layer(module: torch.nn.Module) -> None:
    """What ComfyUI's low-VRAM load does to a layer left offloaded: it casts (fetches) its weight at
    every call."""
    for layer in module.modules():
        if hasattr(layer, "comfy_cast_weights") and getattr(layer, "weight", None) is not None:
            layer.comfy_cast_weights = True


@contextlib.contextmanager
def counted_weight_fetches():
    """{layer: weight bytes it fetched through ComfyUI's cast_bias_weight} inside the block."""
    import comfy.ops

    host_cast = comfy.ops.cast_bias_weight
    fetched = {}

    def counted_cast(layer, *args, **kwargs):
        fetched[layer] = fetched.get(layer, 0) + layer.weight.nbytes + (0 if layer.bias is None else layer.bias.nbytes)
        return host_cast(layer, *args, **kwargs)

    comfy.ops.cast_bias_weight = counted_cast
    try:
        yield fetched
    finally:
        comfy.ops.cast_bias_weight = host_cast


def _vae_from_detection(marker_sd: dict, seed: int):
    """Lets ComfyUI's own VAE detection build the architecture, then gives it random weights."""
    import comfy.sd
    logging.disable(logging.WARNING)  # the marker state dict is incomplete by design: no missing-key noise
    try:
        vae = comfy.sd.VAE(sd=marker_sd)
    finally:
        logging.disable(logging.NOTSET)
    randomize_(vae.first_stage_model, seed)
    return vae


def build_svd_vae(seed: int = 0):
    """SVD's temporal VAE (fixed size in ComfyUI: 83 M parameters)."""
    import_comfyui()
    return _vae_from_detection({"decoder.mid.block_1.mix_factor": torch.zeros(1)}, seed)


def build_wan_vae(size: str = "tiny", seed: int = 0):
    import_comfyui()
    dim = WAN_VAE_DIMS[size]
    # ComfyUI 0.33 also reads the image and output channel counts off the first and last convolutions.
    return _vae_from_detection({"decoder.middle.0.residual.0.gamma": torch.ones(4 * dim, 1, 1, 1),
                                "decoder.head.0.gamma": torch.ones(dim, 1, 1, 1),
                                "encoder.conv1.weight": torch.zeros(dim, 3, 3, 3, 3),
                                "decoder.head.2.weight": torch.zeros(3, dim, 3, 3, 3)}, seed)


WAN22_VAE_CONFIGS = {"tiny": dict(dim=16, dec_dim=16, z_dim=48), "full": dict(dim=160, dec_dim=256, z_dim=48)}


def build_wan22_vae(size: str = "tiny", device: str = "cpu", seed: int = 0):
    """The Wan 2.2 VAE module (TI2V-5B: 16x16 spatial compression, 48 latent channels), with the
    config ComfyUI's detection gives the full size. ComfyUI detects no smaller one, so this builds
    the module directly (for the plain-torch slicing API and the benchmarks)."""
    import_comfyui()
    import comfy.ldm.wan.vae2_2
    with torch.device(device):
        vae = comfy.ldm.wan.vae2_2.WanVAE(**WAN22_VAE_CONFIGS[size])
    return vae if device == "meta" else randomize_(vae, seed)


def build_image_vae(seed: int = 0):
    """An image-only VAE (ComfyUI's TAESD), for the error path of the video VAE nodes."""
    import_comfyui()
    return _vae_from_detection({"taesd_decoder.1.weight": torch.zeros(64, 4, 3, 3)}, seed)


DIFFUSERS_SVD_UNET_CONFIGS = {  # "full" is diffusers' default: Stable Video Diffusion's UNet
    "tiny": dict(in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                 up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                 addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
                 cross_attention_dim=32, num_attention_heads=(2, 4)),
    "full": dict(),
}
DIFFUSERS_SVD_VAE_CONFIGS = {  # "full": stabilityai/stable-video-diffusion-img2vid's vae/config.json
    "tiny": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=2),
    "full": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 layers_per_block=2, sample_size=768),
}


def build_diffusers_svd_unet(size: str = "tiny", dtype=torch.float32, device: str = "cpu", seed: int = 0):
    from diffusers import UNetSpatioTemporalConditionModel
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(**DIFFUSERS_SVD_UNET_CONFIGS[size]).to(dtype).eval()
    return unet if device == "meta" else randomize_(unet, seed)


def build_diffusers_svd_vae(size: str = "tiny", dtype=torch.float32, device: str = "cpu", seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder
    with torch.device(device):
        vae = AutoencoderKLTemporalDecoder(**DIFFUSERS_SVD_VAE_CONFIGS[size]).to(dtype).eval()
    return vae if device == "meta" else randomize_(vae, seed)


def _save(state_dict: dict, path: Path, dtype) -> Path:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path))
    return path


def save_svd_checkpoint(path: Path, size: str = "tiny", dtype=torch.float16, seed: int = 0) -> Path:
    """An SVD img2vid checkpoint (UNet + temporal VAE) for ImageOnlyCheckpointLoader. It carries no CLIP
    vision weights: ComfyUI's ViT-H config is fixed at full size, so workflows take the fixture pack's
    tiny CLIP vision instead."""
    unet = build_svd(size, seed=seed).diffusion_model.state_dict()
    vae = build_svd_vae(seed + 1).first_stage_model.state_dict()
    state = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    return _save(state, Path(path), dtype)


def save_wan_diffusion_model(path: Path, size: str = "tiny", dtype=torch.float16, seed: int = 0,
                             variant: str = "2.1 t2v") -> Path:
    """A Wan diffusion model for UNETLoader (models/diffusion_models/)."""
    return _save(build_wan(size, seed=seed, variant=variant).diffusion_model.state_dict(), Path(path), dtype)


def save_wan_fp8_scaled(path: Path, seed: int = 0, variant: str = "2.1 t2v") -> Path:
    """A Wan diffusion model in ComfyUI's fp8_scaled layout (the official *_fp8_scaled.safetensors files):
    each block's linear weights in float8_e4m3fn with a per-layer `scale_weight`, the rest fp16, and the
    `scaled_fp8` marker the loader detects (0.33 converts it to its quantized layer classes)."""
    from safetensors.torch import save_file
    state = {}
    for key, value in build_wan("tiny", seed=seed, variant=variant).diffusion_model.state_dict().items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / 448.0  # e4m3's largest finite value
            state[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            state[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            state[key] = value.to(torch.float16)
    state["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)  # two elements: full-precision matmul
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def save_wan_vae(path: Path, size: str = "tiny", dtype=torch.float16, seed: int = 0) -> Path:
    """A Wan 2.1 VAE for VAELoader (models/vae/)."""
    return _save(build_wan_vae(size, seed).first_stage_model.state_dict(), Path(path), dtype)


def save_image_vae(path: Path, seed: int = 0) -> Path:
    return _save(build_image_vae(seed).first_stage_model.state_dict(), Path(path), torch.float16)


TINY_FILES = {
    "checkpoints/streamline_tiny_svd_img2vid.safetensors": save_svd_checkpoint,
    "diffusion_models/streamline_tiny_wan21_t2v.safetensors": save_wan_diffusion_model,
    "vae/streamline_tiny_wan21_vae.safetensors": save_wan_vae,
    "vae/streamline_taesd_image_vae.safetensors": save_image_vae,
}


def write_tiny_models(models_dir: Path) -> dict:
    """Writes the tiny fixtures under a ComfyUI models folder; existing files are kept."""
    written = {}
    for relative, save in TINY_FILES.items():
        target = Path(models_dir) / relative
        if not target.exists():
            save(target)
        written[relative] = target
    return written
