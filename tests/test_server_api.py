"""The pack on a real headless ComfyUI, driven through its HTTP API."""
import copy
import json

import pytest
import requests
from PIL import Image

from conftest import PACK_FOLDER_NAME, load_workflow
from devkit.comfy_server import PromptRejected
from streamline_helpers import frame_count, saved_files

PACK_NODES = {"StreamlineMemoryMonitor": "Memory Monitor"}
WAN_T2V, SVD = "wan2.1_t2v_1.3B_sliced", "svd_xt_img2vid_sliced"  # shipped examples (run without the slicing nodes)


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


def test_stock_svd_img2vid_workflow_runs_to_saved_video(comfy_server):
    prompt = load_workflow(SVD, stock=True)
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    videos = saved_files(result, comfy_server, ".webp")
    assert len(videos) == 1 and videos[0].is_file()
    assert frame_count(videos[0]) == prompt["4"]["inputs"]["video_frames"]
    assert list((comfy_server.output_dir / "streamline").glob("svd_img2vid*.latent"))


def test_stock_wan21_t2v_workflow_runs_to_saved_video(comfy_server):
    prompt = load_workflow(WAN_T2V, stock=True)
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    videos = saved_files(result, comfy_server, ".webp")
    assert len(videos) == 1
    assert frame_count(videos[0]) == prompt["6"]["inputs"]["length"]


def _reports(comfy_server, prefix):
    return sorted((comfy_server.output_dir / "streamline_memory").glob(f"{prefix}_*"))


def test_memory_monitor_records_every_node_of_the_prompt(comfy_server):
    prompt = load_workflow(WAN_T2V, stock=True)
    prompt["9"]["inputs"]["report_prefix"] = "api_report_check"
    prompt["7"]["inputs"]["seed"] = 1234  # not cached from an earlier test: sampling and all after it run
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error
    summary = result.outputs["9"]["text"][0]
    assert summary.startswith("peak RAM") and "VRAM unavailable" in summary and "KSampler" in summary
    report_file, chart_file = _reports(comfy_server, "api_report_check")
    assert (report_file.suffix, chart_file.suffix) == (".json", ".png")
    report = json.loads(report_file.read_text())
    recorded = {step["step_id"]: step for step in report["steps"]}
    assert {"7", "8", "9", "10", "11"} <= set(recorded) <= set(prompt)  # loaders may be cached
    assert recorded["9"]["label"] == "#9 Memory Monitor" and recorded["7"]["label"] == "#7 KSampler"
    for node_id, step in recorded.items():
        assert step["label"].startswith(f"#{node_id} ") and step["ram_peak"] > 0
        assert step["finished"] >= step["started"]
    # the report is written at the end of the prompt: it covers the nodes after the monitor too
    assert recorded["10"]["started"] > recorded["9"]["started"]
    assert report["samples"] and report["peaks"]["ram"] >= max(s["ram_peak"] for s in report["steps"])
    with Image.open(chart_file) as chart:
        assert chart.size[0] > 500


def test_memory_monitor_reports_a_failed_prompt_and_prompts_without_it_are_not_recorded(comfy_server):
    prompt = load_workflow(WAN_T2V, stock=True)
    prompt["9"]["inputs"]["report_prefix"] = "failed_prompt"
    prompt["3"]["inputs"]["width"] = 8  # fails in KSampler
    assert comfy_server.run(prompt).status == "error"
    report = json.loads(_reports(comfy_server, "failed_prompt")[0].read_text())
    assert "KSampler" in report["steps"][-1]["label"] and report["steps"][-1]["finished"] is not None
    before = set((comfy_server.output_dir / "streamline_memory").iterdir())
    without = {k: v for k, v in load_workflow(WAN_T2V, stock=True).items() if k != "9"}
    without["10"]["inputs"]["images"] = ["8", 0]
    assert comfy_server.run(without).status == "success"
    assert set((comfy_server.output_dir / "streamline_memory").iterdir()) == before


def test_malformed_prompt_is_a_validation_error_and_the_server_keeps_serving(comfy_server):
    prompt = copy.deepcopy(load_workflow(WAN_T2V, stock=True))
    del prompt["7"]["inputs"]["model"]
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(prompt)
    errors = rejected.value.body["node_errors"]["7"]["errors"]
    assert any(e["type"] == "required_input_missing" and e["extra_info"]["input_name"] == "model" for e in errors)
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]
    with pytest.raises(PromptRejected) as unknown:
        comfy_server.queue({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    error = unknown.value.body["error"]
    assert error["type"] in ("invalid_prompt", "missing_node_type")  # ComfyUI 0.3.75 / 0.33
    assert "NoSuchNode" in error["message"] + json.dumps(error["extra_info"])
    follow_up = comfy_server.run(load_workflow(WAN_T2V, stock=True))
    assert follow_up.status == "success"


def test_a_prompt_failing_mid_execution_reports_its_error_and_the_next_one_runs(comfy_server):
    prompt = load_workflow(WAN_T2V, stock=True)
    prompt["3"]["inputs"]["width"] = 8  # Wan's text embedding takes 4096-wide conditioning
    result = comfy_server.run(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "KSampler"
    follow_up = comfy_server.run(load_workflow(WAN_T2V, stock=True))
    assert follow_up.status == "success", follow_up.error
