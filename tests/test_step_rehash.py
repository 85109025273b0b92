"""Step Rehash on ComfyUI's SVD video UNet, driven through its node class and ComfyUI's own sampling:
refreshing every step is stock, reusing steps skip the deep blocks, it composes with the Feature
Slicer in either order, the input model is never changed, and what it cannot run is refused."""
import logging
import re

import pytest
import torch

from devkit.model_fixtures import build_wan
from streamline_helpers import SAMPLING_TOLERANCE, node_output, patcher, relative_difference, sample_svd


def rehash(model, interval=3, shallow_blocks=1, full_first_steps=1, full_last_steps=1):
    from comfyui_streamline.nodes.step_rehash import StepRehash
    return node_output(StepRehash, model, interval, shallow_blocks, full_first_steps, full_last_steps)


def deep_layer_calls(model, steps: int) -> int:
    """Computations of the micro UNet's middle block during one sampling (its first ResBlock's input
    layers: a skipped block returns before them)."""
    unet = model.model.diffusion_model
    calls = []
    handle = unet.middle_block[0].in_layers.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        sample_svd(model, steps=steps)
    finally:
        handle.remove()
    return len(calls)


def test_refreshing_every_step_samples_the_stock_latent(svd_model):
    assert torch.equal(sample_svd(rehash(svd_model, interval=1), steps=4), sample_svd(svd_model, steps=4))


def test_steps_between_refreshes_reuse_the_deep_features(svd_model, caplog):
    """6 steps, first and last full, interval 2: steps 0, 1, 3, 5 full, 2 and 4 reuse (CFG: the cond
    and uncond batch is one call per step here)."""
    stock_calls = deep_layer_calls(svd_model, 6)
    rehashed = rehash(svd_model, interval=2)
    with caplog.at_level(logging.INFO):
        assert deep_layer_calls(rehashed, 6) == stock_calls * 4 // 6
    assert "Step Rehash: 2 of 6 model calls reused the deep features" in caplog.text
    ours, stock = sample_svd(rehashed, steps=6), sample_svd(svd_model, steps=6)
    assert torch.isfinite(ours).all() and relative_difference(ours, stock) > 1e-6


def test_the_shallow_blocks_run_on_reusing_steps(svd_model):
    """The reused result depends on the shallow path: a different input block count changes it."""
    one, two = (sample_svd(rehash(svd_model, shallow_blocks=blocks), steps=5) for blocks in (1, 2))
    assert relative_difference(one, two) > 1e-6


@pytest.mark.parametrize("order", ["slicer first", "rehash first"])
def test_it_composes_with_the_feature_slicer_and_operator_grouper(svd_model, order):
    """Slicing is exact, so sliced + rehashed equals rehashed; the deep layers the slicer patched
    are still skipped on reusing steps."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    def slice_(model):
        return node_output(OperatorGrouper, node_output(FeatureSlicer, model, 2, 3))
    both = rehash(slice_(svd_model)) if order == "slicer first" else slice_(rehash(svd_model))
    assert relative_difference(sample_svd(both, steps=5), sample_svd(rehash(svd_model), steps=5)) <= SAMPLING_TOLERANCE
    assert deep_layer_calls(both, 5) < deep_layer_calls(slice_(svd_model), 5)


def test_the_input_model_is_untouched_and_bypassing_gives_stock(svd_model):
    before = sample_svd(svd_model, steps=4)
    rehashed = rehash(svd_model)
    sample_svd(rehashed, steps=4)
    assert svd_model.object_patches == {}
    assert "streamline_step_rehash" not in svd_model.model_options.get("transformer_options", {})
    assert not svd_model.wrappers.get("diffusion_model")
    assert torch.equal(sample_svd(svd_model, steps=4), before)


def test_models_and_settings_it_cannot_run_are_refused(svd_model):
    import comfy.model_patcher

    other = torch.nn.Module()
    other.diffusion_model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Step Rehash runs on ComfyUI's SVD-family video UNet and Wan 2.1 / 2.2 DiT; this "
                                         "model is Linear: remove the node for it"):
        rehash(comfy.model_patcher.ModelPatcher(other, torch.device("cpu"), torch.device("cpu")))
    with pytest.raises(ValueError, match="shallow_blocks is 4; this UNet has 4 input blocks: set it between 1 and 3"):
        rehash(svd_model, shallow_blocks=4)
    with pytest.raises(ValueError, match="shallow_blocks is 2; this DiT has 4 blocks.*between 1 and 1"):
        rehash(patcher(build_wan("tiny", layers=4)), shallow_blocks=2)
    with pytest.raises(ValueError, match="interval is 0; give at least 1"):
        rehash(svd_model, interval=0)


@pytest.fixture(scope="module")
def wan4(pack):
    return patcher(build_wan("tiny", layers=4))


def wan_sample(model, steps=5, frames=5):
    import nodes
    from devkit.model_fixtures import WAN_TEXT_DIM
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 12, WAN_TEXT_DIM, generator=generator), {}]]
    negative = [[torch.randn(1, 8, WAN_TEXT_DIM, generator=generator), {}]]
    latent = {"samples": torch.zeros(1, 16, frames, 4, 6)}
    return nodes.common_ksampler(model, 5, steps, 4.0, "uni_pc", "simple", positive, negative, latent)[0]["samples"]


def block_calls(model, index: int, steps: int) -> int:
    calls = []
    handle = model.model.diffusion_model.blocks[index].self_attn.register_forward_pre_hook(
        lambda module, args: calls.append(1))
    try:
        wan_sample(model, steps)
    finally:
        handle.remove()
    return len(calls)


def test_wan_dit_blocks_between_the_shallow_ones_are_reused(wan4):
    """Four blocks, shallow 1: blocks 1 and 2 run on refresh steps only, their residual is added back
    on the others; interval 1 is stock; sliced blocks compose."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer

    assert torch.equal(wan_sample(rehash(wan4, interval=1)), wan_sample(wan4))
    rehashed = rehash(wan4, interval=2)
    calls = [block_calls(rehashed, i, 6) for i in range(4)]  # cond and uncond: two calls a step here
    assert calls == [calls[0], calls[0] * 4 // 6, calls[0] * 4 // 6, calls[0]] and calls[0] in (6, 12)
    ours = wan_sample(rehashed)
    assert torch.isfinite(ours).all() and relative_difference(ours, wan_sample(wan4)) > 1e-6
    sliced = rehash(node_output(FeatureSlicer, wan4, 0, 3), interval=2)
    assert relative_difference(wan_sample(sliced), ours) <= SAMPLING_TOLERANCE


def _saved_latent(result, comfy_server) -> torch.Tensor:
    import safetensors.torch
    node = result.outputs["10"]["latents"][0]
    return safetensors.torch.load_file(comfy_server.output_dir / node["subfolder"] / node["filename"])["latent_tensor"]


def test_the_svd_example_runs_through_the_api_and_bypassing_the_node_gives_stock(comfy_server):
    """The shipped SVD-XT Step Rehash example on the fixtures (5 steps, interval 2: steps 2 reuses):
    it reuses and changes the latent a little; at interval 1 it equals the graph without the node."""
    from conftest import load_workflow
    from devkit.workflows import bypass

    prompt = load_workflow("svd_xt_img2vid_step_rehash")
    runs = {}
    for label, graph in (("rehash", prompt), ("stock", bypass(prompt, ["StreamlineStepRehash"]))):
        result = comfy_server.run(graph)
        assert result.status == "success", result.error
        runs[label] = _saved_latent(result, comfy_server)
    # one reusing step; the Feature Slicer's self-check probes are model calls too (on refresh steps)
    assert re.search(r"Step Rehash: 1 of \d+ model calls reused the deep features", comfy_server.log())
    assert relative_difference(runs["rehash"], runs["stock"]) > 1e-6
    prompt["15"]["inputs"]["interval"] = 1
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    assert relative_difference(_saved_latent(result, comfy_server), runs["stock"]) <= SAMPLING_TOLERANCE
