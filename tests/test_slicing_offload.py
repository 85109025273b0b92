"""offload_frames: the grouped video decoders keep their frames in host memory. Under fake tensors
on a stand-in accelerator (the meta device: no GPU, and no CUDA driver, which torch 2.9's CUDA build
needs even to index a fake "cuda" tensor) the accelerator-side peak grows only by the temporal
strips (all frames of a few columns) instead of by whole frames. At full size the peak is one
frame's work: bench/slicing_peaks.py measures 0.70 GiB at both 14 and 25 frames on fake "cuda"."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from devkit import model_fixtures


ACCELERATOR = "meta"


def gpu_decode_peak(build_meta_model, decode, frames, settings):
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker
    from comfyui_streamline.core.slicing import apply_slicing

    meta_model = build_meta_model()
    with FakeTensorMode():
        model = model_fixtures.materialize_fake(meta_model, ACCELERATOR)
        apply_slicing(model, settings)
        with torch.inference_mode(), LiveStorageTracker(ACCELERATOR) as tracker:
            out = decode(model, torch.empty(frames, 4, 16, 24, dtype=torch.float16, device=ACCELERATOR), frames)
    assert out.device.type == ACCELERATOR and out.shape[0] == frames
    return tracker.peak


def test_offloaded_frames_keep_the_gpu_peak_flat_in_the_frame_count(pack):
    from comfyui_streamline.core.slicing import SliceSettings

    decoders = {
        "ComfyUI": (lambda: model_fixtures.build_svd_vae().first_stage_model.to("meta", torch.float16),
                    lambda model, z, frames: model.decode(z)),
        "diffusers": (lambda: model_fixtures.build_diffusers_svd_vae("full", torch.float16, "meta"),
                      lambda model, z, frames: model.decode(z, num_frames=frames).sample),
    }
    for name, (build_meta_model, decode) in decoders.items():
        peaks = {(frames, offload): gpu_decode_peak(build_meta_model, decode, frames,
                                                    SliceSettings(group_ops=True, offload_frames=offload))
                 for frames in (4, 16) for offload in (False, True)}
        in_vram_growth = peaks[16, False] - peaks[4, False]
        offloaded_growth = peaks[16, True] - peaks[4, True]
        assert peaks[16, False] > 2 * peaks[4, False], name  # in VRAM: grows with whole frames
        assert offloaded_growth < in_vram_growth / 3, name
        assert peaks[16, True] < peaks[16, False] / 2, name


def wan_inputs(frames=5, height=6, width=10):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, frames, height, width, generator=generator)
    context = torch.randn(1, 20, model_fixtures.WAN_TEXT_DIM, generator=generator)
    return lambda unet, options: unet(x, torch.tensor([0.6]), context, transformer_options=options)


def svd_inputs(frames=5, height=8, width=12):
    generator = torch.Generator().manual_seed(0)
    unet = model_fixtures.build_svd("micro").diffusion_model
    context_width = next(m.attn2.to_k.in_features for m in unet.modules() if hasattr(m, "attn2"))
    x = torch.randn(frames, unet.in_channels, height, width, generator=generator)
    context = torch.randn(frames, 1, context_width, generator=generator)
    y = torch.randn(frames, unet.label_emb[0][0].in_features, generator=generator)
    return lambda unet, options: unet(x, torch.full((frames,), 0.6), context=context, y=y, num_video_frames=frames,
                                      image_only_indicator=torch.zeros(1, frames), transformer_options=options)


def offloaded_forward(model, call):
    """One forward (`call`) of the model loaded the way ComfyUI loads a model too big for its card:
    every layer offloaded (low-VRAM mode), weight patches applied on the fly at each call. Returns
    the output and the weight bytes each layer fetched."""
    model.patch_model(lowvram_model_memory=1)
    try:
        with torch.inference_mode(), model_fixtures.counted_weight_fetches() as fetched:
            out = call(model.model.diffusion_model, model.model_options.get("transformer_options", {}))
    finally:
        model.unpatch_model()
    return out, fetched


@pytest.mark.parametrize("family, patched_weights, chunks", [
    ("wan", ("blocks.0.ffn.0.weight", "blocks.1.cross_attn.q.weight"), (7, 0)),
    ("svd", ("input_blocks.1.0.in_layers.2.weight", "output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"), (0, 3)),
])
def test_offloaded_layers_fetch_their_weights_once_per_forward_however_fine_the_slicing(
        pack, family, patched_weights, chunks):
    """Under ComfyUI's partial loading each offloaded layer copies (and patches) its weight at every
    call. The sliced blocks, calling their layers once per chunk, fetch each weight once (per stage)
    through the host's own cast: the same bytes as stock, with weight patches (as a LoRA applies
    under low VRAM), and the stock output."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper
    from streamline_helpers import TOLERANCE, node_output, patcher, relative_difference

    model = patcher(model_fixtures.build_wan("tiny") if family == "wan" else model_fixtures.build_svd("micro"))
    call = wan_inputs() if family == "wan" else svd_inputs()
    plain, _ = offloaded_forward(model, call)
    delta = {}
    for name in patched_weights:
        weight = model.model.diffusion_model.get_parameter(name)
        delta[f"diffusion_model.{name}"] = (0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)),)
    assert len(model.add_patches(delta, 1.0)) == len(delta)
    stock, stock_fetched = offloaded_forward(model, call)
    assert relative_difference(stock, plain) > 1e-3  # the patches count
    assert len(stock_fetched) > 10

    for grouped in (False, True):
        sliced = node_output(FeatureSlicer, model, *chunks)
        if grouped:
            sliced = node_output(OperatorGrouper, sliced)
        offloaded_forward(sliced, call)  # the first sliced call also runs the self-check's stock probe
        out, fetched = offloaded_forward(sliced, call)
        assert relative_difference(out, stock) <= TOLERANCE
        assert fetched == stock_fetched, grouped


def test_offloaded_vae_decoder_layers_fetch_their_weights_once_per_decode(pack):
    """SVD's temporal VAE decoder with every layer casting at each call (as offloaded) and a weight
    patch on a convolution: the grouped VAE Slicer decodes the stock frames and fetches each layer's
    weight as often as the stock decode does."""
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing
    from streamline_helpers import TOLERANCE, relative_difference

    vae = model_fixtures.build_svd_vae().first_stage_model
    model_fixtures.offload_every_layer(vae)
    vae.decoder.up[1].block[0].conv1.weight_function = [lambda weight: weight * 1.5]
    z = torch.randn(5, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with model_fixtures.counted_weight_fetches() as stock_fetched:
            stock = vae.decode(z)
        apply_slicing(vae, SliceSettings(frame_chunks=2, strip_chunks=3, group_ops=True))
        try:
            vae.decode(z)  # the first sliced call also runs the self-check's stock probe
            with model_fixtures.counted_weight_fetches() as fetched:
                decoded = vae.decode(z)
        finally:
            remove_slicing(vae)
    assert relative_difference(decoded, stock) <= TOLERANCE
    assert {layer for layer in stock_fetched if stock_fetched[layer] != fetched.get(layer)} == set()
