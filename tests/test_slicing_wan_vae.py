"""VAE Slicer on the Wan 2.1 / 2.2 VAE: strips along the longer spatial axis, exact against the
stock decode with its causal caches (ComfyUI 0.3.75: one latent frame at a time; 0.33: in pairs),
through the node class, ComfyUI's VAE.decode and the plain-torch API."""
import pytest
import torch

from devkit.model_fixtures import build_image_vae, build_wan22_vae, build_wan_vae
from streamline_helpers import TOLERANCE, node_output, relative_difference


@pytest.fixture(scope="module")
def wan_vae(pack):
    return build_wan_vae("tiny")


def latent(channels, frames, height, width, batch=1, seed=0):
    return torch.randn(batch, channels, frames, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("frames, height, width, batch, strips, offload", [
    (3, 6, 10, 1, 0, False), (3, 6, 10, 1, 3, False), (1, 5, 7, 1, 2, False), (4, 9, 5, 2, 4, True),
    (2, 4, 6, 1, 50, False), (5, 4, 6, 1, 2, False), (6, 4, 5, 1, 0, False)])
def test_wan_vae_slicer_decodes_the_stock_video(pack, wan_vae, frames, height, width, batch, strips, offload):
    from comfyui_streamline.nodes.slicing import VAESlicer

    z = latent(16, frames, height, width, batch)
    with torch.inference_mode():
        stock = wan_vae.decode(z)
        sliced = node_output(VAESlicer, wan_vae, 0, strips, True, offload).decode(z)
    assert stock.shape == (batch, 1 + 4 * (frames - 1), height * 8, width * 8, 3)
    assert sliced.shape == stock.shape
    assert relative_difference(sliced, stock) <= TOLERANCE
    assert wan_vae.patcher.object_patches == {}


def test_wan_vae_slicer_cuts_the_decode_into_strips_with_their_own_caches(pack, wan_vae, monkeypatch):
    """The decode really runs strip by strip: every causal convolution of the upsampling path sees
    strips narrower than the frame, never the whole width."""
    from comfyui_streamline.nodes.slicing import VAESlicer

    from comfyui_streamline.core.slicing import self_check

    monkeypatch.setattr(self_check.checker, "ENABLED", False)  # counts the sliced decode's own calls: no self-check probe
    head = wan_vae.first_stage_model.decoder.head[-1]
    calls = []
    forward = type(head).forward
    monkeypatch.setattr(type(head), "forward", lambda self, x, *a, **k: (
        calls.append(x.shape) if self is head else None, forward(self, x, *a, **k))[1])
    with torch.inference_mode():
        node_output(VAESlicer, wan_vae, 0, 4, True, False).decode(latent(16, 2, 4, 16))
    assert calls and max(shape[-1] for shape in calls) < 16 * 8
    assert len(calls) % 4 == 0  # every strip runs the same runs of frames
    assert sum(shape[2] for shape in calls) == 4 * 5  # each strip decodes all 5 frames once


@pytest.mark.parametrize("strips", [0, 2, 5])
def test_wan22_vae_sliced_through_the_plain_torch_api_equals_stock(pack, strips):
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing

    vae = build_wan22_vae("tiny")
    z = latent(48, 3, 6, 10, seed=1)
    with torch.inference_mode():
        stock = vae.decode(z)
        apply_slicing(vae, SliceSettings(strip_chunks=strips))
        sliced = vae.decode(z)
        remove_slicing(vae)
        again = vae.decode(z)
    assert stock.shape == (1, 3, 9, 96, 160) and sliced.shape == stock.shape
    assert relative_difference(sliced, stock) <= TOLERANCE
    assert torch.equal(again, stock)


def test_wan_vae_with_attention_in_the_upsampling_path_is_refused(pack):
    """Attention is not local in space: such a decoder cannot be cut into strips exactly."""
    import comfy.ldm.wan.vae
    from comfyui_streamline.core.slicing import SliceSettings, UnsupportedModelError, apply_slicing

    vae = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, attn_scales=[0.5])
    with pytest.raises(UnsupportedModelError, match="cannot be sliced exactly: AttentionBlock"):
        apply_slicing(vae, SliceSettings())
    assert "decode" not in vae.__dict__


def test_vae_slicer_rejects_an_image_vae(pack):
    from comfyui_streamline.nodes.slicing import VAESlicer

    with pytest.raises(ValueError, match="VAE Slicer: this VAE is TAESD, which Streamline cannot slice .it slices .*Wan 2.1 / 2.2 VAE.; it runs stock"):
        VAESlicer.execute(build_image_vae(), 0, 0, True, False)


def test_sliced_wan_vae_estimate_lets_comfyui_decode_the_batch_at_once(pack, wan_vae, monkeypatch):
    """ComfyUI splits a Wan decode into batches by its memory estimate: with room for the sliced
    decode of both samples but not for stock's, stock splits the batch and the sliced VAE does not;
    with offload_frames the estimate stops growing with the frame count."""
    import comfy.model_management
    from comfyui_streamline.core.slicing import self_check
    from comfyui_streamline.nodes.slicing import VAESlicer

    monkeypatch.setattr(self_check.checker, "ENABLED", False)  # counts the decode's own batches: no self-check probe
    z = latent(16, 3, 4, 6, batch=2)
    sliced = node_output(VAESlicer, wan_vae, 0, 4, True, False)
    stock_estimate = wan_vae.memory_used_decode(z.shape, wan_vae.vae_dtype)
    assert sliced.memory_used_decode(z.shape, wan_vae.vae_dtype) < stock_estimate / 2
    longer, much_longer = (2, 16, 30, 4, 6), (2, 16, 300, 4, 6)
    offloaded = node_output(VAESlicer, wan_vae, 0, 4, True, True)
    assert sliced.memory_used_decode(longer, wan_vae.vae_dtype) > sliced.memory_used_decode(z.shape, wan_vae.vae_dtype)
    assert offloaded.memory_used_decode(much_longer, wan_vae.vae_dtype) == offloaded.memory_used_decode(longer, wan_vae.vae_dtype)
    # offloaded, the estimate is a fixed share of the host's own (since ComfyUI 0.33 lower up to 4 latent frames)
    shares = [offloaded.memory_used_decode(shape, wan_vae.vae_dtype) / wan_vae.memory_used_decode(shape, wan_vae.vae_dtype)
              for shape in (z.shape, longer, much_longer)]
    assert shares == pytest.approx([shares[0]] * 3)

    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: stock_estimate * 1.5)
    batches = {}
    conv2 = wan_vae.first_stage_model.conv2  # the first op of both decodes, on the whole batch
    for name, vae in [("stock", wan_vae), ("sliced", sliced)]:
        sizes = batches[name] = []
        monkeypatch.setattr(conv2, "forward", lambda z, *a, forward=conv2.forward: (sizes.append(z.shape[0]), forward(z, *a))[1])
        vae.decode(z)
        monkeypatch.delattr(conv2, "forward")
    assert batches == {"stock": [1, 1], "sliced": [2]}
