"""Every Wan-derived model ComfyUI ships, through the pack's node classes on a real ModelPatcher: sliced
exactly with every block stack patched, or refused before any work with a sentence that names the
model and what to do; Step Rehash only where skipping blocks is sound; the whole-model self-check
catches a block that is exact alone but wrong in its caller."""
import dataclasses
import logging

import pytest
import torch

from devkit.comfy_env import comfyui_version
from devkit.model_fixtures import WAN_TEXT_DIM, WAN_VARIANTS, build_wan, host_has_wan_variant
from streamline_helpers import TOLERANCE, node_output, patcher, relative_difference

FRAMES, HEIGHT, WIDTH = 5, 6, 10


def vace_inputs(generator):
    return {"vace_context": torch.randn(1, 1, 96, FRAMES, HEIGHT, WIDTH, generator=generator), "vace_strength": [1.0]}


# variant -> its own inputs (None: none needed); every stack of these is sliced
SLICED = {"2.1 t2v": None, "2.1 vace": vace_inputs, "2.1 fun camera": None, "2.2 s2v": None, "2.2 animate": None,
          "2.1 scail": None, "2.2 wandancer": None}
# variant -> words the refusal must hold
REFUSED = {"2.1 humo": "Wan HuMo (HumoWanModel)", "animate 2": "Wan Animate 2 (WanAnimate2Model)",
           "2.1 causal forcing": "Wan Causal Forcing (CausalWanModel)"}
# variants whose root adds to the stream between blocks: Step Rehash refuses them
INJECTING = {"2.1 vace": "VACE adds its control hints", "2.2 s2v": "S2V injects audio",
             "2.2 animate": "face adapter", "2.2 wandancer": "injects music"}


def model_of(variant: str, layers: int = 4):
    if not host_has_wan_variant(variant):
        pytest.skip(f"ComfyUI {comfyui_version()} has no {WAN_VARIANTS[variant][0]} (tested on the host that has it)")
    return patcher(build_wan("tiny", variant=variant, layers=layers))


def forward(model, variant: str, seed: int = 0, loaded: bool = False, references=None, **options):
    """One forward of the diffusion model, loaded whole for it unless `loaded` (the caller loaded it);
    `references`: Bernini-R's context_latents."""
    generator = torch.Generator().manual_seed(seed)
    dm = model.model.diffusion_model
    x = torch.randn(1, dm.patch_embedding.in_channels, FRAMES, HEIGHT, WIDTH, generator=generator)
    context = torch.randn(1, 20, WAN_TEXT_DIM, generator=generator)
    extra = (SLICED.get(variant) or (lambda g: {}))(generator)
    if references is not None:
        extra["context_latents"] = references
    if not loaded:
        model.patch_model()
    try:
        with torch.inference_mode():
            return model.model.diffusion_model(x, torch.tensor([0.6]), context, **extra,
                                               transformer_options={**model.model_options.get("transformer_options", {}),
                                                                    "wrappers": model.wrappers, **options})
    finally:
        if not loaded:
            model.unpatch_model()


def sliced(model):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper
    return node_output(OperatorGrouper, node_output(FeatureSlicer, model, 7, 0))


def block_paths(model) -> set:
    dm = model.model.diffusion_model
    return {f"diffusion_model.{name}.forward" for name, m in dm.named_modules()
            if any(c.__name__ == "WanAttentionBlock" for c in type(m).__mro__)}


@pytest.mark.parametrize("variant", SLICED)
def test_every_block_stack_is_sliced_and_equals_stock(pack, variant):
    model = model_of(variant)
    ours = sliced(model)
    assert block_paths(model) <= set(ours.object_patches)
    assert "diffusion_model.forward" in ours.object_patches  # the whole model's self-check
    stock = forward(model, variant)
    assert relative_difference(forward(ours, variant), stock) <= TOLERANCE
    assert not model.object_patches  # the input model is untouched


def test_vace_blocks_are_sliced_with_the_control_stream(pack):
    model = model_of("2.1 vace")
    patches = sliced(model).object_patches
    assert {"diffusion_model.vace_blocks.0.forward", "diffusion_model.vace_blocks.1.forward"} <= set(patches)


@pytest.mark.parametrize("variant", REFUSED)
def test_models_it_cannot_slice_are_refused_with_the_model_named(pack, variant):
    from comfyui_streamline.nodes.slicing import FeatureSlicer
    model = model_of(variant)
    with pytest.raises(ValueError) as refusal:
        node_output(FeatureSlicer, model, 0, 0)
    message = str(refusal.value)
    assert message.startswith("Feature Slicer: ") and REFUSED[variant] in message
    assert "runs stock without this node" in message and len(message.split()) <= 45


def test_a_model_without_video_blocks_gets_a_short_refusal_naming_model_families_only(pack):
    from comfyui_streamline.nodes.slicing import FeatureSlicer
    model = patcher(build_wan("tiny"))
    model.model.diffusion_model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError) as refusal:
        node_output(FeatureSlicer, model, 0, 0)
    message = str(refusal.value)
    assert "this MODEL is Sequential" in message and "runs stock without this node" in message
    assert "VAE" not in message and len(message.split()) <= 45


def test_the_whole_model_check_catches_a_block_exact_alone_but_wrong_in_its_caller(pack, monkeypatch, caplog):
    """Today's VACE bug restored on purpose: the family table claims VaceWanModel drops every block's
    input, so block 0 writes into the x_orig VACE still reads. Each block alone is exact; the
    whole-model probe differs, every block falls back to stock, and the result is stock's."""
    from comfyui_streamline.core.slicing import registry, self_check

    wan = next(f for f in registry.FAMILIES if f.callers)
    callers = tuple(dataclasses.replace(c, keeps_inputs=()) if c.name == "VaceWanModel" else c for c in wan.callers)
    monkeypatch.setattr(registry, "FAMILIES", tuple(dataclasses.replace(f, callers=callers) if f is wan else f
                                                    for f in registry.FAMILIES))
    model = model_of("2.1 vace")
    stock = forward(model, "2.1 vace")
    monkeypatch.setattr(self_check.checker, "ENABLED", False)
    assert relative_difference(forward(sliced(model), "2.1 vace"), stock) > 1e-2  # the bug, unchecked
    monkeypatch.setattr(self_check.checker, "ENABLED", True)
    mark = self_check.mark()
    with caplog.at_level(logging.WARNING):
        assert relative_difference(forward(sliced(model), "2.1 vace"), stock) <= TOLERANCE
    fell_back = {r.path for r in self_check.fallbacks(mark)}
    assert {"diffusion_model", "diffusion_model.blocks.0", "diffusion_model.vace_blocks.0"} <= fell_back
    assert "VaceWanModel at diffusion_model (forward) does not match" in caplog.text


def rehash(model, interval):
    from comfyui_streamline.nodes.step_rehash import StepRehash
    return node_output(StepRehash, model, interval, 1, 0, 0)


@pytest.mark.parametrize("variant", INJECTING)
def test_step_rehash_refuses_models_that_inject_between_blocks(pack, variant):
    with pytest.raises(ValueError) as refusal:
        rehash(model_of(variant, layers=6), 2)
    assert INJECTING[variant] in str(refusal.value) and "Remove the node" in str(refusal.value)


@pytest.mark.parametrize("variant", REFUSED)
def test_step_rehash_refuses_what_the_table_refuses(pack, variant):
    with pytest.raises(ValueError, match=REFUSED[variant].replace("(", r"\(").replace(")", r"\)")):
        rehash(model_of(variant, layers=6), 2)


@pytest.mark.parametrize("variant", [v for v in SLICED if v not in INJECTING])
def test_step_rehash_reusing_an_unchanged_input_equals_stock(pack, variant):
    """A refresh call then a reusing call on the same input: the reused residual gives the stock
    output; at interval 1 every call is stock's."""
    from comfyui_streamline.glue.step_rehash import STATE_KEY
    model = model_of(variant, layers=6)
    stock = forward(model, variant)
    rehashed = rehash(model, 2)
    schedule = torch.tensor([1.0, 0.5, 0.0])  # interval 2: step 0 refreshes, step 1 reuses
    for sigma in schedule[:2]:
        out = forward(rehashed, variant, sample_sigmas=schedule, sigmas=sigma.reshape(1))
        assert relative_difference(out, stock) <= TOLERANCE
    assert rehashed.model_options["transformer_options"][STATE_KEY].state.reused_calls == 1
    assert torch.equal(forward(rehash(model, 1), variant, sample_sigmas=schedule, sigmas=schedule[1:2]), stock)


def test_the_memory_planner_refuses_vace_before_any_work(pack):
    from comfyui_streamline.nodes.planner import MemoryPlanner
    latent = {"samples": torch.zeros(1, 16, FRAMES, HEIGHT, WIDTH)}
    with pytest.raises(ValueError, match=r"^Memory Planner: Wan VACE \(VaceWanModel\) takes inputs of its own"):
        node_output(MemoryPlanner, model_of("2.1 vace"), latent, 8.0, True)


def test_dualparal_refuses_vace_and_bernini_references_before_any_process(pack):
    from comfyui_streamline.nodes.dualparal import DualParalSampler
    positive = [[torch.randn(1, 12, WAN_TEXT_DIM), {}]]
    inputs = dict(negative=positive, latent_image={"samples": torch.zeros(1, 16, 4, 4, 6)}, seed=0, steps=2, cfg=4.0,
                  sampler_name="euler", scheduler="simple", devices="cpu:1", frames_per_block=2, cache_frames=1,
                  denoise=1.0)
    with pytest.raises(ValueError, match=r"this MODEL is Wan VACE \(VaceWanModel\).*Use KSampler for it"):
        DualParalSampler.execute(model=model_of("2.1 vace", layers=2), positive=positive, **inputs)
    references = [[positive[0][0], {"context_latents": [torch.zeros(1, 16, 1, 4, 6)]}]]
    with pytest.raises(ValueError, match="Bernini-R's in-context references .context_latents.*use KSampler"):
        DualParalSampler.execute(model=model_of("2.1 t2v", layers=2), positive=references, **inputs)


def test_fp8_scaled_weights_are_sliced_exactly(pack, tmp_path):
    """The official *_fp8_scaled files, loaded as ComfyUI loads them (0.3.75: its scaled_fp8 layers;
    0.33: its quantized layer classes): sliced equals stock on the same weights."""
    import comfy.model_management
    import comfy.sd
    from devkit.model_fixtures import save_wan_fp8_scaled

    model = comfy.sd.load_diffusion_model(str(save_wan_fp8_scaled(tmp_path / "wan2.1_t2v_fp8_scaled.safetensors")))
    query = model.model.diffusion_model.blocks[0].self_attn.q
    assert torch.float8_e4m3fn in (query.weight.dtype, getattr(query.weight, "_qdata", query.weight).dtype)
    comfy.model_management.load_models_gpu([model])
    stock = forward(model, "2.1 t2v")
    comfy.model_management.load_models_gpu([sliced(model)])
    assert relative_difference(forward(sliced(model), "2.1 t2v"), stock) <= TOLERANCE


def test_offloaded_fp8_scaled_layers_fetch_their_weights_once_per_forward(pack, tmp_path):
    """Every layer offloaded (ComfyUI's low-VRAM load): the sliced blocks at 7 token chunks fetch (and
    dequantize) each quantized weight as often as stock, once per forward, for the stock output."""
    import comfy.sd
    from devkit.model_fixtures import counted_weight_fetches, save_wan_fp8_scaled

    model = comfy.sd.load_diffusion_model(str(save_wan_fp8_scaled(tmp_path / "wan2.1_t2v_fp8_scaled.safetensors")))

    def offloaded(model):
        model.patch_model(lowvram_model_memory=1)
        try:
            with counted_weight_fetches() as fetched:
                out = forward(model, "2.1 t2v", loaded=True)
        finally:
            model.unpatch_model()
        return out, {name: fetched.get(layer) for name, layer in model.model.diffusion_model.named_modules()
                     if name.startswith("blocks.") and layer in fetched}

    stock, stock_fetched = offloaded(model)
    assert any("self_attn.q" in name for name in stock_fetched)
    ours = sliced(model)
    offloaded(ours)  # the first sliced call also runs the self-check's probes
    out, fetched = offloaded(ours)
    assert relative_difference(out, stock) <= TOLERANCE
    assert fetched == stock_fetched


def test_bernini_r_references_are_sliced_exactly(pack):
    """Bernini-R's in-context references (context_latents) ride on a plain WanModel, appended to the
    tokens with a rotary position of their own (ComfyUI 0.33)."""
    import inspect
    model = model_of("2.1 t2v")
    if "context_latents" not in inspect.getsource(type(model.model.diffusion_model).forward_orig):
        pytest.skip(f"ComfyUI {comfyui_version()}'s WanModel takes no context_latents (tested on the host that does)")
    references = [torch.randn(1, 16, 1, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(4))]
    stock = forward(model, "2.1 t2v", references=references)
    assert relative_difference(stock, forward(model, "2.1 t2v")) > 1e-3  # the references count
    assert relative_difference(forward(sliced(model), "2.1 t2v", references=references), stock) <= TOLERANCE
