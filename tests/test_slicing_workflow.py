"""The slicing nodes in a real headless ComfyUI: the example workflow samples and decodes exactly what
the same workflow without the nodes does."""
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import load_workflow

SVD, WAN_T2V = "svd_xt_img2vid_sliced", "wan2.1_t2v_1.3B_sliced"  # the shipped examples


def with_saved_frames(prompt: dict, prefix: str) -> dict:
    """The prompt with its decoded frames also saved as PNG, and its own output names."""
    decode = next(k for k, n in prompt.items() if n["class_type"] == "VAEDecode")
    for node in prompt.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] += f"_{prefix}"
    prompt["90"] = {"class_type": "SaveImage", "inputs": {"images": [decode, 0], "filename_prefix": prefix}}
    return prompt


def outputs(result, comfy_server):
    files = result.files(comfy_server.output_dir)
    latent = load_file(next(p for p in files if p.suffix == ".latent"))["latent_tensor"]
    frames = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(files) if p.suffix == ".png"])
    return latent, frames


def test_object_info_lists_the_slicing_nodes(comfy_server):
    info = comfy_server.object_info()
    for node_id, name in [("StreamlineFeatureSlicer", "Feature Slicer"),
                          ("StreamlineOperatorGrouper", "Operator Grouper"), ("StreamlineVAESlicer", "VAE Slicer")]:
        assert info[node_id]["display_name"] == name
        assert info[node_id]["category"] == "Streamline/memory"


def test_sliced_svd_workflow_matches_the_same_workflow_without_the_nodes(comfy_server):
    prompt = with_saved_frames(load_workflow(SVD), "svd_sliced")
    assert {"StreamlineFeatureSlicer", "StreamlineOperatorGrouper", "StreamlineVAESlicer"} <= \
        {n["class_type"] for n in prompt.values()}
    sliced = comfy_server.run(prompt)
    assert sliced.status == "success", sliced.error
    stock = comfy_server.run(with_saved_frames(load_workflow(SVD, stock=True), "svd_stock"))
    assert stock.status == "success", stock.error

    sliced_latent, sliced_frames = outputs(sliced, comfy_server)
    stock_latent, stock_frames = outputs(stock, comfy_server)
    frames = prompt["4"]["inputs"]["video_frames"]
    assert sliced_latent.shape == stock_latent.shape and sliced_latent.shape[0] == frames
    assert ((sliced_latent - stock_latent).abs().max() / stock_latent.abs().max()).item() <= 1e-4
    assert sliced_frames.shape == stock_frames.shape and len(sliced_frames) == frames
    assert np.abs(sliced_frames - stock_frames).max() <= 1  # 8-bit rounding of equal values


def test_negative_chunks_are_rejected_by_prompt_validation(comfy_server):
    from devkit.comfy_server import PromptRejected

    prompt = load_workflow(SVD)
    prompt["11"]["inputs"]["frame_chunks"] = -2
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(prompt)
    assert "frame_chunks" in str(rejected.value.body)


def test_vae_slicer_on_an_unsupported_vae_fails_clearly_and_the_next_prompt_runs(comfy_server):
    wan = load_workflow(WAN_T2V)
    wan["2"]["inputs"]["vae_name"] = "streamline_taesd_image_vae.safetensors"
    failed = comfy_server.run(wan)
    assert failed.status == "error"
    assert "VAE Slicer: this VAE is TAESD, which Streamline cannot slice" in failed.error["exception_message"]
    assert "Traceback" not in failed.error["exception_message"]
    assert comfy_server.run(load_workflow(SVD, stock=True)).status == "success"


def test_sliced_wan_workflow_matches_the_same_workflow_without_the_nodes(comfy_server):
    """Feature Slicer + Operator Grouper on the Wan DiT and the VAE Slicer on the Wan VAE: the sampled
    latent and the decoded frames equal the workflow's without the three nodes."""
    prompt = with_saved_frames(load_workflow(WAN_T2V), "wan_sliced")
    twin = with_saved_frames(load_workflow(WAN_T2V, stock=True), "wan_stock")
    sliced, stock = comfy_server.run(prompt), comfy_server.run(twin)
    assert stock.status == "success" and sliced.status == "success", sliced.error
    (stock_latent, stock_frames), (sliced_latent, sliced_frames) = outputs(stock, comfy_server), outputs(sliced, comfy_server)
    assert stock_latent.shape == sliced_latent.shape
    assert ((sliced_latent - stock_latent).abs().max() / stock_latent.abs().max()).item() <= 1e-4
    frames = prompt["6"]["inputs"]["length"]
    assert sliced_frames.shape == stock_frames.shape == (frames, 48, 64, 3)
    assert np.abs(sliced_frames - stock_frames).max() <= 1  # 8-bit rounding of equal values
