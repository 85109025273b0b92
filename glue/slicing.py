"""Slicing on ComfyUI's objects: patched clones of a ModelPatcher or VAE, each patch tagged with
the node that made it, and self-check fallbacks shown on that node."""
import copy
import logging

from ..core.slicing import SliceSettings, UnsupportedModelError, decode_estimate, self_check, slicing_patches
from .step_rehash import rewrap_rehash

log = logging.getLogger(__name__)

SETTINGS_KEY = "streamline_slicing"


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
