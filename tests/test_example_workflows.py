"""The shipped example workflows (example_workflows/, served by ComfyUI under Templates -> Extensions):
UI format only, real model file names, a thumbnail and a Note each, every pack node shown; the
converter (devkit/workflows.py) gives their API twins; ComfyUI lists and serves them."""
import json

import pytest
import requests
from PIL import Image

from conftest import PACK_FOLDER_NAME, REPO_ROOT
from devkit.workflows import API_DIR, EXAMPLES_DIR, example_names, load_ui, ui_to_api

NAMES = example_names()
# The model files under the names ComfyUI's own templates (comfyui-workflow-templates) give them.
OFFICIAL_FILES = {
    "wan2.1_t2v_1.3B_fp16.safetensors": "diffusion_models", "wan2.1_i2v_480p_14B_fp16.safetensors": "diffusion_models",
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "diffusion_models",
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": "diffusion_models",
    "wan2.2_ti2v_5B_fp16.safetensors": "diffusion_models", "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "text_encoders",
    "wan_2.1_vae.safetensors": "vae", "wan2.2_vae.safetensors": "vae", "clip_vision_h.safetensors": "clip_vision",
    "svd_xt.safetensors": "checkpoints",
    # fp16 files of the repository whose fp8_scaled twins ComfyUI's templates name (DualParal needs them)
    "wan2.2_i2v_high_noise_14B_fp16.safetensors": "diffusion_models",
    "wan2.2_i2v_low_noise_14B_fp16.safetensors": "diffusion_models",
}
FP16_TWIN_OF = {"wan2.2_i2v_high_noise_14B_fp16.safetensors": "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
                "wan2.2_i2v_low_noise_14B_fp16.safetensors": "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"}
LOADERS = {"UNETLoader": "unet_name", "CLIPLoader": "clip_name", "VAELoader": "vae_name",
           "CLIPVisionLoader": "clip_name", "ImageOnlyCheckpointLoader": "ckpt_name"}


def test_the_served_folder_holds_only_ui_workflows_their_thumbnails_and_inputs():
    assert not (REPO_ROOT / "workflows").exists()  # ComfyUI would serve it too
    assert len(NAMES) == 11
    for path in EXAMPLES_DIR.iterdir():
        if path.is_dir():
            assert path.name == "input"
            continue
        assert path.suffix in (".json", ".jpg") and path.stem in NAMES, path.name
        if path.suffix == ".json":
            workflow = json.loads(path.read_text())
            assert {"nodes", "links", "version"} <= set(workflow), path.name  # UI format, not API
    for name in NAMES:
        assert (EXAMPLES_DIR / f"{name}.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, as the dialog loads
        width, height = Image.open(EXAMPLES_DIR / f"{name}.jpg").size
        assert width == height >= 512  # the dialog's cards are square: a strip would be cropped to its middle
    for name in NAMES:  # every input file a LoadImage names ships in example_workflows/input/
        for node in load_ui(name)["nodes"]:
            if node["type"] == "LoadImage":
                assert (EXAMPLES_DIR / "input" / node["widgets_values"][0]).is_file()


def official_downloads() -> dict:
    """File name -> {(download address without its query, folder)} from ComfyUI's own templates (their
    nodes' `models` properties, subgraphs included)."""
    from pathlib import Path

    templates = pytest.importorskip("comfyui_workflow_templates_json")
    downloads = {}

    def collect(value):
        if isinstance(value, dict):
            properties = value.get("properties")
            models = properties.get("models") if isinstance(properties, dict) else None
            for model in models if isinstance(models, list) else []:
                downloads.setdefault(model["name"], set()).add((model["url"].split("?")[0], model["directory"]))
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
    for path in (Path(templates.__file__).parent / "templates").glob("*.json"):
        collect(json.loads(path.read_text()))
    return downloads


def test_each_loader_carries_its_download_as_comfyuis_templates_do():
    """The frontend's missing-models dialog offers the download of a loader's file from the node's
    `models` property: the same address and folder as ComfyUI's own templates give that file."""
    downloads = official_downloads()
    for name in NAMES:
        for node in load_ui(name)["nodes"]:
            if node["type"] in LOADERS and node["widgets_values"][0] in OFFICIAL_FILES:
                [model] = node["properties"]["models"]
                assert model["name"] == node["widgets_values"][0]
                assert model["directory"] == OFFICIAL_FILES[model["name"]]
                twin = FP16_TWIN_OF.get(model["name"])
                expected = {(url.replace(twin, model["name"]), folder) for url, folder in downloads[twin]} if twin \
                    else downloads[model["name"]]
                assert (model["url"], model["directory"]) in expected, (name, model)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_official_files_and_its_note_says_where_they_go(name):
    workflow = load_ui(name)
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    note = notes[0]["widgets_values"][0]
    prompt = ui_to_api(workflow)
    for node in prompt.values():
        if node["class_type"] in LOADERS:
            file_name = node["inputs"][LOADERS[node["class_type"]]]
            assert file_name in OFFICIAL_FILES, file_name
            assert f"models/{OFFICIAL_FILES[file_name]}/{file_name}" in note
        if node["class_type"] == "LoadImage":
            assert f"example_workflows/input/{node['inputs']['image']}" in note
    assert all(n.get("mode", 0) == 0 for n in workflow["nodes"])


@pytest.mark.parametrize("name", NAMES)
def test_converter_gives_the_api_twin_with_titles(name):
    twin = json.loads((API_DIR / f"{name}.json").read_text())
    assert all(node["_meta"]["title"] for node in twin.values())
    converted = ui_to_api(load_ui(name))
    assert {k: (n["class_type"], n["inputs"]) for k, n in converted.items()} == \
        {k: (n["class_type"], n["inputs"]) for k, n in twin.items()}
    assert all(node.get("title") for node in load_ui(name)["nodes"])  # every node titled
    assert {k: n["_meta"]["title"] for k, n in converted.items()} == {k: n["_meta"]["title"] for k, n in twin.items()}


def test_every_pack_node_is_in_an_example_and_comfyui_serves_them(comfy_server):
    shown = {node["type"] for name in NAMES for node in load_ui(name)["nodes"]}
    pack_nodes = {k for k, v in comfy_server.object_info().items() if v["category"].startswith("Streamline/")}
    assert pack_nodes and pack_nodes <= shown, pack_nodes - shown
    assert sorted(comfy_server.get("/workflow_templates")[PACK_FOLDER_NAME]) == NAMES
    for name in NAMES:
        base = f"{comfy_server.url}/api/workflow_templates/{PACK_FOLDER_NAME}/{name}"
        assert requests.get(f"{base}.json", timeout=10).json() == load_ui(name)
        assert requests.get(f"{base}.jpg", timeout=10).headers["Content-Type"] == "image/jpeg"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_runs_on_the_fixtures(comfy_server, name):
    from conftest import load_workflow

    result = comfy_server.run(load_workflow(name))
    assert result.status == "success", result.error
    assert result.files(comfy_server.output_dir)


def test_a_third_party_api_client_runs_an_api_twin_by_node_titles(comfy_server):
    """comfy-api-simplified drives a workflow by node titles (`_meta.title`) and waits on the
    websocket; it finds the output node by title in the history, next to the Memory Monitor's."""
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper
    from devkit.workflows import for_fixtures

    name = "wan2.1_t2v_1.3B_sliced"
    twin = json.loads((API_DIR / f"{name}.json").read_text())
    workflow = ComfyWorkflowWrapper(for_fixtures(twin, name))
    titles = {node["class_type"]: node["_meta"]["title"] for node in twin.values()}
    workflow.set_node_param(titles["StreamlineMemoryMonitor"], "report_prefix", "api_client")
    files = ComfyApiWrapper(comfy_server.url).queue_and_wait_images(workflow, titles["SaveAnimatedWEBP"])
    [(file_name, data)] = files.items()
    assert file_name.endswith(".webp") and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert list((comfy_server.output_dir / "streamline_memory").glob("api_client*"))
