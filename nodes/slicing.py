"""Feature Slicer, Operator Grouper and VAE Slicer: patched clones of MODEL / VAE (glue.slicing)."""
from comfy_api.v0_0_2 import io

from ..core.slicing import SliceSettings
from ..glue.slicing import sliced_model, sliced_vae

FRAME_CHUNKS_TOOLTIP = ("Chunks of the batch x frames axis that spatial ops run in. 0 = auto (one frame "
                        "per chunk). More chunks: lower peak, more kernel launches.")
STRIP_CHUNKS_TOOLTIP = ("Strips of the width axis (bands of positions in temporal transformers) that temporal "
                        "ops run in. 0 = auto (16 columns per strip). Values larger than an axis are clamped "
                        "to one column per strip, with a warning.")


def _chunk_inputs():
    return [
        io.Int.Input("frame_chunks", default=0, min=0, max=4096, tooltip=FRAME_CHUNKS_TOOLTIP),
        io.Int.Input("strip_chunks", default=0, min=0, max=4096, tooltip=STRIP_CHUNKS_TOOLTIP),
    ]


class FeatureSlicer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineFeatureSlicer",
            display_name="Feature Slicer",
            category="Streamline/memory",
            description="Runs the video model's spatial ops in frame chunks and its temporal ops in "
                        "strips, with exact results (GroupNorm statistics over the whole tensor). "
                        "Lowers peak VRAM; the output equals the unsliced model's.",
            inputs=[io.Model.Input("model"), *_chunk_inputs()],
            outputs=[io.Model.Output(tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, frame_chunks, strip_chunks) -> io.NodeOutput:
        return io.NodeOutput(sliced_model(model, "Feature Slicer", frame_chunks=frame_chunks,
                                          strip_chunks=strip_chunks))


class OperatorGrouper(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineOperatorGrouper",
            display_name="Operator Grouper",
            category="Streamline/memory",
            description="Runs chains of ops (spatial block, time embedding, temporal block, blend, "
                        "output projection) slice by slice, so their full-size intermediates never "
                        "exist. Uses the Feature Slicer's chunks when one is applied, else auto.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output(tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(sliced_model(model, "Operator Grouper", group_ops=True))


class VAESlicer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineVAESlicer",
            display_name="VAE Slicer",
            category="Streamline/memory",
            description="Makes a stock VAE Decode of a video run sliced, with the stock output at a fraction "
                        "of the memory. SVD's temporal VAE: all frames decode together with their full "
                        "temporal context. Wan 2.1 / 2.2 VAE: each frame decodes in strips along its longer "
                        "side (strip_chunks, 0 = strips 256 pixels wide; frame_chunks and group_ops do not "
                        "apply), exact, without tile seams.",
            inputs=[io.Vae.Input("vae"), *_chunk_inputs(),
                    io.Boolean.Input("group_ops", default=True,
                                     tooltip="Also group op chains (Operator Grouper) inside the decoder."),
                    io.Boolean.Input("offload_frames", default=False,
                                     tooltip="Keep the decoder's per-frame activations (SVD: with group_ops; Wan: "
                                             "the features the strips read, and the decoded video) in RAM and "
                                             "stream each chunk or strip through the GPU. VRAM no longer grows "
                                             "with the frame count; costs host-device transfers.")],
            outputs=[io.Vae.Output(tooltip="A patched copy; the input VAE is unchanged.")],
        )

    @classmethod
    def execute(cls, vae, frame_chunks, strip_chunks, group_ops, offload_frames) -> io.NodeOutput:
        settings = SliceSettings(frame_chunks, strip_chunks, group_ops, offload_frames)
        return io.NodeOutput(sliced_vae(vae, "VAE Slicer", settings))
