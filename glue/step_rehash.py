"""Step Rehash's patched clone of an SVD-family or Wan MODEL that reuses its deep features on the
steps between refreshes (core.step_rehash)."""
import logging

from ..core.step_rehash import RehashSettings, RehashState, UnsupportedRehashError, rehash_patches, step_index

log = logging.getLogger(__name__)

STATE_KEY = "streamline_step_rehash"
WRAPPER_KEY = "streamline_step_rehash"


class _Holder:
    """The settings and live state a MODEL clone carries in its transformer options. Clones of the
    clone share it (ComfyUI 0.3.x deep-copies model options): its layer patches read this state."""

    def __init__(self, settings: RehashSettings, state: RehashState):
        self.settings, self.state = settings, state

    def __deepcopy__(self, memo):
        return self


def _transformer_options(args, kwargs) -> dict:
    options = kwargs.get("transformer_options")
    return options if isinstance(options, dict) else args[5]


def _forward_wrapper(executor, *args, **kwargs):
    """Per model call: reuse the deep features unless this step refreshes (or nothing is kept yet
    for this kind of call)."""
    options = _transformer_options(args, kwargs)
    holder = options[STATE_KEY]
    sample_sigmas, sigmas = options.get("sample_sigmas"), options.get("sigmas")
    step = None if sample_sigmas is None or sigmas is None else step_index(sigmas, sample_sigmas)
    refresh = step is None or holder.settings.refreshes(step, len(sample_sigmas) - 1)
    if options.get("patches", {}).get("double_block"):  # adds to the stream after every block (Uni3C)
        if not holder.state.full_calls:
            log.warning("Step Rehash: a double_block patch adds to the stream after every block, which a reused "
                        "residual would add again; every step runs whole.")
        refresh = True
    holder.state.begin((tuple(options.get("cond_or_uncond", ())), tuple(args[0].shape)), refresh)
    try:
        return executor(*args, **kwargs)
    finally:
        holder.state.end()


def _sample_wrapper(executor, *args, **kwargs):
    """Each sampling starts with nothing kept and lets its features go at the end."""
    holder = executor.class_obj.model_options["transformer_options"][STATE_KEY]
    holder.state.reset()
    try:
        return executor(*args, **kwargs)
    finally:
        state = holder.state
        calls = state.full_calls + state.reused_calls
        log.info("Step Rehash: %d of %d model calls reused the deep features (%s)", state.reused_calls, calls,
                 holder.settings)
        state.reset()


def _patches(model, holder: _Holder) -> dict:
    try:
        return rehash_patches(model.get_model_object("diffusion_model"), holder.settings, holder.state,
                              model.get_model_object, prefix="diffusion_model.")
    except UnsupportedRehashError as error:
        raise ValueError(f"Step Rehash: {error}") from None


def rewrap_rehash(clone) -> None:
    """After another node replaced layer forwards of a Step Rehash clone (Feature Slicer, Operator
    Grouper): wrap the new forwards again, so refresh steps run them and reusing steps skip them."""
    holder = clone.model_options.get("transformer_options", {}).get(STATE_KEY)
    if holder is not None:
        for path, forward in _patches(clone, holder).items():
            clone.add_object_patch(path, forward)


def rehashed_model(model, settings: RehashSettings):
    import comfy.patcher_extension
    holder = _Holder(settings, RehashState())
    patches = _patches(model, holder)
    clone = model.clone()
    for path, forward in patches.items():
        clone.add_object_patch(path, forward)
    clone.model_options.setdefault("transformer_options", {})[STATE_KEY] = holder
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _sample_wrapper)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _forward_wrapper)
    return clone
