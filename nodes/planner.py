"""Memory Planner: picks the least slicing whose predicted peak fits a VRAM budget and retries a
sampling step once with finer slicing on a real out-of-memory error (glue.planner)."""
from comfy_api.v0_0_2 import io

from ..glue.planner import planned_model


class MemoryPlanner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineMemoryPlanner",
            display_name="Memory Planner",
            category="Streamline/memory",
            description="Predicts the sampling peak of the model on this latent (a dry run under fake tensors, "
                        "seconds on a CPU) for stock and increasingly fine slicing, and applies the least "
                        "slicing that fits the budget (finer slicing runs slower, so a finer level is only taken "
                        "where it lowers the predicted peak). On a real out-of-memory error during sampling the "
                        "step is retried once with the next finer slicing that does. Wan and SVD models.",
            inputs=[io.Model.Input("model"), io.Latent.Input("latent", tooltip="The latent the sampler will denoise."),
                    io.Float.Input("budget_gib", default=0.0, min=0.0, max=4096.0, step=0.5,
                                   tooltip="VRAM for the model's weights and activations. 0 = what the compute "
                                           "device has free now (plus what this model already holds)."),
                    io.Boolean.Input("cfg", default=True, tooltip="Sampling with CFG (cond and uncond in one batch).")],
            outputs=[io.Model.Output(tooltip="A clone with the chosen slicing; the input model is unchanged."),
                     io.String.Output("plan", tooltip="Predicted peak per slicing level and the choice.")],
        )

    @classmethod
    def execute(cls, model, latent, budget_gib, cfg) -> io.NodeOutput:
        return io.NodeOutput(*planned_model(model, latent, budget_gib, cfg))
