"""Step Rehash: a patched clone of an SVD-family or Wan MODEL that reuses its deep features on the
steps between refreshes (glue.step_rehash, core.step_rehash)."""
from comfy_api.v0_0_2 import io

from ..core.step_rehash import RehashSettings
from ..glue.step_rehash import rehashed_model


class StepRehash(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineStepRehash",
            display_name="Step Rehash",
            category="Streamline/speed",
            description="Reuses the model's deep features between refresh steps (FME's Step Rehash): on the "
                        "steps in between only the shallow blocks run. Faster sampling at a small, measured "
                        "quality cost (docs/step_rehash.md). SVD-family video UNets and Wan DiTs; composes with "
                        "Feature Slicer and Operator Grouper.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("interval", default=3, min=1, max=100,
                             tooltip="A full step, then interval - 1 steps that reuse its deep features. 1 = every "
                                     "step full (stock output)."),
                io.Int.Input("shallow_blocks", default=3, min=1, max=64,
                             tooltip="UNet: input blocks (and as many output blocks) that run on every step; all "
                                     "deeper blocks are cached (SVD: 3 keeps the first resolution level, 1 only the "
                                     "input convolution: fastest, largest change). DiT: the first and last blocks "
                                     "that run on every step; what the blocks between add is reused."),
                io.Int.Input("full_first_steps", default=2, min=0, max=10000,
                             tooltip="The first steps always run whole (the layout of the video forms there)."),
                io.Int.Input("full_last_steps", default=1, min=0, max=10000,
                             tooltip="The last steps always run whole (fine detail)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, interval, shallow_blocks, full_first_steps, full_last_steps) -> io.NodeOutput:
        settings = RehashSettings(interval, shallow_blocks, full_first_steps, full_last_steps)
        return io.NodeOutput(rehashed_model(model, settings))
