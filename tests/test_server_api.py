"""The pack on a real headless ComfyUI, driven through its HTTP API."""
import copy
import json

import pytest
import requests
from PIL import Image

from conftest import PACK_FOLDER_NAME, load_workflow
from devkit.comfy_server import PromptRejected

PACK_NODES = {"StreamlineMemoryMonitor": "Memory Monitor"}


def test_object_info_lists_the_pack_nodes_under_streamline(comfy_server):
    info = comfy_server.object_info()
    for node_id, display_name in PACK_NODES.items():
        assert node_id in info
        assert info[node_id]["display_name"] == display_name
        assert info[node_id]["category"].startswith("Streamline/")


def test_pack_imports_cleanly_from_a_renamed_folder(comfy_server):
    import_lines = [line for line in comfy_server.log().splitlines()
                    if "seconds" in line and line.endswith("/" + PACK_FOLDER_NAME)]
    assert len(import_lines) == 1, "the pack is missing from ComfyUI's custom node import times"
    assert "IMPORT FAILED" not in import_lines[0]


def test_web_directory_is_served_to_the_frontend(comfy_server):
    extensions = comfy_server.get("/extensions")
    script = f"/extensions/{PACK_FOLDER_NAME}/memory_monitor.js"
    assert script in extensions
    assert "Streamline.MemoryMonitor" in requests.get(comfy_server.url + script, timeout=10).text


def _frames(path) -> int:
    with Image.open(path) as image:
        return getattr(image, "n_frames", 1)


def _saved(result, comfy_server, suffix):
    return [p for p in result.files(comfy_server.output_dir) if p.suffix == suffix]


def test_stock_svd_img2vid_workflow_runs_to_saved_video(comfy_server):
    prompt = load_workflow("demo_svd_img2vid_tiny.api.json")
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    videos = _saved(result, comfy_server, ".webp")
    assert len(videos) == 1 and videos[0].is_file()
    assert _frames(videos[0]) == prompt["4"]["inputs"]["video_frames"]
    assert list((comfy_server.output_dir / "streamline_demo").glob("svd_img2vid*.latent"))


def test_stock_wan21_t2v_workflow_runs_to_saved_video(comfy_server):
    prompt = load_workflow("demo_wan21_t2v_tiny.api.json")
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    videos = _saved(result, comfy_server, ".webp")
    assert len(videos) == 1
    assert _frames(videos[0]) == prompt["6"]["inputs"]["length"]


def test_memory_monitor_reports_through_the_api(comfy_server):
    prompt = load_workflow("demo_wan21_t2v_tiny.api.json")
    prompt["9"]["inputs"]["report_prefix"] = "api_report_check"
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    summary = result.outputs["9"]["text"][0]
    assert summary.startswith("RAM:") and "VRAM unavailable" in summary
    reports = list((comfy_server.output_dir / "streamline_memory").glob("api_report_check_*.json"))
    assert len(reports) == 1
    assert json.loads(reports[0].read_text())["ram_peak"] > 0


def test_malformed_prompt_is_a_validation_error_and_the_server_keeps_serving(comfy_server):
    prompt = copy.deepcopy(load_workflow("demo_wan21_t2v_tiny.api.json"))
    del prompt["7"]["inputs"]["model"]
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(prompt)
    errors = rejected.value.body["node_errors"]["7"]["errors"]
    assert any(e["type"] == "required_input_missing" and e["extra_info"]["input_name"] == "model" for e in errors)
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]
    with pytest.raises(PromptRejected) as unknown:
        comfy_server.queue({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert unknown.value.body["error"]["type"] == "invalid_prompt"
    follow_up = comfy_server.run(load_workflow("demo_wan21_t2v_tiny.api.json"))
    assert follow_up.status == "success"


def test_a_prompt_failing_mid_execution_reports_its_error_and_the_next_one_runs(comfy_server):
    prompt = load_workflow("demo_wan21_t2v_tiny.api.json")
    prompt["3"]["inputs"]["width"] = 8  # Wan's text embedding takes 4096-wide conditioning
    result = comfy_server.run(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "KSampler"
    follow_up = comfy_server.run(load_workflow("demo_wan21_t2v_tiny.api.json"))
    assert follow_up.status == "success", follow_up.error
