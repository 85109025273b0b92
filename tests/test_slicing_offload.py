"""offload_frames: the grouped video decoders keep their frames in host memory. Under fake tensors
on a stand-in accelerator (the meta device: no GPU, and no CUDA driver, which torch 2.9's CUDA build
needs even to index a fake "cuda" tensor) the accelerator-side peak grows only by the temporal
strips (all frames of a few columns) instead of by whole frames. At full size the peak is one
frame's work: bench/slicing_peaks.py measures 0.70 GiB at both 14 and 25 frames on fake "cuda"."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from devkit import model_fixtures


ACCELERATOR = "meta"


def gpu_decode_peak(build_meta_model, decode, frames, settings):
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker
    from comfyui_streamline.core.slicing import apply_slicing

    meta_model = build_meta_model()
    with FakeTensorMode():
        model = model_fixtures.materialize_fake(meta_model, ACCELERATOR)
        apply_slicing(model, settings)
        with torch.inference_mode(), LiveStorageTracker(ACCELERATOR) as tracker:
            out = decode(model, torch.empty(frames, 4, 16, 24, dtype=torch.float16, device=ACCELERATOR), frames)
    assert out.device.type == ACCELERATOR and out.shape[0] == frames
    return tracker.peak


def test_offloaded_frames_keep_the_gpu_peak_flat_in_the_frame_count(pack):
    from comfyui_streamline.core.slicing import SliceSettings

    decoders = {
        "ComfyUI": (lambda: model_fixtures.build_svd_vae().first_stage_model.to("meta", torch.float16),
                    lambda model, z, frames: model.decode(z)),
        "diffusers": (lambda: model_fixtures.build_diffusers_svd_vae("full", torch.float16, "meta"),
                      lambda model, z, frames: model.decode(z, num_frames=frames).sample),
    }
    for name, (build_meta_model, decode) in decoders.items():
        peaks = {(frames, offload): gpu_decode_peak(build_meta_model, decode, frames,
                                                    SliceSettings(group_ops=True, offload_frames=offload))
                 for frames in (4, 16) for offload in (False, True)}
        in_vram_growth = peaks[16, False] - peaks[4, False]
        offloaded_growth = peaks[16, True] - peaks[4, True]
        assert peaks[16, False] > 2 * peaks[4, False], name  # in VRAM: grows with whole frames
        assert offloaded_growth < in_vram_growth / 3, name
        assert peaks[16, True] < peaks[16, False] / 2, name
