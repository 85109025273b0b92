"""Memory Planner: the dry-run predictor against measurement, the choice of the least slicing that
fits a budget, the clear error when none fits, and the retry with finer slicing on out-of-memory."""
import copy
import logging

import pytest
import torch

from devkit.model_fixtures import build_svd, build_wan
from streamline_helpers import SAMPLING_TOLERANCE, patcher, relative_difference, sample_wan


@pytest.fixture(scope="module")
def wan_model(pack):
    return patcher(build_wan("tiny"))


def latent(frames=3):
    return {"samples": torch.zeros(1, 16, frames, 6, 8)}


def predictions(model, lat):
    from comfyui_streamline.core.memory.predictor import Workload, model_forward, predict_peak, slicing_ladder

    diffusion_model = model.get_model_object("diffusion_model")
    work = Workload(tuple(lat["samples"].shape), 2, torch.float32)
    forward = model_forward(diffusion_model, work)
    return [(s, predict_peak(diffusion_model, forward, s, "cpu")) for s in slicing_ladder(diffusion_model, work)]


@pytest.mark.parametrize("family", ["wan", "svd"])
def test_prediction_equals_the_measured_peak_of_the_real_forward(pack, family):
    """The fake-tensor dry run predicts what the same forward allocates with real tensors."""
    from comfyui_streamline.core.memory.predictor import Workload, model_forward, predict_peak, slicing_ladder
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker
    from comfyui_streamline.core.slicing import apply_slicing, remove_slicing

    if family == "wan":  # four blocks: the prediction runs two of them, the measurement all four
        model = build_wan("tiny").diffusion_model
        model.blocks.extend(copy.deepcopy(list(model.blocks)))
    else:
        model = build_svd("micro").diffusion_model
    work = Workload((1, 16, 5, 12, 16) if family == "wan" else (5, 4, 8, 24), 2, torch.float32)
    forward = model_forward(model, work)
    for settings in slicing_ladder(model, work)[:4]:
        predicted = predict_peak(model, forward, settings, "cpu")
        if settings is not None:
            apply_slicing(model, settings)
        with torch.inference_mode(), LiveStorageTracker("cpu") as measured:
            forward(model, "cpu")
        remove_slicing(model)
        assert predicted == measured.peak
    assert predict_peak(model, forward, slicing_ladder(model, work)[-1], "cpu") < predict_peak(model, forward, None, "cpu")


def test_planner_applies_the_least_slicing_that_fits(pack, wan_model):
    from comfyui_streamline.glue.planner import describe
    from comfyui_streamline.nodes.planner import MemoryPlanner

    lat = latent()
    ladder = predictions(wan_model, lat)
    weights = wan_model.model_size()
    roomy, plan = MemoryPlanner.execute(wan_model, lat, (weights + ladder[0][1]) / 1024 ** 3 + 0.01, True).args
    assert roomy.object_patches == {} and "stock (no slicing): activations" in plan and plan.endswith("<- fits")

    tight_level = next(i for i, (_, peak) in enumerate(ladder) if peak < ladder[0][1])
    budget = (weights + ladder[tight_level][1] + 1) / 1024 ** 3
    chosen, plan = MemoryPlanner.execute(wan_model, lat, budget, True).args
    assert plan.splitlines()[-1] == f"{describe(ladder[tight_level][0])}: activations " \
        f"{ladder[tight_level][1] / 1024 ** 3:.3f} GiB <- fits"
    # each block, and the whole model (its self-check)
    assert len(chosen.object_patches) == len(chosen.get_model_object("diffusion_model").blocks) + 1
    assert relative_difference(sample_wan(chosen), sample_wan(wan_model)) <= SAMPLING_TOLERANCE
    assert wan_model.object_patches == {}


def test_planner_skips_finer_slicing_that_saves_no_memory(pack, wan_model):
    """Finer slicing costs time, so a level whose predicted peak is no lower than a coarser level's is
    listed as skipped and never chosen: with room for only the lowest peak, the coarsest level that
    reaches it is applied."""
    from comfyui_streamline.glue.planner import describe
    from comfyui_streamline.nodes.planner import MemoryPlanner

    lat = latent()
    ladder = predictions(wan_model, lat)
    lowest_peak = min(peak for _, peak in ladder)
    budget = (wan_model.model_size() + lowest_peak + 1) / 1024 ** 3
    chosen, plan = MemoryPlanner.execute(wan_model, lat, budget, True).args
    lines = plan.splitlines()[1:]
    coarser_lowest = float("inf")
    for (settings, peak), line in zip(ladder, lines):
        assert line.startswith(f"{describe(settings)}: activations {peak / 1024 ** 3:.3f} GiB")
        assert line.endswith("skipped") == (peak >= coarser_lowest), line
        coarser_lowest = min(coarser_lowest, peak)
    assert any(line.endswith("skipped") for line in lines)  # the Grouper at auto saves nothing over the Slicer here
    coarsest = next(settings for settings, peak in ladder if peak == lowest_peak)
    assert lines[-1] == f"{describe(coarsest)}: activations {lowest_peak / 1024 ** 3:.3f} GiB <- fits"
    assert chosen.model_options["transformer_options"]["streamline_slicing"] == coarsest


def test_planner_names_the_smallest_reachable_peak_when_nothing_fits(pack, wan_model):
    from comfyui_streamline.nodes.planner import MemoryPlanner

    smallest = min(peak for _, peak in predictions(wan_model, latent())) + wan_model.model_size()
    with pytest.raises(ValueError, match=f"no slicing fits 0.00 GiB. The smallest peak reachable is "
                                         f"{smallest / 1024 ** 3:.2f} GiB"):
        MemoryPlanner.execute(wan_model, latent(), 1e-6, True)


def test_planner_rejects_a_model_it_cannot_predict(pack):
    from comfyui_streamline.nodes.planner import MemoryPlanner

    other = patcher(build_wan("tiny"))
    other.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))  # a model of no known family
    with pytest.raises(ValueError, match="Memory Planner: this MODEL is Linear, which the Memory Planner cannot predict .it predicts .*Wan 2.1 / 2.2 DiT"):
        MemoryPlanner.execute(other, latent(), 0.0, True)


@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (1, 4, 3, 8, 8)])
def test_planner_names_a_latent_the_model_cannot_take(pack, wan_model, shape):
    from comfyui_streamline.nodes.planner import MemoryPlanner

    with pytest.raises(ValueError, match=r"Memory Planner: the latent has shape \[.*\]; this model takes a video latent "
                                         r"of batch x channels x frames x height x width .* with 16 channels"):
        MemoryPlanner.execute(wan_model, {"samples": torch.zeros(shape)}, 0.0, True)


def test_out_of_memory_during_sampling_retries_once_with_finer_slicing(pack, wan_model, caplog):
    from comfy.patcher_extension import WrappersMP
    from comfyui_streamline.nodes.planner import MemoryPlanner

    planned, _ = MemoryPlanner.execute(wan_model, latent(), 1024.0, True).args  # roomy: stock, no patches
    failures = []

    def out_of_memory_once(executor, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return executor(*args, **kwargs)
    planned.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_oom", out_of_memory_once)
    with caplog.at_level(logging.WARNING):
        result = sample_wan(planned)
    assert failures == [1] and "retrying the step with Feature Slicer (auto chunks)" in caplog.text
    assert relative_difference(result, sample_wan(wan_model)) <= SAMPLING_TOLERANCE
    blocks = wan_model.get_model_object("diffusion_model").blocks
    assert all(getattr(b.forward, "__func__", None) is type(b).forward for b in blocks)  # stock forwards again

    always = planned.clone()
    always.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_oom",
                                lambda executor, *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("again")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        sample_wan(always)
    assert sample_wan(wan_model).shape == result.shape  # the stock model still samples afterwards


def test_planned_workflow_runs_through_the_api_and_samples_the_stock_latent(comfy_server):
    from safetensors.torch import load_file

    from conftest import load_workflow

    planned = comfy_server.run(load_workflow("wan2.1_t2v_1.3B_planner"))
    assert planned.status == "success", planned.error
    plan = planned.outputs["13"]["text"][0]
    assert plan.startswith("budget ") and plan.endswith("<- fits")
    stock = comfy_server.run(load_workflow("wan2.1_t2v_1.3B_sliced", stock=True))
    latents = [load_file(next(p for p in r.files(comfy_server.output_dir) if p.suffix == ".latent"))["latent_tensor"]
               for r in (stock, planned)]
    assert relative_difference(latents[1], latents[0]) <= 1e-4
    report = next((comfy_server.output_dir / "streamline_memory").glob("wan21_t2v_planned_*.json"))
    assert "Memory Planner" in report.read_text()


def test_planner_budget_that_cannot_be_met_fails_clearly_and_the_next_prompt_runs(comfy_server):
    from conftest import load_workflow

    prompt = load_workflow("wan2.1_t2v_1.3B_planner")
    prompt["12"]["inputs"]["budget_gib"] = 0.0001
    failed = comfy_server.run(prompt)
    assert failed.status == "error"
    message = failed.error["exception_message"]
    assert message.startswith("Memory Planner: no slicing fits") and "smallest peak reachable" in message
    assert comfy_server.run(load_workflow("wan2.1_t2v_1.3B_planner")).status == "success"
