"""The MODEL's CFG patches (RescaleCFG, CFGZeroStar, APG without momentum, ...) for DualParal: they
are Python callables, so they run here, in ComfyUI's own sampling function, on each block's
predictions as the ranks deliver them (the first rank asks for every step of every block)."""
import torch

from ..core.dualparal import DualParalError

GUIDANCE_PATCHES = ("sampler_pre_cfg_function", "sampler_cfg_function", "sampler_post_cfg_function")
# what a patch may read of the model: its sampling settings, not a way to run it
MODEL_ATTRIBUTES = ("model_sampling", "latent_format", "model_config", "model_type")


def guidance_patches(model) -> list:
    options = model.model_options
    return [key for key in GUIDANCE_PATCHES if options.get(key)]


def needs_unconditional(experts: list, cfg: float) -> bool:
    """Whether the negative side is sampled: at cfg 1 only where a patch disables ComfyUI's cfg-1 shortcut."""
    return cfg != 1.0 or any(expert.model_options.get("disable_cfg1_optimization", False) for expert in experts)


class _ModelSeenByPatches:
    """The model as CFG patches see it: its settings, but running it (PerturbedAttentionGuidance,
    SelfAttentionGuidance, SkipLayerGuidance and the like) is refused, as the ranks hold the layers."""

    def __init__(self, model, patches: list):
        self._model, self._patches = model, patches

    def __getattr__(self, name):
        if name in MODEL_ATTRIBUTES:
            return getattr(self._model, name)
        raise DualParalError(f"a CFG patch of the MODEL ({', '.join(self._patches)}) runs the model itself (it reads "
                             f"model.{name}), which DualParal cannot do block by block on its ranks: remove that node "
                             f"(guidance such as PerturbedAttentionGuidance, SelfAttentionGuidance or SkipLayerGuidance) "
                             f"before DualParal, or sample with KSampler.")


def host_guidance(experts: list, positive, negative, cfg: float):
    """Guidance (pipeline.Guidance) through ComfyUI's sampling_function with each expert's options,
    the ranks' predictions handed in where it would run the model; None when no expert has CFG patches."""
    if not any(guidance_patches(expert) for expert in experts):
        return None
    import comfy.samplers
    seen = [_ModelSeenByPatches(expert.model, guidance_patches(expert)) for expert in experts]

    def guide(x, sigma, denoised, expert):
        predictions = [denoised[:1], denoised[1:] if denoised.shape[0] > 1 else torch.zeros_like(x)]
        options = {**experts[expert].model_options, "sampler_calc_cond_batch_function": lambda args: predictions}
        return comfy.samplers.sampling_function(seen[expert], x, sigma, negative, positive, cfg, model_options=options)
    return guide


def _asked(guide, x, sigma, denoised, expert):
    """The guidance at `sigma`; a patch that fails without the model (it runs the model through
    ComfyUI's sampling helpers, as PerturbedAttentionGuidance and SkipLayerGuidance do) is refused."""
    try:
        return guide(x, sigma, denoised, expert)
    except DualParalError:
        raise
    except Exception as error:
        if type(error).__name__ == "InterruptProcessingException":
            raise
        raise DualParalError(f"a CFG patch of the MODEL fails when DualParal asks it without the model "
                             f"({type(error).__name__} at sigma {float(sigma[0]):.3g}): it runs the model itself, "
                             f"which DualParal cannot do block by block on its ranks. Remove that node (guidance "
                             f"such as PerturbedAttentionGuidance or SkipLayerGuidance) before DualParal, or sample "
                             f"with KSampler.") from None


def check_guidance(guide, shape: tuple, sigmas: torch.Tensor, rows: int, blocks: int, experts: int) -> None:
    """Before any process starts: the patches run without the model at every sigma of the schedule
    (a patch may act in a window of it only, as SkipLayerGuidance does), and, with several blocks,
    give the same answer twice (a patch that carries state from call to call, such as APG's momentum,
    would mix blocks that the ranks interleave). Stateful patches start a new run where sigma rises,
    as a new sampling does: asked last above the schedule's sigmas, then twice at its smallest, so that
    such state starts afresh here and again at the run's first step."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    denoised = torch.randn((rows, *shape[1:]), generator=generator)
    above, smallest = sigmas[:1] + 1.0, sigmas[sigmas > 0][-1:]
    for expert in range(experts):
        for sigma in sigmas[sigmas > 0]:
            _asked(guide, x, sigma.reshape(1), denoised, expert)
        _asked(guide, x, above, denoised, expert)
        first, second = (_asked(guide, x, smallest, denoised, expert) for _ in range(2))
        if blocks > 1 and not torch.allclose(first, second, equal_nan=True):
            raise DualParalError("a CFG patch of the MODEL answers differently when asked the same twice (it carries "
                                 "state from step to step, such as APG's momentum), which would mix DualParal's blocks: "
                                 "set its momentum to 0, remove it, or set frames per block to the latent's length "
                                 "(one block samples as KSampler does).")
