"""Feature Slicer / Operator Grouper / VAE Slicer against stock ComfyUI 0.3.75, in one run.

Memory: activation peaks of full-size SVD img2vid (UNet forward with CFG, temporal VAE decode),
576x1024 fp16, under fake tensors with the dispatch-level live-storage tracker (SDPA attention); the
offloaded decode runs on a fake "cuda" device and counts GPU storage only.
Output differences and CPU latency: real tensors on the tiny SVD UNet and the real-size temporal VAE
at a reduced resolution with random weights (the micro SVD UNet: 64 channels, two levels). Writes bench/results/slicing_peaks.json and .png."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devkit import model_fixtures  # noqa: E402
from devkit.comfy_env import import_comfyui, import_pack  # noqa: E402
from reporting import RESULTS, cpu_machine, pyplot, write_json  # noqa: E402
from stock_peaks import FP16, GIB, measure, svd_unet, svd_vae_decode  # noqa: E402

SETTINGS = {  # name -> SliceSettings arguments (None: stock)
    "stock": None,
    "Feature Slicer (auto)": dict(group_ops=False),
    "Slicer + Operator Grouper (auto)": dict(group_ops=True),
}


def slicer(arguments):
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing
    if arguments is None:
        return None
    return lambda module: apply_slicing(module, SliceSettings(**arguments))


def tiled_decode_peak(frames, tracker_cls):
    """ComfyUI's VAEDecodeTiled path for this VAE (512 px tiles, 64 px overlap): every frame alone."""
    import comfy.sd
    import comfy.utils
    from types import SimpleNamespace

    def forward(first_stage_model):
        vae = SimpleNamespace(first_stage_model=first_stage_model, vae_dtype=FP16, device="cpu",
                              upscale_ratio=8, output_device="cpu",
                              process_output=lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0))
        comfy.sd.VAE.decode_tiled_(vae, torch.empty(frames, 4, 72, 128, dtype=FP16), 64, 64, 8)
    meta_vae = model_fixtures.build_svd_vae().first_stage_model.to("meta", FP16)
    return measure(meta_vae, forward, tracker_cls)


def memory_rows(tracker_cls):
    rows = []
    for frames in (14, 25):
        for name, arguments in SETTINGS.items():
            peak, weights = svd_unet(frames, tracker_cls, slicer(arguments))
            rows.append(dict(part="UNet", frames=frames, method=name, peak_gib=peak / GIB, weights_gib=weights / GIB))
        decode_methods = {
            "stock, all frames at once": lambda: svd_vae_decode(frames, tracker_cls),
            "stock, 7-frame batches (context cut)": lambda: svd_vae_decode(7, tracker_cls),
            "stock, 1-frame batches (no context)": lambda: svd_vae_decode(1, tracker_cls),
            "VAEDecodeTiled 512/64 (no context)": lambda: tiled_decode_peak(frames, tracker_cls),
            "VAE Slicer (auto, grouped), all frames": lambda: svd_vae_decode(
                frames, tracker_cls, slicer(dict(group_ops=True))),
            "VAE Slicer + offload_frames (GPU side), all frames": lambda: svd_vae_decode(
                frames, tracker_cls, slicer(dict(group_ops=True, offload_frames=True)), device="cuda"),
        }
        for name, run in decode_methods.items():
            peak, weights = run()
            rows.append(dict(part="VAE decode", frames=frames, method=name, peak_gib=peak / GIB,
                             weights_gib=weights / GIB))
        for row in rows[-9:]:
            print(f"{row['part']} {frames}f {row['method']}: {row['peak_gib']:.2f} GiB")
    return rows


def diffusers_rows(tracker_cls):
    """The same core on diffusers' SVD classes (the setting of FME's paper), 14 frames."""
    frames, rows = 14, []
    for name, arguments in [("stock", None), ("Slicer + Operator Grouper (auto)", dict(group_ops=True))]:
        def unet_forward(unet):
            unet(torch.empty(2, frames, 8, 72, 128, dtype=FP16), torch.tensor(10.0),
                 torch.empty(2, 1, 1024, dtype=FP16), torch.empty(2, 3, dtype=FP16))
        unet = model_fixtures.build_diffusers_svd_unet("full", FP16, "meta")
        peak, weights = measure(unet, unet_forward, tracker_cls, slicer(arguments))
        rows.append(dict(part="diffusers UNet", frames=frames, method=name, peak_gib=peak / GIB, weights_gib=weights / GIB))
        vae = model_fixtures.build_diffusers_svd_vae("full", FP16, "meta")
        peak, weights = measure(vae, lambda v: v.decode(torch.empty(frames, 4, 72, 128, dtype=FP16), num_frames=frames),
                                tracker_cls, slicer(arguments))
        rows.append(dict(part="diffusers VAE decode", frames=frames, method=name, peak_gib=peak / GIB,
                         weights_gib=weights / GIB))
    for row in rows:
        print(f"{row['part']} {frames}f {row['method']}: {row['peak_gib']:.2f} GiB")
    return rows


def timed(function, repeats=1):
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return result, (time.perf_counter() - started) / repeats


def quality_and_latency_rows():
    """Output difference vs the full-context stock decode, and CPU time, on real tensors."""
    from comfyui_streamline.core.slicing import SliceSettings, apply_slicing, remove_slicing
    import comfy.utils

    rows = []
    torch.manual_seed(0)
    vae = model_fixtures.build_svd_vae()
    decoder_model = vae.first_stage_model
    latent = torch.randn(14, 4, 12, 16)  # 14 frames at 96x128
    with torch.inference_mode():
        reference, stock_time = timed(lambda: decoder_model.decode(latent))
        scale = reference.abs().max()
        batched = torch.cat([decoder_model.decode(part) for part in latent.split(7)])
        tiled = comfy.utils.tiled_scale(latent, decoder_model.decode, 8, 8, 2, upscale_amount=8)
        apply_slicing(decoder_model.decoder, SliceSettings(group_ops=True))
        sliced, sliced_time = timed(lambda: decoder_model.decode(latent))
        remove_slicing(decoder_model.decoder)
    for method, output, seconds in [("stock, 7-frame batches (context cut)", batched, None),
                                    ("tiled 64/16 px, frame by frame", tiled, None),
                                    ("VAE Slicer (auto, grouped), all frames", sliced, sliced_time)]:
        rows.append(dict(part="VAE decode 14f 96x128", method=method,
                         max_abs_diff_vs_full_context=((output - reference).abs().max() / scale).item(),
                         cpu_time_ratio=None if seconds is None else seconds / stock_time))

    unet = model_fixtures.build_svd("micro").diffusion_model
    frames = 14
    x, t = torch.randn(2 * frames, 8, 24, 32), torch.full((2 * frames,), 0.5)
    context, y = torch.randn(2 * frames, 1, 1024), torch.randn(2 * frames, 768)
    with torch.inference_mode():
        run = lambda: unet(x, t, context=context, y=y, num_video_frames=frames)  # noqa: E731
        reference, stock_time = timed(run)
        for name, arguments in list(SETTINGS.items())[1:]:
            apply_slicing(unet, SliceSettings(**arguments))
            output, seconds = timed(run)
            remove_slicing(unet)
            rows.append(dict(part="UNet micro 14f CFG 192x256", method=name,
                             max_abs_diff_vs_full_context=((output - reference).abs().max() / reference.abs().max()).item(),
                             cpu_time_ratio=seconds / stock_time))
    for row in rows:
        print(row)
    return rows


def main():
    import_comfyui()
    import_pack()
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    memory = memory_rows(LiveStorageTracker)
    memory += diffusers_rows(LiveStorageTracker)
    quality = quality_and_latency_rows()
    machine = cpu_machine()
    summary = end_to_end(memory)
    write_json("slicing_peaks", {"machine": machine, "memory_fake_tensors": memory, "end_to_end": summary,
                                 "quality_latency": quality})
    plot(memory, machine)


def end_to_end(memory):
    """SVD img2vid 14f with weights. Sampling needs the UNet's weights and activations, decoding the
    VAE's; before the decode ComfyUI's model management (load_models_gpu -> free_memory) unloads the
    UNet when VRAM is short, so the smallest card that runs the workflow needs the larger phase.
    `all_resident`: both models' weights kept plus the larger activation peak."""
    def pick(part, method):
        return next(r for r in memory if r["part"] == part and r["frames"] == 14 and r["method"] == method)
    result = {}
    for label, unet_method, vae_method in [
            ("stock", "stock", "stock, all frames at once"),
            ("streamline", "Slicer + Operator Grouper (auto)", "VAE Slicer (auto, grouped), all frames"),
            ("streamline, offload_frames", "Slicer + Operator Grouper (auto)",
             "VAE Slicer + offload_frames (GPU side), all frames")]:
        unet, vae = pick("UNet", unet_method), pick("VAE decode", vae_method)
        phases = {"sampling_gib": unet["weights_gib"] + unet["peak_gib"],
                  "decode_gib": vae["weights_gib"] + vae["peak_gib"],
                  "all_resident_gib": unet["weights_gib"] + vae["weights_gib"] + max(unet["peak_gib"], vae["peak_gib"])}
        phases["workflow_peak_gib"] = max(phases["sampling_gib"], phases["decode_gib"])
        result[label] = phases
        print(f"SVD img2vid 14f end-to-end, {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    return result


def plot(rows, machine):
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1, 1, 0.6]})
    for ax, part in zip(axes, ("UNet", "VAE decode", "diffusers")):
        selected = [r for r in rows if r["part"] == part or (part == "diffusers" and r["part"].startswith(part))]
        labels = [f"{r['frames']}f {r['part'].replace('diffusers ', '') + ' ' if part == 'diffusers' else ''}{r['method']}"
                  for r in selected][::-1]
        ax.barh(labels, [r["peak_gib"] for r in selected][::-1],
                color=["#c44e52" if "stock" in l or "Tiled" in l else "#4c72b0" for l in labels])
        ax.set_xlabel("activation peak (GiB)")
        ax.set_title(f"SVD {part}, 576x1024 fp16", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"Streamline slicing vs stock ComfyUI 0.3.75 (fake tensors; {machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "slicing_peaks.png", dpi=110)


if __name__ == "__main__":
    main()
