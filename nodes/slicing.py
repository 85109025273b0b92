"""Feature Slicer, Operator Grouper and VAE Slicer: patch clones of MODEL / VAE with core.slicing."""
import copy
import logging

from comfy_api.v0_0_2 import io

from ..core.slicing import SliceSettings, UnsupportedModelError, decode_estimate, self_check, slicing_patches
from .step_rehash import rewrap_rehash

log = logging.getLogger(__name__)

SETTINGS_KEY = "streamline_slicing"

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


def _made_by(node: str) -> dict:
    """The tag of the patches a node makes: its title and, inside a running prompt, its id."""
    node_id = None
    try:
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        node_id = None if context is None else context.node_id
    except ImportError:  # a host without execution contexts: the warning goes to the log and the report only
        pass
    return {"node": node, "node_id": node_id}


def show_fallback(result: "self_check.CheckResult"):
    """A self-check fallback, as text on the node that made the patch (all of its fallbacks so far);
    core has logged it already."""
    node_id = (result.tag or {}).get("node_id")
    if not result.fell_back or node_id is None:
        return
    latest = {r.where: r for r in self_check.fallbacks() if r.tag is result.tag}  # each block once
    text = "\n".join(r.message() for r in latest.values())
    try:
        from server import PromptServer
        server = PromptServer.instance
        server.send_progress_text(text, node_id, getattr(server, "client_id", None))
    except Exception:  # no server (in-process use) or an older one: the log and the report still say it
        log.debug("could not show the self-check fallback on node %s", node_id, exc_info=True)


self_check.add_listener(show_fallback)


def sliced_model(model, node: str, **changes):
    """A clone of `model` whose supported video blocks run sliced with the merged settings.

    Nothing is patched unless every block could be: errors leave no half-patched clone."""
    transformer_options = model.model_options.get("transformer_options", {})
    settings = transformer_options.get(SETTINGS_KEY, SliceSettings()).merged(**changes)
    try:
        with self_check.tagged(_made_by(node)):
            patches = slicing_patches(model.get_model_object("diffusion_model"), settings, "diffusion_model.")
    except UnsupportedModelError as error:
        raise ValueError(f"{node}: {error}") from None
    clone = model.clone()
    for name, replacement in patches.items():
        clone.add_object_patch(name, replacement)
    clone.model_options.setdefault("transformer_options", {})[SETTINGS_KEY] = settings
    rewrap_rehash(clone)
    return clone


def sliced_vae(vae, node: str, settings: SliceSettings):
    try:
        with self_check.tagged(_made_by(node)):
            patches = slicing_patches(vae.first_stage_model, settings, input_type="VAE")
    except UnsupportedModelError as error:
        raise ValueError(f"{node}: {error}") from None
    clone = copy.copy(vae)
    clone.patcher = vae.patcher.clone()
    for name, replacement in patches.items():
        clone.patcher.add_object_patch(name, replacement)
    clone.memory_used_decode = decode_estimate(vae.first_stage_model, settings, vae.memory_used_decode)
    return clone


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
