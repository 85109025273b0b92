"""Writes the shipped example workflows from the specs below:
- api_workflows/<name>.json: the API-format twin (what the HTTP API takes; every node has `_meta.title`);
- example_workflows/<name>.json: the UI workflow, made from the twin by the real frontend (node titles,
  links, widgets, layout) plus a Note saying which files go where;
- example_workflows/<name>.jpg: its thumbnail for ComfyUI's Templates dialog (a square screenshot of the graph around the pack's nodes);
- example_workflows/input/: the example input files the workflows' LoadImage nodes read.
The specs use the model files under the names ComfyUI's own templates use
(comfyui-workflow-templates). Run: .venv/bin/python scripts/export_ui_workflows.py [name ...]
[--thumbnails: redraw only the thumbnails of the workflows as they are]"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.browser import api_to_ui_workflow, frontend_page, thumbnail  # noqa: E402
from devkit.comfy_server import ComfyServer  # noqa: E402
from devkit.demo_assets import prepare_base_dir, write_example_inputs  # noqa: E402
from devkit.workflows import API_DIR, EXAMPLE_INPUTS_DIR, EXAMPLES_DIR  # noqa: E402

WAN21_T2V = "wan2.1_t2v_1.3B_fp16.safetensors"
WAN21_I2V = "wan2.1_i2v_480p_14B_fp16.safetensors"
WAN22_HIGH = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
WAN22_LOW = "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
# DualParal sends each rank its layers, which fp8-scaled layers cannot be: the fp16 files of the same
# repository (ComfyUI's templates name their fp8_scaled twins)
WAN22_I2V_HIGH = "wan2.2_i2v_high_noise_14B_fp16.safetensors"
WAN22_I2V_LOW = "wan2.2_i2v_low_noise_14B_fp16.safetensors"
WAN22_5B = "wan2.2_ti2v_5B_fp16.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN21_VAE = "wan_2.1_vae.safetensors"
WAN22_VAE = "wan2.2_vae.safetensors"
CLIP_VISION_H = "clip_vision_h.safetensors"
SVD_XT = "svd_xt.safetensors"
# Where each file is downloaded from, as ComfyUI's own templates give it (node properties "models": the
# frontend's missing-models dialog offers these downloads).
WAN21_REPO = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
WAN22_REPO = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
MODEL_URLS = {
    WAN21_T2V: f"{WAN21_REPO}/diffusion_models/{WAN21_T2V}", WAN21_I2V: f"{WAN21_REPO}/diffusion_models/{WAN21_I2V}",
    WAN22_HIGH: f"{WAN22_REPO}/diffusion_models/{WAN22_HIGH}", WAN22_LOW: f"{WAN22_REPO}/diffusion_models/{WAN22_LOW}",
    WAN22_I2V_HIGH: f"{WAN22_REPO}/diffusion_models/{WAN22_I2V_HIGH}",
    WAN22_I2V_LOW: f"{WAN22_REPO}/diffusion_models/{WAN22_I2V_LOW}",
    WAN22_5B: f"{WAN22_REPO}/diffusion_models/{WAN22_5B}", UMT5: f"{WAN21_REPO}/text_encoders/{UMT5}",
    WAN21_VAE: f"{WAN21_REPO}/vae/{WAN21_VAE}", WAN22_VAE: f"{WAN22_REPO}/vae/{WAN22_VAE}",
    CLIP_VISION_H: f"{WAN21_REPO}/clip_vision/{CLIP_VISION_H}",
    SVD_XT: f"https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt/resolve/main/{SVD_XT}",
}
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae",
                  "CLIPVisionLoader": "clip_vision", "ImageOnlyCheckpointLoader": "checkpoints"}


def with_model_links(workflow: dict) -> dict:
    """Each loader's file with its download address and folder, as ComfyUI's templates carry them."""
    for node in workflow["nodes"]:
        folder = LOADER_FOLDERS.get(node["type"])
        name = (node.get("widgets_values") or [None])[0]
        if folder and name in MODEL_URLS:
            node.setdefault("properties", {})["models"] = [{"name": name, "url": MODEL_URLS[name], "directory": folder}]
    return workflow
START_IMAGE = "streamline_start_image.png"
SPRITE_CLIP = "streamline_sprites_clip.webp"
SPRITE_STILL = "streamline_sprites_still.png"

T2V_PROMPT = "a fox moving quickly in a beautiful winter scenery nature trees mountains daytime tracking camera"
I2V_PROMPT = "the yellow disc rolls slowly to the right over the coloured background, smooth camera"
NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
            "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
            "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def n(class_type, title, **inputs):
    return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}


def text_encoders(positive=T2V_PROMPT):
    return {
        "15": n("CLIPLoader", "Load umt5-xxl (text_encoders)", clip_name=UMT5, type="wan", device="default"),
        "3": n("CLIPTextEncode", "Positive prompt", text=positive, clip=["15", 0]),
        "4": n("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["15", 0]),
    }


def outputs(prefix, images, latent, fps=16.0, monitor_prefix=None):
    return {
        "9": n("StreamlineMemoryMonitor", "Memory Monitor", value=images, report_prefix=monitor_prefix or prefix),
        "10": n("SaveAnimatedWEBP", "Save video", images=["9", 0], filename_prefix=f"streamline/{prefix}",
                fps=fps, lossless=False, quality=85, method="default"),
        "11": n("SaveLatent", "Save latent", samples=latent, filename_prefix=f"streamline/{prefix}"),
    }


def sliced(model, vae, ids=("12", "13", "14")):
    slicer, grouper, vae_slicer = ids
    nodes = {slicer: n("StreamlineFeatureSlicer", "Feature Slicer", model=model, frame_chunks=0, strip_chunks=0),
             grouper: n("StreamlineOperatorGrouper", "Operator Grouper", model=[slicer, 0])}
    if vae_slicer:
        nodes[vae_slicer] = n("StreamlineVAESlicer", "VAE Slicer", vae=vae, frame_chunks=0, strip_chunks=0,
                              group_ops=True, offload_frames=False)
    return nodes


def ksampler(model, positive, negative, latent, steps=30, cfg=6.0, seed=7, sampler="uni_pc", scheduler="simple"):
    return n("KSampler", "KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
             scheduler=scheduler, positive=positive, negative=negative, latent_image=latent, denoise=1.0)


def wan21_t2v_base(length=33):
    return {
        "1": n("UNETLoader", "Load Wan 2.1 T2V 1.3B (diffusion_models)", unet_name=WAN21_T2V, weight_dtype="default"),
        "2": n("VAELoader", "Load Wan 2.1 VAE (vae)", vae_name=WAN21_VAE),
        **text_encoders(),
        "5": n("ModelSamplingSD3", "Shift", model=["1", 0], shift=8.0),
        "6": n("EmptyHunyuanLatentVideo", "Empty video latent", width=832, height=480, length=length, batch_size=1),
        "8": n("VAEDecode", "VAE Decode", samples=["7", 0], vae=["2", 0]),
    }


def wan21_t2v_sliced():
    return {**wan21_t2v_base(), "7": ksampler(["13", 0], ["3", 0], ["4", 0], ["6", 0]),
            "8": n("VAEDecode", "VAE Decode", samples=["7", 0], vae=["14", 0]),
            **sliced(["5", 0], ["2", 0]), **outputs("wan21_t2v_sliced", ["8", 0], ["7", 0], monitor_prefix="wan21_t2v")}


def wan21_t2v_planner():
    return {**wan21_t2v_base(), "7": ksampler(["12", 0], ["3", 0], ["4", 0], ["6", 0]),
            "12": n("StreamlineMemoryPlanner", "Memory Planner", model=["5", 0], latent=["6", 0], budget_gib=6.0,
                    cfg=True),
            "13": n("PreviewAny", "Plan", source=["12", 1]),
            **outputs("wan21_t2v_planned", ["8", 0], ["7", 0])}


def wan21_t2v_dualparal():
    base = wan21_t2v_base(length=161)
    return {**base, "7": n("StreamlineDualParalSampler", "DualParal Multi-GPU Sampler", model=["5", 0],
                           positive=["3", 0], negative=["4", 0], latent_image=["6", 0], seed=7, steps=30, cfg=6.0,
                           sampler_name="uni_pc", scheduler="simple", devices="auto", frames_per_block=4,
                           cache_frames=2, denoise=1.0, low_noise_from_step=10,  # the widgets' defaults: one model
                           experts_on_ranks="auto"),
            "12": n("PreviewAny", "DualParal report", source=["7", 1]),
            **outputs("wan21_t2v_dualparal", ["8", 0], ["7", 0])}


def wan21_i2v():
    return {
        "1": n("UNETLoader", "Load Wan 2.1 I2V 480p 14B (diffusion_models)", unet_name=WAN21_I2V, weight_dtype="default"),
        "2": n("VAELoader", "Load Wan 2.1 VAE (vae)", vae_name=WAN21_VAE),
        **text_encoders(I2V_PROMPT),
        "16": n("CLIPVisionLoader", "Load CLIP vision H (clip_vision)", clip_name=CLIP_VISION_H),
        "18": n("LoadImage", "Start image", image=START_IMAGE),
        "17": n("CLIPVisionEncode", "CLIP Vision Encode", clip_vision=["16", 0], image=["18", 0], crop="none"),
        "5": n("ModelSamplingSD3", "Shift", model=["1", 0], shift=8.0),
        "6": n("WanImageToVideo", "Wan image to video", positive=["3", 0], negative=["4", 0], vae=["2", 0],
               width=832, height=480, length=33, batch_size=1, clip_vision_output=["17", 0], start_image=["18", 0]),
        "7": ksampler(["13", 0], ["6", 0], ["6", 1], ["6", 2], steps=20),
        "8": n("VAEDecode", "VAE Decode", samples=["7", 0], vae=["14", 0]),
        **sliced(["5", 0], ["2", 0]), **outputs("wan21_i2v_sliced", ["8", 0], ["7", 0]),
    }


def wan22_a14b():
    def advanced(model, latent, add_noise, start, end, leftover, seed):
        return n("KSamplerAdvanced", f"KSampler ({'high' if add_noise == 'enable' else 'low'}-noise expert)",
                 model=model, add_noise=add_noise, noise_seed=seed, steps=20, cfg=3.5, sampler_name="euler",
                 scheduler="simple", positive=["3", 0], negative=["4", 0], latent_image=latent, start_at_step=start,
                 end_at_step=end, return_with_leftover_noise=leftover)
    return {
        "1": n("UNETLoader", "Load Wan 2.2 T2V A14B high noise (diffusion_models)", unet_name=WAN22_HIGH,
               weight_dtype="default"),
        "21": n("UNETLoader", "Load Wan 2.2 T2V A14B low noise (diffusion_models)", unet_name=WAN22_LOW,
                weight_dtype="default"),
        "2": n("VAELoader", "Load Wan 2.1 VAE (vae)", vae_name=WAN21_VAE),
        **text_encoders(),
        "5": n("ModelSamplingSD3", "Shift (high noise)", model=["1", 0], shift=8.0),
        "25": n("ModelSamplingSD3", "Shift (low noise)", model=["21", 0], shift=8.0),
        "6": n("EmptyHunyuanLatentVideo", "Empty video latent", width=832, height=480, length=81, batch_size=1),
        **sliced(["5", 0], ["2", 0]),
        **{k: {**v, "_meta": {"title": v["_meta"]["title"] + " (low noise)"}}
           for k, v in sliced(["25", 0], None, ("22", "23", None)).items()},
        "7": advanced(["13", 0], ["6", 0], "enable", 0, 10, "enable", 7),
        "27": advanced(["23", 0], ["7", 0], "disable", 10, 10000, "disable", 0),
        "8": n("VAEDecode", "VAE Decode", samples=["27", 0], vae=["14", 0]),
        **outputs("wan22_t2v_a14b_sliced", ["8", 0], ["27", 0]),
    }


def wan22_i2v_dualparal():
    return {
        "1": n("UNETLoader", "Load Wan 2.2 I2V A14B high noise (diffusion_models)", unet_name=WAN22_I2V_HIGH,
               weight_dtype="default"),
        "21": n("UNETLoader", "Load Wan 2.2 I2V A14B low noise (diffusion_models)", unet_name=WAN22_I2V_LOW,
                weight_dtype="default"),
        "2": n("VAELoader", "Load Wan 2.1 VAE (vae)", vae_name=WAN21_VAE),
        **text_encoders(I2V_PROMPT),
        "18": n("LoadImage", "Start image", image=START_IMAGE),
        "5": n("ModelSamplingSD3", "Shift (high noise)", model=["1", 0], shift=8.0),
        "25": n("ModelSamplingSD3", "Shift (low noise)", model=["21", 0], shift=8.0),
        "6": n("WanImageToVideo", "Wan image to video", positive=["3", 0], negative=["4", 0], vae=["2", 0],
               width=832, height=480, length=161, batch_size=1, start_image=["18", 0]),
        "7": n("StreamlineDualParalSampler", "DualParal Multi-GPU Sampler (both experts)", model=["5", 0],
               positive=["6", 0], negative=["6", 1], latent_image=["6", 2], seed=7, steps=20, cfg=3.5,
               sampler_name="euler", scheduler="simple", devices="auto", frames_per_block=4, cache_frames=2,
               denoise=1.0, low_noise_model=["25", 0], low_noise_from_step=10, experts_on_ranks="auto"),
        "8": n("VAEDecode", "VAE Decode", samples=["7", 0], vae=["2", 0]),
        "12": n("PreviewAny", "DualParal report", source=["7", 1]),
        **outputs("wan22_i2v_a14b_dualparal", ["8", 0], ["7", 0]),
    }


def wan22_ti2v_5b():
    return {
        "1": n("UNETLoader", "Load Wan 2.2 TI2V 5B (diffusion_models)", unet_name=WAN22_5B, weight_dtype="default"),
        "2": n("VAELoader", "Load Wan 2.2 VAE (vae)", vae_name=WAN22_VAE),
        **text_encoders(I2V_PROMPT),
        "18": n("LoadImage", "Start image", image=START_IMAGE),
        "5": n("ModelSamplingSD3", "Shift", model=["1", 0], shift=8.0),
        "6": n("Wan22ImageToVideoLatent", "Wan 2.2 image to video latent", vae=["2", 0], width=1280, height=704,
               length=121, batch_size=1, start_image=["18", 0]),
        "7": ksampler(["13", 0], ["3", 0], ["4", 0], ["6", 0], steps=20, cfg=5.0),
        "8": n("VAEDecode", "VAE Decode", samples=["7", 0], vae=["14", 0]),
        **sliced(["5", 0], ["2", 0]), **outputs("wan22_ti2v_5b_sliced", ["8", 0], ["7", 0], fps=24.0),
    }


def svd_xt():
    return {
        "1": n("ImageOnlyCheckpointLoader", "Load SVD-XT (checkpoints)", ckpt_name=SVD_XT),
        "3": n("LoadImage", "Start image", image=START_IMAGE),
        "4": n("SVD_img2vid_Conditioning", "SVD img2vid conditioning", clip_vision=["1", 1], init_image=["3", 0],
               vae=["1", 2], width=1024, height=576, video_frames=25, motion_bucket_id=127, fps=6,
               augmentation_level=0.0),
        "5": n("VideoLinearCFGGuidance", "Video linear CFG", model=["1", 0], min_cfg=1.0),
        "6": ksampler(["12", 0], ["4", 0], ["4", 1], ["4", 2], steps=20, cfg=2.5, seed=42, sampler="euler",
                      scheduler="karras"),
        "7": n("VAEDecode", "VAE Decode", samples=["6", 0], vae=["13", 0]),
        **sliced(["5", 0], ["1", 2], ("11", "12", "13")),
        "8": n("StreamlineMemoryMonitor", "Memory Monitor", value=["7", 0], report_prefix="svd_img2vid_sliced"),
        "9": n("SaveAnimatedWEBP", "Save video", images=["8", 0], filename_prefix="streamline/svd_img2vid_sliced",
               fps=6.0, lossless=False, quality=85, method="default"),
        "10": n("SaveLatent", "Save latent", samples=["6", 0], filename_prefix="streamline/svd_img2vid_sliced"),
    }


def svd_xt_step_rehash():
    """SVD-XT with Step Rehash between the guidance and the slicing: 25 steps, the deep features
    refreshed every third step."""
    spec = svd_xt()
    spec["15"] = n("StreamlineStepRehash", "Step Rehash", model=["5", 0], interval=3, shallow_blocks=3,
                   full_first_steps=2, full_last_steps=1)
    spec["11"]["inputs"]["model"] = ["15", 0]
    spec["6"]["inputs"]["steps"] = 25
    spec["8"]["inputs"]["report_prefix"] = "svd_img2vid_step_rehash"
    for node in ("9", "10"):
        spec[node]["inputs"]["filename_prefix"] = "streamline/svd_img2vid_step_rehash"
    return spec


def cmd_reconstruction():
    return {
        "1": n("StreamlineCMDLoader", "CMD Loader", model_name="cmd_sprites64.safetensors"),
        "2": n("LoadImage", "Sprite clip (8 frames)", image=SPRITE_CLIP),
        "3": n("StreamlineCMDEncode", "CMD Encode", cmd_model=["1", 0], frames=["2", 0]),
        "4": n("StreamlineCMDDecoder", "CMD Content/Motion Decoder", cmd_model=["1", 0], content=["3", 0],
               motion=["3", 1]),
        "5": n("SaveAnimatedWEBP", "Save reconstruction", images=["4", 0],
               filename_prefix="streamline/cmd_reconstruction", fps=8.0, lossless=True, quality=100, method="default"),
        "6": n("SaveImage", "Save content frame", images=["3", 0], filename_prefix="streamline/cmd_content"),
    }


def cmd_generation():
    return {
        "1": n("StreamlineCMDLoader", "CMD Loader", model_name="cmd_sprites64.safetensors"),
        "2": n("LoadImage", "Content frame", image=SPRITE_STILL),
        "3": n("StreamlineCMDMotionSampler", "CMD Motion Sampler", cmd_model=["1", 0], content=["2", 0], seed=3,
               steps=20),
        "4": n("StreamlineCMDDecoder", "CMD Content/Motion Decoder", cmd_model=["1", 0], content=["2", 0],
               motion=["3", 0]),
        "5": n("SaveAnimatedWEBP", "Save video", images=["4", 0], filename_prefix="streamline/cmd_generation",
               fps=8.0, lossless=True, quality=100, method="default"),
    }


WAN_FILES = (f"- models/diffusion_models/{{unet}}\n- models/text_encoders/{UMT5}\n- models/vae/{{vae}}\n")
INPUT_NOTE = ("Input: copy the pack's example_workflows/input/{image} to ComfyUI/input/ "
              "(or pick your own image in the Load Image node).\n")
NOTES = {
    "wan2.1_t2v_1.3B_sliced": (
        "Wan 2.1 text-to-video 1.3B, sliced: Feature Slicer -> Operator Grouper on the model, VAE Slicer on the VAE "
        "(same video as without them, lower VRAM peak); Memory Monitor records every node.\n\nFiles:\n"
        + WAN_FILES.format(unet=WAN21_T2V, vae=WAN21_VAE)),
    "wan2.1_t2v_1.3B_planner": (
        "Wan 2.1 text-to-video 1.3B with the Memory Planner: it predicts the sampling peak of each slicing level "
        "and applies the least slicing that fits budget_gib (0 = the free VRAM); 'Plan' shows its choice.\n\n"
        "Files:\n" + WAN_FILES.format(unet=WAN21_T2V, vae=WAN21_VAE)),
    "wan2.1_t2v_1.3B_dualparal_long": (
        "A long Wan 2.1 video (161 frames = 10 s at 16 fps) with the DualParal Multi-GPU Sampler: block-wise "
        "denoising pipelined over every visible GPU (devices 'auto'; or e.g. 'cuda:0,cuda:1'); memory per GPU "
        "stays flat in the length. 'DualParal report' shows each rank's layers, time and peak.\n\nFiles:\n"
        + WAN_FILES.format(unet=WAN21_T2V, vae=WAN21_VAE)),
    "wan2.1_i2v_480p_sliced": (
        "Wan 2.1 image-to-video 480p 14B, sliced (Feature Slicer -> Operator Grouper, VAE Slicer), Memory Monitor.\n\n"
        "Files:\n" + WAN_FILES.format(unet=WAN21_I2V, vae=WAN21_VAE) + f"- models/clip_vision/{CLIP_VISION_H}\n\n"
        + INPUT_NOTE.format(image=START_IMAGE)),
    "wan2.2_t2v_A14B_sliced": (
        "Wan 2.2 text-to-video A14B: the high-noise expert samples steps 0-10, the low-noise expert the rest; "
        "each expert has its own Feature Slicer -> Operator Grouper, the VAE its VAE Slicer; Memory Monitor.\n\n"
        f"Files:\n- models/diffusion_models/{WAN22_HIGH}\n- models/diffusion_models/{WAN22_LOW}\n"
        f"- models/text_encoders/{UMT5}\n- models/vae/{WAN21_VAE}\n"),
    "wan2.2_i2v_A14B_dualparal_long": (
        "A long Wan 2.2 image-to-video A14B video (161 frames = 10 s at 16 fps) with the DualParal Multi-GPU Sampler: "
        "both experts split over the same GPUs (devices 'auto'), the high-noise one for steps 0-9, the low-noise one "
        "from step 10 (as ComfyUI's two-KSamplerAdvanced workflow); every GPU holds its layers of both. "
        "'DualParal report' shows each rank's layers, time and peak.\n\n"
        f"Files:\n- models/diffusion_models/{WAN22_I2V_HIGH}\n- models/diffusion_models/{WAN22_I2V_LOW}\n"
        f"- models/text_encoders/{UMT5}\n- models/vae/{WAN21_VAE}\n\n" + INPUT_NOTE.format(image=START_IMAGE)),
    "wan2.2_ti2v_5B_sliced": (
        "Wan 2.2 TI2V 5B (text + start image to video, 1280x704, 24 fps), sliced (Feature Slicer -> Operator Grouper, "
        "VAE Slicer on the Wan 2.2 VAE); Memory Monitor. For text-to-video, remove the start image link.\n\n"
        "Files:\n" + WAN_FILES.format(unet=WAN22_5B, vae=WAN22_VAE) + "\n" + INPUT_NOTE.format(image=START_IMAGE)),
    "svd_xt_img2vid_sliced": (
        "Stable Video Diffusion XT image-to-video (25 frames, 1024x576), sliced: Feature Slicer -> Operator Grouper "
        "on the UNet, VAE Slicer decodes all frames together; Memory Monitor.\n\n"
        f"Files:\n- models/checkpoints/{SVD_XT} (UNet, VAE and CLIP vision in one file)\n\n"
        + INPUT_NOTE.format(image=START_IMAGE)),
    "svd_xt_img2vid_step_rehash": (
        "Stable Video Diffusion XT image-to-video with Step Rehash: the UNet's deep blocks run on every third step "
        "(and the first two and the last), the steps between reuse their features and run only the first "
        "resolution level: faster sampling at a small quality cost (docs/step_rehash.md). Sliced as the "
        "svd_xt_img2vid_sliced example; Memory Monitor.\n\n"
        f"Files:\n- models/checkpoints/{SVD_XT} (UNet, VAE and CLIP vision in one file)\n\n"
        + INPUT_NOTE.format(image=START_IMAGE)),
    "cmd_reconstruction": (
        "CMD: a video as one content frame + a small motion latent. CMD Encode splits an 8-frame 64x64 clip, "
        "the decoder rebuilds it. The weights ship with the pack (models/cmd/cmd_sprites64.safetensors).\n\n"
        + INPUT_NOTE.format(image=SPRITE_CLIP).replace("image in the Load Image node", "8-frame 64x64 clip")),
    "cmd_generation": (
        "CMD generation: the CMD Motion Sampler makes motion for a content frame (any 64x64 image, e.g. from an "
        "image workflow), the decoder turns it into 8 frames. Weights ship with the pack.\n\n"
        + INPUT_NOTE.format(image=SPRITE_STILL)),
}
SPECS = {
    "wan2.1_t2v_1.3B_sliced": wan21_t2v_sliced, "wan2.1_t2v_1.3B_planner": wan21_t2v_planner,
    "wan2.1_t2v_1.3B_dualparal_long": wan21_t2v_dualparal, "wan2.1_i2v_480p_sliced": wan21_i2v,
    "wan2.2_t2v_A14B_sliced": wan22_a14b, "wan2.2_ti2v_5B_sliced": wan22_ti2v_5b,
    "wan2.2_i2v_A14B_dualparal_long": wan22_i2v_dualparal,
    "svd_xt_img2vid_sliced": svd_xt, "svd_xt_img2vid_step_rehash": svd_xt_step_rehash,
    "cmd_reconstruction": cmd_reconstruction, "cmd_generation": cmd_generation,
}


def main():
    thumbnails_only = "--thumbnails" in sys.argv  # redraw the thumbnails of the shipped workflows only
    only = set(sys.argv[1:]) - {"--thumbnails"}
    API_DIR.mkdir(exist_ok=True)
    EXAMPLES_DIR.mkdir(exist_ok=True)
    write_example_inputs(EXAMPLE_INPUTS_DIR)
    with tempfile.TemporaryDirectory() as base:
        prepare_base_dir(Path(base))
        with ComfyServer(Path(base)) as server, frontend_page(server.url) as page:
            for name, spec in SPECS.items():
                if only and name not in only:
                    continue
                if thumbnails_only:
                    thumbnail(page, json.loads((EXAMPLES_DIR / f"{name}.json").read_text()), EXAMPLES_DIR / f"{name}.jpg")
                    print(f"wrote example_workflows/{name}.jpg")
                    continue
                prompt = dict(sorted(spec().items(), key=lambda item: int(item[0])))
                (API_DIR / f"{name}.json").write_text(json.dumps(prompt, indent=1, ensure_ascii=False) + "\n")
                workflow = with_model_links(api_to_ui_workflow(page, prompt, name, note=NOTES[name]))
                (EXAMPLES_DIR / f"{name}.json").write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n")
                thumbnail(page, workflow, EXAMPLES_DIR / f"{name}.jpg")
                print(f"wrote example_workflows/{name}.json + .jpg, api_workflows/{name}.json")


if __name__ == "__main__":
    main()
