"""The pack's nodes inserted into ComfyUI's own Wan and SVD templates (package
comfyui-workflow-templates-json): on the fixtures, each template with Feature Slicer -> Operator
Grouper before its sampler, VAE Slicer before its VAE Decode and a Memory Monitor after it samples
the latent and decodes the frames the template without them does."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from devkit.demo_assets import START_IMAGE
from devkit.workflows import consumers, swap_encoders, ui_to_api

templates = pytest.importorskip("comfyui_workflow_templates_json")
TEMPLATES = Path(templates.__file__).parent / "templates"

SMALL = {  # class -> inputs made small for the tiny models on a CPU
    "EmptyHunyuanLatentVideo": {"width": 64, "height": 48, "length": 9},
    "WanImageToVideo": {"width": 64, "height": 48, "length": 5},
    "SVD_img2vid_Conditioning": {"width": 64, "height": 64, "video_frames": 6},
    "WanVaceToVideo": {"width": 64, "height": 48, "length": 9},
    "KSampler": {"steps": 2},
}
# The SVD template makes its start image with SDXL (no fixture): that stage is replaced by the start image.
SDXL_STAGE = {"txt_to_image_to_video": ("16", "17", "18", "19", "20", "21", "22")}
OUTPUT_NODES = {"SaveVideo", "CreateVideo", "PreviewImage"}


def model_only_loras(prompt: dict) -> dict:
    """LoraLoader -> LoraLoaderModelOnly (its text-encoder side bypassed), so that the fixture text
    embedding can take the text encoder's place; the LoRA's weights still patch the diffusion model."""
    for node_id, node in list(prompt.items()):
        if node["class_type"] != "LoraLoader":
            continue
        for target, input_name in list(consumers(prompt, node_id, 1)):
            prompt[target]["inputs"][input_name] = node["inputs"]["clip"]
        inputs = node["inputs"]
        prompt[node_id] = {"class_type": "LoraLoaderModelOnly", "_meta": node.get("_meta", {}), "inputs": {
            "model": inputs["model"], "lora_name": inputs["lora_name"], "strength_model": inputs["strength_model"]}}
    return prompt


def template_prompt(name: str, object_info: dict) -> dict:
    """The template as the API prompt it queues, on the fixtures: text encoders and CLIP vision swapped,
    the start image is the pack's example input, sizes and steps small, the video saved as frames and
    the sampled latent saved too."""
    prompt = ui_to_api(json.loads((TEMPLATES / f"{name}.json").read_text()), object_info)
    for node_id in SDXL_STAGE.get(name, ()):
        del prompt[node_id]
    for node_id, node in list(prompt.items()):
        for input_name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] not in prompt:  # was the SDXL stage's image
                prompt["900"] = {"class_type": "LoadImage", "inputs": {"image": START_IMAGE}}
                node["inputs"][input_name] = ["900", 0]
    prompt = swap_encoders(model_only_loras(prompt))
    for node_id in [k for k, n in prompt.items() if n["class_type"] in OUTPUT_NODES]:
        del prompt[node_id]
    for node in prompt.values():
        node["inputs"].update(SMALL.get(node["class_type"], {}))
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = START_IMAGE
    [sampler] = [k for k, n in prompt.items() if n["class_type"] == "KSampler"]
    [decode] = [k for k, n in prompt.items() if n["class_type"] == "VAEDecode"]
    prompt["950"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": name}}
    prompt["951"] = {"class_type": "SaveImage", "inputs": {"images": [decode, 0], "filename_prefix": name}}
    return prompt


def with_pack_nodes(prompt: dict) -> dict:
    """The same prompt with the pack's nodes inserted where a user puts them."""
    prompt = copy.deepcopy(prompt)
    [sampler] = [k for k, n in prompt.items() if n["class_type"] == "KSampler"]
    [decode] = [k for k, n in prompt.items() if n["class_type"] == "VAEDecode"]
    prompt["300"] = {"class_type": "StreamlineFeatureSlicer",
                     "inputs": {"model": prompt[sampler]["inputs"]["model"], "frame_chunks": 0, "strip_chunks": 0}}
    prompt["301"] = {"class_type": "StreamlineOperatorGrouper", "inputs": {"model": ["300", 0]}}
    prompt[sampler]["inputs"]["model"] = ["301", 0]
    prompt["302"] = {"class_type": "StreamlineVAESlicer", "inputs": {
        "vae": prompt[decode]["inputs"]["vae"], "frame_chunks": 0, "strip_chunks": 2, "group_ops": True,
        "offload_frames": False}}
    prompt[decode]["inputs"]["vae"] = ["302", 0]
    prompt["303"] = {"class_type": "StreamlineMemoryMonitor", "inputs": {"value": [decode, 0],
                                                                         "report_prefix": "official_template"}}
    for target, input_name in list(consumers(prompt, decode, 0)):
        if target != "303":
            prompt[target]["inputs"][input_name] = ["303", 0]
    for node in prompt.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] += "_streamline"
    return prompt


def _outputs(result, comfy_server):
    files = result.files(comfy_server.output_dir)
    latent = load_file(next(p for p in files if p.suffix == ".latent"))["latent_tensor"]
    frames = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(files) if p.suffix == ".png"])
    return latent, frames


@pytest.mark.parametrize("name", ["text_to_video_wan", "image_to_video_wan", "txt_to_image_to_video",
                                  "video_wan_vace_14B_t2v"])
def test_pack_nodes_in_an_official_template_give_its_output(comfy_server, name):
    object_info = comfy_server.object_info()
    stock_prompt = template_prompt(name, object_info)
    stock = comfy_server.run(stock_prompt)
    assert stock.status == "success", stock.error
    streamline = comfy_server.run(with_pack_nodes(stock_prompt))
    assert streamline.status == "success", streamline.error
    (stock_latent, stock_frames), (latent, frames) = _outputs(stock, comfy_server), _outputs(streamline, comfy_server)
    assert latent.shape == stock_latent.shape
    assert ((latent - stock_latent).abs().max() / stock_latent.abs().max()).item() <= 1e-4
    assert frames.shape == stock_frames.shape and len(frames) > 1
    assert np.abs(frames - stock_frames).max() <= 1  # 8-bit rounding of equal values
    assert streamline.outputs["303"]["text"][0].startswith("peak RAM")
    log = comfy_server.log()
    assert "lora key not loaded" not in log and "does not match" not in log  # LoRA applied, nothing fell back
