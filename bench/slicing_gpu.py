"""Feature Slicer / Operator Grouper / VAE Slicer on a real GPU, stock vs sliced in one run: peak
memory from torch.cuda statistics (activations: the peak above what was allocated before the call),
latency from CUDA-synchronised wall time, the output difference, and the Memory Planner's predicted
peak (fake tensors) next to the measured one. Full-size models (ComfyUI's
classes, random weights): SVD img2vid at 576x1024 fp16, 14 frames; Wan 2.1 1.3B DiT and the Wan 2.1
VAE decode at 480x832 bf16, 81 frames; the Wan DiT again with every layer offloaded (ComfyUI's
low-VRAM load). Writes bench/results/slicing_gpu.json.

Needs CUDA. `--smoke` runs the same code on the micro UNet and small latents on whatever device is
present (a check of the script, not a measurement)."""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import write_json  # noqa: E402

GIB = 1024 ** 3
UNET_SETTINGS = {"stock": None, "Feature Slicer (auto)": dict(group_ops=False),
                 "Slicer + Operator Grouper (auto)": dict(group_ops=True)}
VAE_SETTINGS = {"stock, all frames at once": None, "VAE Slicer (auto, grouped)": dict(group_ops=True),
                "VAE Slicer + offload_frames": dict(group_ops=True, offload_frames=True)}


def measured(run, device, repeats):
    """(output, seconds per call, activation peak in bytes or None off CUDA)."""
    run()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    for _ in range(repeats):
        output = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    return output, seconds, (torch.cuda.max_memory_allocated() - before) if cuda else None


def compare(module, forward, settings_table, device, repeats, part):
    """Stock vs each slicing of `forward(module)`, with the Memory Planner's prediction of the peak."""
    from comfyui_streamline.core.memory.predictor import predict_peak
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing

    rows, reference = [], None
    for method, arguments in settings_table.items():
        settings = None if arguments is None else SliceSettings(**arguments)
        predicted = predict_peak(module, lambda twin, _: forward(twin), settings, device.type)
        if settings is not None:
            apply_slicing(module, settings)
        try:
            with torch.inference_mode():
                output, seconds, peak = measured(lambda: forward(module), device, repeats)
        finally:
            remove_slicing(module)
        if reference is None:
            reference, stock_seconds = output, seconds
        rows.append(dict(part=part, method=method, seconds=seconds, time_ratio=seconds / stock_seconds,
                         peak_gib=None if peak is None else peak / GIB, predicted_gib=predicted / GIB,
                         max_abs_diff=((output.float() - reference.float()).abs().max()
                                       / reference.float().abs().max()).item()))
        print(rows[-1])
    return rows


def unet_rows(smoke, device, dtype, frames, height, width, repeats):
    batch = 2 * frames  # classifier-free guidance
    unet = model_fixtures.build_svd("micro" if smoke else "full", dtype, str(device)).diffusion_model
    x, t = torch.randn(batch, 8, height, width, device=device, dtype=dtype), torch.full((batch,), 0.5, device=device)
    context = torch.randn(batch, 1, 1024, device=device, dtype=dtype)
    y = torch.randn(batch, 768, device=device, dtype=dtype)
    indicator = torch.zeros(2, frames, device=device, dtype=dtype)
    return compare(unet, lambda m: m(x, t, context=context, y=y, num_video_frames=frames, image_only_indicator=indicator),
                   UNET_SETTINGS, device, repeats, f"UNet {frames}f CFG {height * 8}x{width * 8}")

WAN_SETTINGS = {"stock": None, "Slicer + Operator Grouper (auto)": dict(group_ops=True)}
WAN_VAE_SETTINGS = {"stock": None, "VAE Slicer (auto strips)": dict(), "VAE Slicer + offload_frames": dict(offload_frames=True)}


def wan_rows(smoke, device, repeats):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent_frames, height, width = (21, 60, 104) if not smoke else (3, 6, 8)  # 81 frames at 480x832
    model = model_fixtures.build_wan("tiny" if smoke else "1.3B", dtype, str(device)).diffusion_model
    x = torch.randn(1, 16, latent_frames, height, width, device=device, dtype=dtype)
    t = torch.full((1,), 0.5, device=device)
    context = torch.randn(1, 512, model_fixtures.WAN_TEXT_DIM, device=device, dtype=dtype)
    rows = compare(model, lambda m: m(x, t, context), WAN_SETTINGS, device, repeats,
                   f"Wan 2.1 DiT {4 * latent_frames - 3}f {height * 8}x{width * 8}")
    del model
    vae = model_fixtures.build_wan_vae("tiny" if smoke else "full").first_stage_model.to(device, dtype)
    return rows + compare(vae, lambda m: m.decode(x), WAN_VAE_SETTINGS, device, repeats,
                          f"Wan 2.1 VAE decode {4 * latent_frames - 3}f {height * 8}x{width * 8}")


def offloaded_wan_rows(smoke, device, repeats):
    """Wan 2.1 1.3B loaded as ComfyUI loads a model too big for the card: every layer left in host
    memory and copied to the GPU at each call (its low-VRAM load with no room); sliced layers fetch
    once per stage (issue 21)."""
    import comfy.model_patcher
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent_frames, height, width = (21, 60, 104) if not smoke else (3, 6, 8)
    patcher = comfy.model_patcher.ModelPatcher(model_fixtures.build_wan("tiny" if smoke else "1.3B", dtype, "cpu"),
                                               load_device=device, offload_device=torch.device("cpu"))
    patcher.patch_model(device_to=device, lowvram_model_memory=1)
    try:
        x = torch.randn(1, 16, latent_frames, height, width, device=device, dtype=dtype)
        t = torch.full((1,), 0.5, device=device)
        context = torch.randn(1, 512, model_fixtures.WAN_TEXT_DIM, device=device, dtype=dtype)
        return compare(patcher.model.diffusion_model, lambda m: m(x, t, context), WAN_SETTINGS, device, repeats,
                       f"Wan 2.1 DiT {4 * latent_frames - 3}f {height * 8}x{width * 8}, every layer offloaded")
    finally:
        patcher.unpatch_model()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    smoke = parser.parse_args().smoke
    import_comfyui()
    import_pack()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        sys.exit("bench/slicing_gpu.py needs a CUDA GPU (use --smoke to check the script elsewhere)")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    frames, (height, width), repeats = (14, (72, 128), 3) if not smoke else (5, (6, 8), 1)

    rows = unet_rows(smoke, device, dtype, frames, height, width, repeats)
    vae = model_fixtures.build_svd_vae().first_stage_model.to(device, dtype)
    latent = torch.randn(frames, 4, height, width, device=device, dtype=dtype)
    rows += compare(vae, lambda m: m.decode(latent), VAE_SETTINGS, device, repeats,
                    f"VAE decode {frames}f {height * 8}x{width * 8}")
    del vae
    rows += wan_rows(smoke, device, repeats)
    rows += offloaded_wan_rows(smoke, device, repeats)
    if smoke:
        return
    write_json("slicing_gpu", {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
