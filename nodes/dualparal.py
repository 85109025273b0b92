"""DualParal Multi-GPU Sampler: block-wise, layer-pipelined sampling of long Wan videos over ranks
(glue.dualparal, core.dualparal)."""
from comfy_api.v0_0_2 import io

from ..core.dualparal import SAMPLERS
from ..glue.dualparal import EXPERT_PLACEMENTS, RESIDENT_SHARE, sample_with_report

DEVICES_TOOLTIP = ("auto: every visible GPU (one CPU rank without GPUs). A list such as cuda:0,cuda:1 for those "
                   "GPUs (NCCL), or cpu:N for N CPU processes (gloo). One device matching ComfyUI's runs here, "
                   "without worker processes. torchrun://HOST:PORT: the ranks of a torchrun cluster (one or several "
                   "machines) started with dualparal_cluster.py.")


def _schedulers() -> list:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


class DualParalSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineDualParalSampler",
            display_name="DualParal Multi-GPU Sampler",
            category="Streamline/multi-gpu",
            description="Samples a Wan video latent of any length block by block: blocks at decreasing "
                        "noise levels move through the model's layers split over several GPUs (or CPU processes), "
                        "with each layer's keys/values of the neighbouring block cached. Memory per device does not "
                        "grow with the video's length. Each block is sampled by ComfyUI's own sampler with the "
                        "MODEL's model sampling (ModelSamplingSD3 before it applies). Text-to-video, image-to-video "
                        "(WanImageToVideo / WanFirstLastFrameToVideo conditioning) and Wan 2.2 A14B's two experts.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 / 2.2 model; for Wan 2.2 A14B the high-noise expert "
                                                "(Feature Slicer settings apply inside every rank)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Its length is the video's length."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=30, min=1, max=10000),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler",
                               tooltip="ComfyUI's sampler, run for each block with its own state (multistep history, "
                                       "noise)."),
                io.Combo.Input("scheduler", options=_schedulers(), default="simple"),
                io.String.Input("devices", default="auto", tooltip=DEVICES_TOOLTIP),
                io.Int.Input("frames_per_block", default=10, min=1, max=4096,
                             tooltip="Latent frames per block (4 video frames each)."),
                io.Int.Input("cache_frames", default=5, min=0, max=4095,
                             tooltip="Frames of each neighbouring block every block sees: the previous block's last "
                                     "frames as tokens and the next block's first frames through the feature cache. "
                                     "Below frames per block."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Model.Input("low_noise_model", optional=True,
                               tooltip="Wan 2.2 A14B: the low-noise expert (`model` is then the high-noise one), "
                                       "split over the same ranks. Steps from low_noise_from_step on run it, as the "
                                       "second of ComfyUI's two KSamplerAdvanced nodes does."),
                io.Int.Input("low_noise_from_step", default=10, min=1, max=10000, optional=True,
                             tooltip="With a low-noise expert: its first step (ComfyUI's Wan 2.2 workflows switch "
                                     "halfway, e.g. 10 of 20)."),
                io.Combo.Input("experts_on_ranks", options=list(EXPERT_PLACEMENTS), default="auto", optional=True,
                               tooltip="With a low-noise expert. both resident: every rank holds its layers of both "
                                       "(blocks on either side of the switch run at once). swap per phase: one "
                                       "expert at a time (every block to the switch, then the other expert), for "
                                       "GPUs too small for both. auto: swap where both would take over "
                                       f"{RESIDENT_SHARE:.0%} of a GPU's memory."),
            ],
            outputs=[io.Latent.Output(),
                     io.String.Output("report", tooltip="Per rank: layers, compute and waiting time, data sent, "
                                                        "peak memory.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, devices,
                frames_per_block, cache_frames, denoise, low_noise_model=None,
                low_noise_from_step=10, experts_on_ranks="auto") -> io.NodeOutput:
        latent, text = sample_with_report(model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                          scheduler, devices, frames_per_block, cache_frames, denoise,
                                          low_noise_model, low_noise_from_step, experts_on_ranks)
        return io.NodeOutput(latent, text)
