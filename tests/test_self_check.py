"""Patches that check themselves (issue 17): the first time a patched block runs, its sliced forward
is compared with the host's stock forward on a small probe of the real call; a mismatch makes that
block run stock, with a warning naming the block and the ComfyUI version in the log, on the node
that made the patch and in the Memory Monitor's report. Correct replacements pass with no warning
and unchanged output."""
import json
import logging
import struct
import sys
import types
import uuid

import pytest
import torch

from conftest import load_workflow
from devkit.comfy_env import comfyui_version
from devkit.model_fixtures import (SVD_CONTEXT_DIM, build_diffusers_svd_unet, build_diffusers_svd_vae, build_svd,
                                   build_svd_vae, build_wan, build_wan22_vae, build_wan_vae)
from streamline_helpers import (SAMPLING_TOLERANCE, TOLERANCE, node_output, patcher, relative_difference, sample_svd,
                               wan_forward)

ERROR = 1e-3  # a broken replacement's error, relative to its output's scale (fp32 tolerance: 1e-5)


@pytest.fixture(scope="module")
def self_check(pack):
    import comfyui_version  # noqa: F401  (loaded in a running ComfyUI; the warnings name its version)
    from comfyui_streamline.core.slicing import self_check
    return self_check


@pytest.fixture(scope="module")
def wan_model(pack):
    return patcher(build_wan("tiny"))


@pytest.fixture(scope="module")
def svd_model(pack):
    return patcher(build_svd("micro"))


def break_replacements(monkeypatch, self_check, broken):
    """Every replacement made from now on whose patch path (from the patched model) satisfies
    `broken` adds a small error to its output: a broken sliced forward."""
    checked = self_check.checked

    def with_error(replacement):
        def forward(*args, **kwargs):
            out = replacement(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                return out
            pattern = torch.sin(torch.arange(out.numel(), device=out.device, dtype=out.dtype)).view(out.shape)
            return out + ERROR * out.abs().max() * pattern  # not an offset or a scale, which a norm would undo
        forward.__qualname__ = replacement.__qualname__  # made by the same maker, as far as the table goes
        return forward

    def breaking(make, base):
        return lambda module, settings: {key: with_error(value) if broken(base + key) else value
                                         for key, value in make(module, settings).items()}

    monkeypatch.setattr(self_check, "checked", lambda module, make, settings, base, probes:
                        checked(module, breaking(make, base), settings, base, probes))


def fail_first_call(monkeypatch, self_check, path, error):
    """The replacements made for `path` raise `error()` on the first call of any of them (the probe's),
    then work."""
    checked, calls = self_check.checked, []

    def failing_once(replacement):
        def forward(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise error()
            return replacement(*args, **kwargs)
        forward.__qualname__ = replacement.__qualname__
        return forward

    def making(make, base):
        return lambda module, settings: {key: failing_once(value) if base + key == path else value
                                         for key, value in make(module, settings).items()}

    monkeypatch.setattr(self_check, "checked", lambda module, make, settings, base, probes:
                        checked(module, making(make, base), settings, base, probes))


def outcomes(self_check, since) -> dict:
    return {r.path: r.outcome for r in self_check.results(since)}


def assert_warned(caplog, where):
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and where in r.getMessage()]
    assert warnings, f"no warning names {where}:\n{caplog.text}"
    assert f"ComfyUI {comfyui_version()}" in warnings[0] and "runs stock" in warnings[0]


def assert_no_self_check_warning(caplog):
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "self-check" in r.getMessage()]


def test_a_broken_wan_block_runs_stock_and_the_log_names_it(self_check, wan_model, monkeypatch, caplog):
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    stock = wan_forward(wan_model, 5, 6, 10)
    break_replacements(monkeypatch, self_check, lambda path: path == "diffusion_model.blocks.1.forward")
    with monkeypatch.context() as unchecked:  # the break is real: unchecked, the output is wrong
        unchecked.setattr(self_check.checker, "ENABLED", False)
        assert relative_difference(wan_forward(node_output(FeatureSlicer, wan_model, 3, 0), 5, 6, 10), stock) > 1e-4
    since = self_check.mark()
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, wan_model, 3, 0))
    with caplog.at_level(logging.WARNING):
        first = wan_forward(sliced, 5, 6, 10)
    again = wan_forward(sliced, 5, 6, 10)
    assert relative_difference(first, stock) <= TOLERANCE and relative_difference(again, stock) <= TOLERANCE
    assert outcomes(self_check, since) == {"diffusion_model": self_check.PASSED,  # the whole model
                                           "diffusion_model.blocks.0": self_check.PASSED,
                                           "diffusion_model.blocks.1": self_check.FELL_BACK}
    assert_warned(caplog, "WanAttentionBlock at diffusion_model.blocks.1 (forward)")
    assert len(self_check.results(since)) == 3  # checked once (each block, the whole model), on the first call only


def test_out_of_memory_during_a_probe_leaves_the_block_sliced_and_unchecked(self_check, wan_model, monkeypatch,
                                                                            caplog):
    """Running out of memory says nothing of the replacement (and stock would not fit): no fallback."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer

    stock = wan_forward(wan_model, 5, 6, 10)
    fail_first_call(monkeypatch, self_check, "diffusion_model.blocks.1.forward",
                    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    since = self_check.mark()
    with caplog.at_level(logging.WARNING):
        out = wan_forward(node_output(FeatureSlicer, wan_model, 3, 0), 5, 6, 10)
    assert relative_difference(out, stock) <= TOLERANCE
    assert outcomes(self_check, since) == {"diffusion_model": self_check.PASSED,  # the whole model
                                           "diffusion_model.blocks.0": self_check.PASSED,
                                           "diffusion_model.blocks.1": self_check.NOT_CHECKED}
    assert any("blocks.1" in r.getMessage() and "out of memory" in r.getMessage() and "unchecked" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_an_interrupt_during_a_probe_stops_the_prompt_and_the_next_call_checks(self_check, wan_model, monkeypatch):
    """The host's interrupt (Cancel) is not taken for a broken replacement: it passes through the probe."""
    from comfy.model_management import InterruptProcessingException
    from comfyui_streamline.nodes.slicing import FeatureSlicer

    stock = wan_forward(wan_model, 5, 6, 10)
    fail_first_call(monkeypatch, self_check, "diffusion_model.blocks.0.forward", InterruptProcessingException)
    since = self_check.mark()
    sliced = node_output(FeatureSlicer, wan_model, 3, 0)
    with pytest.raises(InterruptProcessingException):
        wan_forward(sliced, 5, 6, 10)
    assert self_check.results(since) == []
    assert relative_difference(wan_forward(sliced, 5, 6, 10), stock) <= TOLERANCE
    assert outcomes(self_check, since) == {"diffusion_model": self_check.PASSED,  # the whole model
                                           "diffusion_model.blocks.0": self_check.PASSED,
                                           "diffusion_model.blocks.1": self_check.PASSED}


def test_a_block_with_active_dropout_is_not_compared(self_check, caplog):
    """Two runs of a block with dropout in training mode differ by design: not checked, not a fallback."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer

    model = patcher(build_wan("tiny"))
    model.model.diffusion_model.blocks[0].register_module("dropout", torch.nn.Dropout(0.1).train())
    since = self_check.mark()
    with caplog.at_level(logging.WARNING):
        wan_forward(node_output(FeatureSlicer, model, 3, 0), 5, 6, 10)
    assert outcomes(self_check, since) == {"diffusion_model": self_check.NOT_CHECKED,  # the whole model holds the dropout
                                           "diffusion_model.blocks.0": self_check.NOT_CHECKED,
                                           "diffusion_model.blocks.1": self_check.PASSED}
    assert any("dropout is active" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("install", ["apply_slicing", "slicing_applied"])
def test_the_check_works_where_patches_are_set_directly(self_check, monkeypatch, caplog, install):
    """Outside ComfyUI's object patches: apply_slicing and the slicing_applied context."""
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing, slicing_applied

    vae = build_wan22_vae("tiny")
    z = torch.randn(1, 48, 5, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        stock = vae.decode(z)
        break_replacements(monkeypatch, self_check, lambda path: path == "decode")
        since = self_check.mark()
        with caplog.at_level(logging.WARNING):
            if install == "apply_slicing":
                decoded = apply_slicing(vae, SliceSettings(strip_chunks=3)).decode(z)
                remove_slicing(vae)
            else:
                with slicing_applied(vae, SliceSettings(strip_chunks=3)):
                    decoded = vae.decode(z)
    assert torch.equal(decoded, stock)  # the stock decode itself ran
    assert outcomes(self_check, since) == {"": self_check.FELL_BACK}
    assert_warned(caplog, "WanVAE at <model> (decode)")


def test_a_broken_wan_vae_decode_runs_stock_through_the_node(self_check, monkeypatch, caplog):
    from comfyui_streamline.nodes.slicing import VAESlicer

    vae = build_wan_vae("tiny")
    z = torch.randn(1, 16, 6, 4, 5, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        stock = vae.decode(z)
        break_replacements(monkeypatch, self_check, lambda path: path == "decode")
        since = self_check.mark()
        with caplog.at_level(logging.WARNING):
            decoded = node_output(VAESlicer, vae, 0, 2, True, False).decode(z)
    assert relative_difference(decoded, stock) <= TOLERANCE
    assert outcomes(self_check, since) == {"": self_check.FELL_BACK}
    assert_warned(caplog, "WanVAE at <model> (decode)")


def test_broken_svd_unet_blocks_run_stock_and_sampling_gives_the_stock_latent(self_check, svd_model, monkeypatch,
                                                                             caplog):
    """A broken spatial-temporal transformer, and a broken part of the UNet's own patch group (its
    head): the group's leader, the UNet forward with the skip fusion, falls back as a whole."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    stock = sample_svd(svd_model, frames=6)
    break_replacements(monkeypatch, self_check, lambda path: path in ("diffusion_model.input_blocks.1.1.forward",
                                                                      "diffusion_model.out.forward"))
    since = self_check.mark()
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, svd_model, 2, 2))
    with caplog.at_level(logging.WARNING):
        assert relative_difference(sample_svd(sliced, frames=6), stock) <= SAMPLING_TOLERANCE
    results = outcomes(self_check, since)
    assert results.pop("diffusion_model") == self_check.FELL_BACK
    assert results.pop("diffusion_model.input_blocks.1.1") == self_check.FELL_BACK
    assert results and set(results.values()) == {self_check.PASSED}  # every other block passed
    assert_warned(caplog, "UNetModel at diffusion_model (forward)")
    assert_warned(caplog, "SpatialVideoTransformer at diffusion_model.input_blocks.1.1 (forward)")


def test_one_broken_svd_unet_block_is_found_by_its_own_probe(self_check, svd_model, monkeypatch, caplog):
    """The whole UNet's probe (every block sliced) differs from stock, so each part is checked on its
    own: the UNet's own patch group passes, the broken block alone runs stock and is named."""
    from comfyui_streamline.nodes.slicing import FeatureSlicer, OperatorGrouper

    stock = sample_svd(svd_model, frames=6)
    broken = "diffusion_model.middle_block.0"
    break_replacements(monkeypatch, self_check, lambda path: path == broken + ".forward")
    since = self_check.mark()
    sliced = node_output(OperatorGrouper, node_output(FeatureSlicer, svd_model, 2, 2))
    with caplog.at_level(logging.WARNING):
        assert relative_difference(sample_svd(sliced, frames=6), stock) <= SAMPLING_TOLERANCE
    results = outcomes(self_check, since)
    assert results.pop(broken) == self_check.FELL_BACK
    assert results.pop("diffusion_model") == self_check.PASSED
    assert results and set(results.values()) == {self_check.PASSED}
    assert_warned(caplog, f"VideoResBlock at {broken} (forward)")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "UNetModel" in r.getMessage()]


@pytest.mark.parametrize("group_ops, broken", [(True, "decoder.forward"), (False, "decoder.up.1.block.0.forward")])
def test_a_broken_svd_vae_decoder_runs_stock(self_check, monkeypatch, caplog, group_ops, broken):
    from comfyui_streamline.nodes.slicing import VAESlicer

    vae = build_svd_vae()
    latent = torch.randn(6, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        stock = vae.decode(latent)
        break_replacements(monkeypatch, self_check, lambda path: path == broken)
        since = self_check.mark()
        with caplog.at_level(logging.WARNING):
            decoded = node_output(VAESlicer, vae, 2, 2, group_ops, False).decode(latent)
    assert relative_difference(decoded, stock) <= TOLERANCE
    results = outcomes(self_check, since)
    assert results.pop(broken.rsplit(".", 1)[0]) == self_check.FELL_BACK
    assert set(results.values()) <= {self_check.PASSED}


def test_the_wan_vae_slicer_that_comfyui_033_broke_falls_back_there(self_check, monkeypatch, caplog):
    """The VAE Slicer fed the Wan VAE one latent frame at a time. ComfyUI 0.33's causal layers cache only
    the frames they are given, so that schedule decoded a wrong video there (about 1x the output scale
    off from the 5th frame on) until core/slicing/wan_vae.py learnt the host's runs of CACHE_T frames.
    With that schedule back, the self-check sees it on 0.33 and decodes stock; on 0.3.75, where the
    schedule is exact, the sliced decode passes and runs."""
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing, wan_vae

    monkeypatch.setattr(wan_vae, "latent_runs", lambda frames, run: [slice(t, t + 1) for t in range(frames)])
    vae = build_wan_vae("tiny").first_stage_model
    z = torch.randn(1, 16, 6, 4, 5, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        stock = vae.decode(z)
        with monkeypatch.context() as unchecked:
            unchecked.setattr(self_check.checker, "ENABLED", False)
            wrong = apply_slicing(vae, SliceSettings(strip_chunks=2)).decode(z)
            remove_slicing(vae)
        since = self_check.mark()
        with caplog.at_level(logging.WARNING):
            decoded = apply_slicing(vae, SliceSettings(strip_chunks=2)).decode(z)
        remove_slicing(vae)
    assert relative_difference(decoded, stock) <= TOLERANCE
    broken_here = relative_difference(wrong, stock) > TOLERANCE
    if comfyui_version() == "0.33.0":
        assert relative_difference(wrong, stock) > 0.1  # the break this host brought
    assert outcomes(self_check, since) == {"": self_check.FELL_BACK if broken_here else self_check.PASSED}
    if broken_here:
        assert_warned(caplog, "WanVAE at <model> (decode)")


def diffusers_pipeline_outputs():
    """A diffusers SVD UNet forward and VAE decode, as the diffusers pipeline calls them."""
    unet, vae = build_diffusers_svd_unet("tiny"), build_diffusers_svd_vae("tiny")
    generator = torch.Generator().manual_seed(4)
    frames = 5
    sample_in = torch.randn(2, frames, 8, 6, 10, generator=generator)
    hidden = torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    latent = torch.randn(frames, 4, 4, 6, generator=generator)

    def run():
        with torch.inference_mode():
            return (unet(sample_in, torch.tensor(0.5), hidden, ids).sample,
                    vae.decode(latent, num_frames=frames).sample)
    return unet, vae, run


def check_outputs_unchanged(self_check, caplog, model, settings, run):
    from comfyui_streamline.core.slicing import apply_slicing, remove_slicing

    stock = run(model)
    since = self_check.mark()
    apply_slicing(model, settings)
    try:
        with caplog.at_level(logging.DEBUG):
            sliced = run(model)
    finally:
        remove_slicing(model)
    stock = stock if isinstance(stock, tuple) else (stock,)
    sliced = sliced if isinstance(sliced, tuple) else (sliced,)
    for a, b in zip(sliced, stock):
        assert relative_difference(a, b) <= TOLERANCE
    results = self_check.results(since)
    assert results and {r.outcome for r in results} == {self_check.PASSED}, [r.message() for r in results]
    assert_no_self_check_warning(caplog)
    return results


@pytest.mark.parametrize("family", ["Wan DiT", "Wan 2.1 VAE", "Wan 2.2 VAE", "SVD UNet", "SVD VAE grouped",
                                    "SVD VAE per block", "diffusers SVD grouped", "diffusers SVD per block"])
def test_correct_replacements_pass_their_probe_with_no_warning_and_unchanged_output(self_check, caplog, family):
    from comfyui_streamline.core.slicing import SliceSettings

    generator = torch.Generator().manual_seed(5)
    if family == "Wan DiT":
        model = build_wan("tiny").diffusion_model
        x, context = torch.randn(1, 16, 5, 6, 10, generator=generator), torch.randn(1, 12, 4096, generator=generator)
        run = lambda m: m(x, torch.tensor([0.4]), context)  # noqa: E731
        settings = SliceSettings(frame_chunks=4, group_ops=True)
    elif family.startswith("Wan"):
        model = build_wan_vae("tiny").first_stage_model if "2.1" in family else build_wan22_vae("tiny")
        z = torch.randn(1, 16 if "2.1" in family else 48, 6, 5, 7, generator=generator)
        run = lambda m: m.decode(z)  # noqa: E731
        settings = SliceSettings(strip_chunks=2)
    elif family == "SVD UNet":
        model, frames = build_svd("micro").diffusion_model, 6
        batch = 2 * frames
        args = (torch.randn(batch, 8, 5, 7, generator=generator), torch.full((batch,), 0.7))
        kwargs = dict(context=torch.randn(batch, 1, SVD_CONTEXT_DIM, generator=generator),
                      y=torch.randn(batch, 768, generator=generator), num_video_frames=frames,
                      image_only_indicator=torch.zeros(2, frames))
        run = lambda m: m(*args, **kwargs)  # noqa: E731
        settings = SliceSettings(3, 2, True)
    elif family.startswith("SVD VAE"):
        model = build_svd_vae().first_stage_model
        latent = torch.randn(6, 4, 3, 5, generator=generator)
        run = lambda m: m.decode(latent)  # noqa: E731
        settings = SliceSettings(0, 0, "grouped" in family)
    else:
        unet, vae, pipeline = diffusers_pipeline_outputs()
        model = torch.nn.Module()
        model.unet, model.vae = unet, vae
        run = lambda m: pipeline()  # noqa: E731
        settings = SliceSettings(2, 3, "grouped" in family)
    with torch.inference_mode():
        results = check_outputs_unchanged(self_check, caplog, model, settings, run)
    if family == "SVD UNet":  # one probe of the whole UNet, its blocks sliced inside it
        probed = [r for r in results if r.seconds > 0]
        assert [r.block for r in probed] == ["UNetModel"] and "sliced blocks inside it" in probed[0].detail
        assert len(results) > 10 and all("checked with UNetModel" in r.detail for r in results if r.seconds == 0)
    else:
        assert all(r.seconds > 0 for r in results)


def test_the_probe_never_runs_stock_on_the_full_input(self_check, wan_model):
    """The stock block runs on the probes only (PROBE_TOKENS of this call's 1,152 tokens, and the whole
    model's probe of 2 frames x 4 x 4 tokens), never on the whole call: the check costs no stock-size
    memory."""
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing

    model = build_wan("tiny").diffusion_model
    block_class = type(model.blocks[0])
    seen = []
    x, context = torch.randn(1, 16, 9, 16, 32), torch.randn(1, 12, 4096)  # 9 * 8 * 16 = 1152 tokens
    original = block_class.forward

    def watched(self, x, *args, **kwargs):
        seen.append(x.shape[1])
        return original(self, x, *args, **kwargs)
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(block_class, "forward", watched)
        apply_slicing(model, SliceSettings(group_ops=True))
        model(x, torch.tensor([0.3]), context)
        remove_slicing(model)
    from comfyui_streamline.core.slicing.families import wan
    whole_model_probe = wan.WHOLE_MODEL_FRAMES * (wan.WHOLE_MODEL_SIDE // 2) ** 2  # 2x2 patches
    assert seen == [wan.PROBE_TOKENS] * len(model.blocks) + [whole_model_probe] * len(model.blocks)


def test_a_row_marked_unchecked_runs_sliced_and_says_so_at_debug_level(self_check, monkeypatch, caplog):
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing
    from comfyui_streamline.core.slicing.families import FAMILIES

    wan_dit = next(family for family in FAMILIES if family.root == "WanModel")
    monkeypatch.setitem(wan_dit.probes, "wan_block_forward", self_check.UNCHECKED_PROBE)
    monkeypatch.setattr(self_check.checker, "_unchecked_logged", set())
    model = build_wan("tiny").diffusion_model
    x, context = torch.randn(1, 16, 2, 4, 6), torch.randn(1, 12, 4096)
    since = self_check.mark()
    with torch.inference_mode(), caplog.at_level(logging.DEBUG):
        stock = model(x, torch.tensor([0.3]), context)
        apply_slicing(model, SliceSettings(frame_chunks=2))
        assert relative_difference(model(x, torch.tensor([0.3]), context), stock) <= TOLERANCE
    # no block checked, nothing to report but the whole model's check (its row has a probe)
    assert [r.block for r in self_check.results(since)] == ["WanModel"]
    debug = [r for r in caplog.records if "wan_block_forward" in r.getMessage() and "unchecked" in r.getMessage()]
    assert len(debug) == 1 and debug[0].levelno == logging.DEBUG


def test_every_row_of_the_block_table_has_a_probe(self_check):
    """Adding a family means adding its probe rows: every maker of every family's patches has a probe in
    its family's row."""
    from comfyui_streamline.core.slicing import SliceSettings, slicing_patches

    models = [build_wan("tiny").diffusion_model, build_wan_vae("tiny").first_stage_model, build_wan22_vae("tiny"),
              build_svd("micro").diffusion_model, build_svd_vae().first_stage_model,
              build_diffusers_svd_unet("tiny"), build_diffusers_svd_vae("tiny")]
    probes = {}
    for model in models:
        for settings in (SliceSettings(), SliceSettings(group_ops=True)):
            probes.update({checker.maker: checker.probe for checker in slicing_patches(model, settings).values()})
    missing = [maker for maker, probe in probes.items() if probe in (None, self_check.checker._MISSING)]
    assert len(probes) >= 10 and not missing, missing


def test_compare_tolerances(self_check):
    reference = torch.linspace(-2.0, 2.0, 101)
    assert self_check.compare(reference, reference * (1 + 5e-6))[0]
    matches, detail = self_check.compare(reference, reference * (1 + 1e-4))
    assert not matches and "tolerance 1e-05" in detail
    half = reference.to(torch.bfloat16)
    assert self_check.compare(half, (reference * (1 + 4e-3)).to(torch.bfloat16))[0]
    assert not self_check.compare(half, (reference * 1.05).to(torch.bfloat16))[0]
    assert not self_check.compare(reference, reference[:50])[0]
    nan = reference.clone()
    nan[3] = float("nan")
    assert self_check.compare(nan, nan.clone())[0] and not self_check.compare(reference, nan)[0]


class FakeServer:
    def __init__(self):
        self.client_id, self.texts = "client-1", []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text, sid))


def test_the_fallback_is_shown_on_the_node_that_made_the_patch(self_check, wan_model, monkeypatch):
    """In a running prompt the node's id is known when it makes its patches; the fallback's warning is
    sent as that node's text (PromptServer.send_progress_text) to the prompt's client."""
    from comfy_execution.utils import CurrentNodeContext
    from comfyui_streamline.nodes.slicing import FeatureSlicer

    server = FakeServer()
    host_server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server))
    monkeypatch.setitem(sys.modules, "server", host_server)
    break_replacements(monkeypatch, self_check, lambda path: path == "diffusion_model.blocks.0.forward")
    with CurrentNodeContext("prompt-1", "17"):
        sliced = node_output(FeatureSlicer, wan_model, 2, 0)
    wan_forward(sliced, 3, 4, 6)
    assert len(server.texts) == 1
    node_id, text, sid = server.texts[0]
    assert (node_id, sid) == ("17", "client-1")
    assert "WanAttentionBlock at diffusion_model.blocks.0 (forward)" in text and f"ComfyUI {comfyui_version()}" in text


def run_watching_node_texts(comfy_server, prompt: dict) -> tuple:
    """Queues `prompt` with a websocket open and returns (result, {node id: [texts]}) once it ends."""
    import websocket

    client_id = uuid.uuid4().hex
    url = f"{comfy_server.url.replace('http', 'ws', 1)}/ws?clientId={client_id}"
    ws = websocket.create_connection(url, timeout=600)
    texts = {}
    try:
        prompt_id = comfy_server.queue(prompt, client_id)
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                event, length = struct.unpack(">II", message[:8])
                if event == 3:  # BinaryEventTypes.TEXT: node id, then the text
                    texts.setdefault(message[8:8 + length].decode(), []).append(message[8 + length:].decode())
                continue
            data = json.loads(message)
            if (data.get("type") in ("execution_success", "execution_error", "execution_interrupted")
                    and data["data"].get("prompt_id") == prompt_id):
                break
    finally:
        ws.close()
    return comfy_server.wait(prompt_id), texts


SLICING_NODES = ("StreamlineFeatureSlicer", "StreamlineOperatorGrouper", "StreamlineVAESlicer")


def bypassed(prompt: dict, ids: list) -> dict:
    """`prompt` without the nodes `ids`, whose consumers read those nodes' (one) linked input instead."""
    source = {i: next(v for v in prompt[i]["inputs"].values() if isinstance(v, list)) for i in ids}

    def upstream(link):
        while isinstance(link, list) and link[0] in source:
            link = source[link[0]]
        return link
    return {k: {**node, "inputs": {name: upstream(value) for name, value in node["inputs"].items()}}
            for k, node in prompt.items() if k not in ids}


def test_a_fallback_in_a_real_comfyui_prompt_is_in_the_log_on_the_node_and_in_the_report(comfy_server):
    """Headless ComfyUI, the Wan 2.1 text-to-video example with the slicing nodes and a Memory Monitor,
    on a model with a host patch that no slicing can match (Chunk-Sensitive Layer (fixture) on block 0):
    that block runs stock, the saved latent equals the same workflow's without the slicing nodes, and the
    warning is in the server log, on the slicing node that made the installed patches (the last of the
    chain) and in the Memory Monitor's report; and again in the next prompt that runs the block (its
    model nodes cached, so nothing is probed again)."""
    from safetensors.torch import load_file

    prompt = load_workflow("demo_wan21_t2v_sliced_tiny.api.json")
    slicing = [k for k, node in prompt.items() if node["class_type"] in SLICING_NODES]
    model_slicing = [k for k in slicing if "model" in prompt[k]["inputs"]]
    first = next(k for k in model_slicing if prompt[k]["inputs"]["model"][0] not in model_slicing)
    last = next(k for k in model_slicing if not any(prompt[o]["inputs"].get("model") == [k, 0] for o in model_slicing))
    sampler = next(k for k, node in prompt.items() if node["inputs"].get("model") == [last, 0])
    prompt["900"] = {"class_type": "StreamlineFixtureChunkSensitiveLayer",
                     "inputs": {"model": prompt[first]["inputs"]["model"], "block": 0}}
    prompt[first]["inputs"]["model"] = ["900", 0]
    prompt["901"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": ""}}
    monitors = [k for k, node in prompt.items() if node["class_type"] == "StreamlineMemoryMonitor"]
    if not monitors:
        prompt["902"] = {"class_type": "StreamlineMemoryMonitor", "inputs": {"value": [sampler, 0]}}
        monitors = ["902"]

    def named(prompt, name):
        for node in prompt.values():
            if "filename_prefix" in node["inputs"]:
                node["inputs"]["filename_prefix"] = f"self_check/{name}"
        for monitor in monitors:
            prompt[monitor]["inputs"]["report_prefix"] = f"self_check_{name}"
        return prompt
    result, texts = run_watching_node_texts(comfy_server, named(bypassed(prompt, []), "fallback"))
    assert result.status == "success", result.error
    seed = next(name for name in ("seed", "noise_seed") if name in prompt[sampler]["inputs"])
    prompt[sampler]["inputs"][seed] += 1  # the sampler runs again on the cached sliced model
    again, again_texts = run_watching_node_texts(comfy_server, named(bypassed(prompt, []), "fallback_again"))
    assert again.status == "success", again.error
    prompt[sampler]["inputs"][seed] -= 1
    stock_result = comfy_server.run(named(bypassed(prompt, slicing), "stock"))
    assert stock_result.status == "success", stock_result.error

    def latent(res):
        return load_file(next(p for p in res.files(comfy_server.output_dir) if p.suffix == ".latent"))["latent_tensor"]
    assert relative_difference(latent(result), latent(stock_result)) <= SAMPLING_TOLERANCE

    where, version = "WanAttentionBlock at diffusion_model.blocks.0 (forward)", f"ComfyUI {comfyui_version()}"
    log_lines = [line for line in comfy_server.log().splitlines() if where in line]
    assert log_lines and version in log_lines[0] and "runs stock" in log_lines[0]
    assert "diffusion_model.blocks.1 (forward)" not in comfy_server.log()  # the other block passed
    assert any(where in text and version in text for text in texts.get(last, [])), texts
    summary = result.outputs[monitors[0]]["text"][0]
    assert where in summary and version in summary
    report = sorted((comfy_server.output_dir / "streamline_memory").glob("self_check_fallback_0*.json"))[-1]
    assert report.name in summary and where in json.loads(report.read_text())["summary"]
    assert where not in stock_result.outputs[monitors[0]]["text"][0]
    said_again = f"{where} runs stock, as it has since it did not match {version}'s stock forward"
    assert said_again in again.outputs[monitors[0]]["text"][0]
    assert any(said_again in text for text in again_texts.get(last, [])), again_texts
    assert said_again in comfy_server.log()
