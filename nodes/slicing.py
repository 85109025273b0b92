"""Feature Slicer, Operator Grouper and VAE Slicer: patched clones of MODEL / VAE (glue.slicing)."""
from comfy_api.v0_0_2 import io

from ..core.slicing import SliceSettings
from ..glue.slicing import sliced_model, sliced_vae

FRAME_CHUNKS_TOOLTIP = ("Chunks that per-frame and per-token ops run in. Video UNets (SVD): the batch x frames "
                        "axis, 0 = auto (as many frames as hold about 1.5 M values, at least one). DiTs (Wan): "
                        "the token axis, 0 = auto (about 1,024 x 1,536 token-channels per chunk). More chunks: "
                        "lower peak, more kernel launches.")
STRIP_CHUNKS_TOOLTIP = ("Video UNets (SVD): strips of the width axis that temporal ops run in (bands of positions "
                        "in temporal transformers), 0 = auto (16 columns per strip, bands of 65,536 "
                        "position-channels). DiTs have no temporal ops: unused there. Values larger than an axis "
                        "are clamped to one column per strip, with a warning.")


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
            description="Runs the video model's ops in chunks: a UNet's spatial ops in frame chunks and its "
                        "temporal ops in width strips (GroupNorm statistics over the whole tensor), a DiT's "
                        "per-token ops in token chunks with attention split along queries. Lowers peak VRAM; "
                        "the output equals the unsliced model's.",
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
