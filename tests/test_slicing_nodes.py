"""Feature Slicer, Operator Grouper and VAE Slicer, driven through their node classes and ComfyUI's
own sampling and decoding paths: sliced results equal the stock ones, the input is never changed."""
import pytest
import torch

from devkit.model_fixtures import SVD_CONTEXT_DIM, build_svd
from streamline_helpers import (SAMPLING_TOLERANCE, TOLERANCE, node_output, patcher, relative_difference, sample_svd,
                               svd_conditioning)


@pytest.mark.parametrize("frames, height, width, frame_chunks, strip_chunks", [
    (1, 4, 6, 1, 3),
    (14, 5, 7, 4, 3),
    (25, 3, 9, 6, 4),
])
def test_slicer_and_grouper_sample_the_stock_latent(pack, svd_model, frames, height, width,
                                                    frame_chunks, strip_chunks):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    stock = sample_svd(svd_model, frames, height, width)
    sliced = node_output(FeatureSlicer, svd_model, frame_chunks, strip_chunks)
    grouped = node_output(OperatorGrouper, sliced)
    for model in (sliced, grouped):
        assert relative_difference(sample_svd(model, frames, height, width), stock) <= SAMPLING_TOLERANCE


def test_sliced_sampling_is_as_close_to_float64_as_stock(pack, svd_model):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    truth = sample_svd(patcher(build_svd("micro", dtype=torch.float64)), frames=14).double()
    stock_error = relative_difference(sample_svd(svd_model, frames=14).double(), truth)
    grouped = node_output(OperatorGrouper, node_output(FeatureSlicer, svd_model, 4, 3))
    assert relative_difference(sample_svd(grouped, frames=14).double(), truth) <= 1.5 * stock_error + 1e-6


def test_grouper_then_slicer_equals_slicer_then_grouper(pack, svd_model):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    a = node_output(OperatorGrouper, node_output(FeatureSlicer, svd_model, 2, 5))
    b = node_output(FeatureSlicer, node_output(OperatorGrouper, svd_model), 2, 5)
    settings = [m.model_options["transformer_options"]["streamline_slicing"] for m in (a, b)]
    assert settings[0] == settings[1] and settings[0].group_ops
    assert relative_difference(sample_svd(b), sample_svd(a)) <= SAMPLING_TOLERANCE


def test_input_model_is_not_mutated_and_bypassing_restores_stock(pack, svd_model):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    before = sample_svd(svd_model)
    patched = node_output(OperatorGrouper, node_output(FeatureSlicer, svd_model, 3, 2))
    assert svd_model.object_patches == {} and "streamline_slicing" not in svd_model.model_options.get(
        "transformer_options", {})
    assert len(patched.object_patches) > 0
    sample_svd(patched)
    after = sample_svd(svd_model)
    assert torch.equal(after, before)
    unet = svd_model.get_model_object("diffusion_model")
    for block in unet.modules():
        if "forward" in block.__dict__:  # ComfyUI restores the bound stock method
            assert block.forward.__func__ is type(block).forward


def test_chunk_counts_larger_than_the_axes_are_clamped_with_a_warning(pack, svd_model, caplog):
    from comfyui_streamline.nodes.slicing import FeatureSlicer

    stock = sample_svd(svd_model, frames=3)
    sliced = node_output(FeatureSlicer, svd_model, 4096, 4095)
    assert relative_difference(sample_svd(sliced, frames=3), stock) <= SAMPLING_TOLERANCE
    assert "frame_chunks=4096 is more than" in caplog.text and "strip_chunks=4095 is more than" in caplog.text


def test_negative_chunk_counts_are_rejected_before_patching(pack, svd_model):
    from comfyui_streamline.nodes.slicing import FeatureSlicer

    with pytest.raises(ValueError, match="frame_chunks must be a whole number >= 0"):
        FeatureSlicer.execute(svd_model, -1, 0)


def test_a_model_without_video_blocks_gets_an_error_naming_the_supported_families(pack):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    image_model = torch.nn.Module()
    image_model.diffusion_model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8))
    model = patcher(image_model)
    for node in (FeatureSlicer, OperatorGrouper):
        args = (model, 0, 0) if node is FeatureSlicer else (model,)
        with pytest.raises(ValueError, match="this MODEL is Sequential, which Streamline cannot slice .it slices SVD.*Wan.*runs stock without this node"):
            node.execute(*args)
    assert model.object_patches == {}


@pytest.mark.parametrize("frames, height, width", [(1, 4, 6), (14, 3, 5), (25, 2, 3)])
def test_vae_slicer_decodes_the_stock_frames_with_full_temporal_context(pack, svd_vae, frames, height, width):
    from comfyui_streamline.nodes.slicing import VAESlicer

    latent = torch.randn(frames, 4, height, width, generator=torch.Generator().manual_seed(frames))
    with torch.inference_mode():
        stock = svd_vae.first_stage_model.decode(latent)  # every frame at once: full temporal context
        expected = svd_vae.process_output(stock).movedim(1, -1)  # (in place since ComfyUI 0.33: once)
        for settings in [(3, 5, True, False), (0, 0, False, False), (0, 0, True, True)]:
            sliced_vae = node_output(VAESlicer, svd_vae, *settings)
            decoded = sliced_vae.decode(latent)
            assert decoded.shape == (frames, height * 8, width * 8, 3)
            assert relative_difference(decoded, expected) <= TOLERANCE
    assert svd_vae.patcher.object_patches == {}


def test_sliced_model_samples_the_stock_latent_through_a_custom_guider(pack, svd_model):
    """The SamplerCustomAdvanced path: a CFGGuider with an explicit sampler and sigmas."""
    import comfy.sample
    import comfy.samplers
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    def sample_custom(model):
        latent = torch.zeros(6, 4, 5, 7)
        positive, negative = svd_conditioning(6, 5, 7)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(2.0)
        sigmas = torch.tensor([10.0, 2.0, 0.0])
        return guider.sample(comfy.sample.prepare_noise(latent, 5), latent, comfy.samplers.sampler_object("euler"),
                             sigmas, disable_pbar=True, seed=5)

    grouped = node_output(OperatorGrouper, node_output(FeatureSlicer, svd_model, 2, 2))
    assert relative_difference(sample_custom(grouped), sample_custom(svd_model)) <= SAMPLING_TOLERANCE


def unet_forward(model, frames=6, height=5, width=7, seed=2):
    """One UNet call of a loaded (patched) ModelPatcher, as ComfyUI's BaseModel makes it."""
    generator = torch.Generator().manual_seed(seed)
    batch = 2 * frames
    unet = model.model.diffusion_model
    return unet(torch.randn(batch, 8, height, width, generator=generator), torch.full((batch,), 0.7),
                context=torch.randn(batch, 1, SVD_CONTEXT_DIM, generator=generator),
                y=torch.randn(batch, 768, generator=generator), num_video_frames=frames,
                image_only_indicator=torch.zeros(2, frames))


def test_sliced_model_runs_exactly_under_lowvram_offloading_with_weight_patches(pack, svd_model):
    """--lowvram: every weight is cast per call and a LoRA-style diff on a temporal GroupNorm is
    applied through the module's weight_function, which the exact GroupNorm must honour."""
    import comfy.model_management
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    norm_key = "diffusion_model.input_blocks.1.0.time_stack.in_layers.0.weight"
    patched = svd_model.clone()
    delta = 0.5 * torch.randn(patched.get_model_object(norm_key).shape, generator=torch.Generator().manual_seed(4))
    patched.add_patches({norm_key: (delta,)}, 1.0)
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, patched, 3, 2))
    cpu = comfy.model_management.get_torch_device()
    outputs = {}
    for name, model in [("stock", svd_model), ("stock lowvram", patched), ("sliced lowvram", sliced)]:
        model.patch_model(device_to=cpu, lowvram_model_memory=1 if "lowvram" in name else 0)
        try:
            norm = model.get_model_object(norm_key.rsplit(".", 1)[0])
            if "lowvram" in name:
                assert norm.comfy_cast_weights and len(norm.weight_function) == 1
            with torch.inference_mode():
                outputs[name] = unet_forward(model)
        finally:
            model.unpatch_model(cpu)
    assert relative_difference(outputs["stock lowvram"], outputs["stock"]) > 1e-3  # the patch is applied
    assert relative_difference(outputs["sliced lowvram"], outputs["stock lowvram"]) <= TOLERANCE


def test_skip_fusion_runs_after_other_output_block_patches(pack, svd_model):
    """A FreeU-style output_block_patch still sees the real h and skip, and changes the result the
    same way with and without slicing."""
    from comfyui_streamline.nodes.slicing import OperatorGrouper

    def scale_skip(h, skip, transformer_options):
        assert h.shape[1] > 0 and skip.shape[1] > 0
        return h, skip * 0.5

    def with_patch(model):
        clone = model.clone()
        clone.set_model_output_block_patch(scale_skip)
        return clone
    stock = sample_svd(with_patch(svd_model))
    assert relative_difference(stock, sample_svd(svd_model)) > 1e-3
    assert relative_difference(sample_svd(with_patch(node_output(OperatorGrouper, svd_model))), stock) <= SAMPLING_TOLERANCE
    assert relative_difference(sample_svd(node_output(OperatorGrouper, with_patch(svd_model))), stock) <= SAMPLING_TOLERANCE


def test_sliced_vae_decodes_all_frames_in_one_batch_where_stock_splits_them(pack, svd_vae, monkeypatch):
    """ComfyUI sizes decode batches from free memory: with room for the sliced decode of all frames
    but not for stock's, stock cuts the temporal context and the VAE Slicer does not."""
    import comfy.model_management
    from comfyui_streamline.core.slicing.svd_vae import SLICED_DECODE_COST
    from comfyui_streamline.nodes.slicing import VAESlicer

    frames = 14
    latent = torch.randn(frames, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    stock_per_frame = svd_vae.memory_used_decode(latent.shape, svd_vae.vae_dtype)
    fixed, per_frame = SLICED_DECODE_COST[False]
    free = stock_per_frame * (fixed + per_frame * frames) * 1.01
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: free)
    batches = {}
    for name, vae in [("stock", svd_vae), ("sliced", node_output(VAESlicer, svd_vae, 0, 0, True, False))]:
        sizes = batches[name] = []
        decode = vae.first_stage_model.decode
        monkeypatch.setattr(vae.first_stage_model, "decode", lambda z, **kw: (sizes.append(z.shape[0]), decode(z, **kw))[1])
        vae.decode(latent)
        monkeypatch.delattr(vae.first_stage_model, "decode")
    assert batches["sliced"] == [frames]
    assert len(batches["stock"]) > 1
