"""The model fixtures are ComfyUI's own classes and load through ComfyUI's stock detection."""
import torch

from devkit import model_fixtures


def test_tiny_files_load_through_comfyui_detection(tmp_path):
    import comfy.model_base
    import comfy.sd
    import comfy.utils

    files = model_fixtures.write_tiny_models(tmp_path)
    model, clip, vae, clip_vision = comfy.sd.load_checkpoint_guess_config(
        str(files["checkpoints/streamline_tiny_svd_img2vid.safetensors"]), output_clipvision=True)
    assert isinstance(model.model, comfy.model_base.SVD_img2vid)
    assert type(vae.first_stage_model.decoder).__name__ == "VideoDecoder"
    wan = comfy.sd.load_diffusion_model(str(files["diffusion_models/streamline_tiny_wan21_t2v.safetensors"]))
    assert isinstance(wan.model, comfy.model_base.WAN21)
    wan_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae/streamline_tiny_wan21_vae.safetensors"])))
    assert type(wan_vae.first_stage_model).__name__ == "WanVAE"


def _parameters(model) -> float:
    return sum(p.numel() for p in model.diffusion_model.parameters()) / 1e9


def test_full_size_configs_build_on_meta_with_published_sizes():
    svd = model_fixtures.build_svd("full", dtype=torch.float16, device="meta")
    assert abs(_parameters(svd) - 1.52) < 0.01
    assert next(svd.parameters()).is_meta
    assert 1.3 < _parameters(model_fixtures.build_wan("1.3B", torch.bfloat16, "meta")) < 1.5
    assert 14.0 < _parameters(model_fixtures.build_wan("14B", torch.bfloat16, "meta")) < 14.5


def test_random_weights_are_seeded():
    a = model_fixtures.build_wan("tiny", seed=3).diffusion_model.state_dict()
    b = model_fixtures.build_wan("tiny", seed=3).diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
