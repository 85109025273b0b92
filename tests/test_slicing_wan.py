"""Feature Slicer and Operator Grouper on ComfyUI's Wan DiT: token chunks, exact against stock,
through the node classes and ComfyUI's sampling."""
import inspect

import pytest
import torch

from devkit.model_fixtures import WAN_TEXT_DIM, build_wan
from streamline_helpers import (SAMPLING_TOLERANCE, TOLERANCE, node_output, patcher, relative_difference, sample_wan,
                               wan_forward)


@pytest.mark.parametrize("frames, height, width, frame_chunks, group", [
    (1, 4, 6, 0, False), (1, 4, 6, 5, True), (5, 6, 10, 7, True), (7, 5, 9, 4, False), (7, 5, 9, 0, True)])
def test_sliced_wan_forward_equals_stock(pack, wan_model, frames, height, width, frame_chunks, group):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    sliced = node_output(FeatureSlicer, wan_model, frame_chunks, 0)
    if group:
        sliced = node_output(OperatorGrouper, sliced)
    blocks = len(sliced.get_model_object("diffusion_model").blocks)
    assert set(sliced.object_patches) == {"diffusion_model.forward",  # the whole model's self-check
                                          *(f"diffusion_model.blocks.{i}.forward" for i in range(blocks))}
    stock = wan_forward(wan_model, frames, height, width)
    assert relative_difference(wan_forward(sliced, frames, height, width), stock) <= TOLERANCE


@pytest.mark.parametrize("timesteps", ["per frame", "per token"])
def test_sliced_wan_forward_with_expanded_modulation_equals_stock(pack, wan_model, timesteps):
    """Wan 2.2 TI2V-5B gives every latent frame (or token) its own timestep; the block's modulation
    is then expanded over the tokens and must be cut per chunk the same way."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    frames, height, width = 5, 6, 10
    rows = frames if timesteps == "per frame" else frames * (height // 2) * (width // 2)
    timestep = torch.rand(1, rows, generator=torch.Generator().manual_seed(2))
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, wan_model, 7, 0))
    stock = wan_forward(wan_model, frames, height, width, timestep=timestep)
    assert relative_difference(wan_forward(sliced, frames, height, width, timestep=timestep), stock) <= TOLERANCE


def test_sliced_wan_keeps_the_block_input_for_a_block_replace_patch(pack, wan_model):
    """The sliced block writes its output over its input only where nothing can read the input
    again: a block-replace patch that mixes the block's input into its output still sees the input."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    def mix_input_back(args, extra):
        return {"img": 0.5 * (extra["original_block"](args)["img"] + args["img"])}

    patched = wan_model.clone()
    patched.set_model_patch_replace(mix_input_back, "dit", "double_block", 1)
    stock = wan_forward(patched, 5, 6, 10)
    assert relative_difference(stock, wan_forward(wan_model, 5, 6, 10)) > 1e-3
    for sliced in (node_output(OperatorGrouper, node_output(FeatureSlicer, patched, 7, 0)),
                   node_output(FeatureSlicer, patched, 7, 0)):
        assert relative_difference(wan_forward(sliced, 5, 6, 10), stock) <= TOLERANCE


def test_sliced_wan_calls_the_attention_hooks_where_the_host_block_does(pack, wan_model):
    """ComfyUI 0.33's Wan block calls `attn1_patch` (self-attention output before its projection, with
    the roped queries and keys) and `attn2_patch` (the stream after cross-attention) on whole tensors;
    0.3.75's calls neither. The sliced block gives the stock result with both hooks set, on either host."""
    from comfyui_streamline.core.slicing.wan import host_hooks
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    def attn1(args):  # reads every token's query and key, so a chunk-local patch would differ
        return 0.7 * args["x"] + 0.2 * args["q"].flatten(2) + 0.1 * args["k"].flatten(2).mean(1, keepdim=True)

    def attn2(args):
        return 0.8 * args["x"] + 0.2 * args["x"].mean(1, keepdim=True)

    patched = wan_model.clone()
    patched.set_model_attn1_patch(attn1)
    patched.set_model_attn2_patch(attn2)
    stock = wan_forward(patched, 5, 6, 10)
    honoured = host_hooks(wan_model.model.diffusion_model.blocks[0])
    assert honoured is not None
    if any(honoured.values()):
        assert relative_difference(stock, wan_forward(wan_model, 5, 6, 10)) > 1e-3
    for sliced in (node_output(OperatorGrouper, node_output(FeatureSlicer, patched, 7, 0)),
                   node_output(FeatureSlicer, patched, 4, 0)):
        assert relative_difference(wan_forward(sliced, 5, 6, 10), stock) <= TOLERANCE


def test_sliced_wan_samples_the_stock_latent(pack, wan_model):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    stock = sample_wan(wan_model)
    grouped = node_output(OperatorGrouper, node_output(FeatureSlicer, wan_model, 3, 0))
    assert relative_difference(sample_wan(grouped), stock) <= SAMPLING_TOLERANCE
    assert wan_model.object_patches == {}


def test_sliced_wan_composes_with_stock_context_windows(pack, wan_model):
    """ComfyUI's WAN Context Windows node in front of or behind the slicing nodes: each window runs
    the sliced blocks, and the result equals stock context-window sampling."""
    from comfy_extras.nodes_context_windows import WanContextWindowsManualNode
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    def windows(model):  # 9 pixel frames = 3 latent frames per window, 1 latent frame of overlap
        options = {}
        if "freenoise" in inspect.signature(WanContextWindowsManualNode.execute).parameters:
            options["freenoise"] = False  # ComfyUI 0.33's required input; 0.3.75 has no noise shuffling
        return WanContextWindowsManualNode.execute(model, 9, 4, "standard_static", 1, False, "pyramid",
                                                   **options).result[0]

    def sliced(model):
        return node_output(OperatorGrouper, node_output(FeatureSlicer, model, 2, 0))
    frames = 7
    stock = sample_wan(windows(wan_model), frames)
    assert relative_difference(stock, sample_wan(wan_model, frames)) > 1e-3  # the windows change the result
    for model in (sliced(windows(wan_model)), windows(sliced(wan_model))):
        assert relative_difference(sample_wan(model, frames), stock) <= SAMPLING_TOLERANCE


def test_sliced_wan21_i2v_forward_equals_stock(pack):
    """Image-to-video: the cross-attention also attends to CLIP image tokens (context_img_len)."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    model = patcher(build_wan("tiny", variant="2.1 i2v"))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 36, 4, 6, 10, generator=generator)
    context = torch.randn(1, 20, WAN_TEXT_DIM, generator=generator)
    clip = torch.randn(1, 257, 1280, generator=generator)

    def forward(m):
        m.patch_model()
        try:
            with torch.inference_mode():
                return m.model.diffusion_model(x, torch.tensor([0.3]), context, clip_fea=clip)
        finally:
            m.unpatch_model()
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, model, 5, 0))
    assert relative_difference(forward(sliced), forward(model)) <= TOLERANCE


def test_sliced_wan22_ti2v_samples_the_stock_latent_with_a_kept_first_frame(pack):
    """Wan 2.2 TI2V-5B: a noise mask that keeps the first latent frame gives every frame its own
    timestep (WAN22.process_timestep), so each block gets per-frame modulation."""
    import comfy.sample
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    model = patcher(build_wan("tiny", variant="2.2 ti2v 5B"))

    def sample_with_mask(m):
        latent = torch.randn(1, 48, 4, 6, 8, generator=torch.Generator().manual_seed(5))
        mask = torch.ones(1, 1, 4, 6, 8)
        mask[:, :, 0] = 0.0
        generator = torch.Generator().manual_seed(6)
        positive = [[torch.randn(1, 12, WAN_TEXT_DIM, generator=generator), {}]]
        negative = [[torch.zeros(1, 12, WAN_TEXT_DIM), {}]]
        return comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 7), 3, 4.0, "euler", "simple", positive,
                                   negative, latent, noise_mask=mask, seed=7, disable_pbar=True)
    stock = sample_with_mask(model)
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, model, 3, 0))
    assert relative_difference(sample_with_mask(sliced), stock) <= SAMPLING_TOLERANCE


def test_sliced_wan_adds_no_flops_text_keys_and_values_are_projected_once_per_block(pack, wan_model):
    """With 7 token chunks the host's cross-attention runs once per chunk, but the text tokens' keys and
    values are projected once per block: the sliced forward counts the stock forward's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, wan_model, 7, 0))
    flops = {}
    for label, model in (("stock", wan_model), ("sliced", sliced)):
        wan_forward(model, 5, 6, 10)  # the first sliced call also runs the self-check's stock probe
        with FlopCounterMode(display=False) as counter:
            wan_forward(model, 5, 6, 10)
        flops[label] = counter.get_total_flops()
    assert flops["sliced"] == flops["stock"], flops
