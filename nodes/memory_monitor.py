"""Memory Monitor: a pass-through node whose presence in a prompt makes the whole prompt recorded
(glue.prompt_recording)."""
import time

from comfy_api.v0_0_2 import io, ui

from ..core.memory.readings import format_summary, read_memory
from ..glue.prompt_recording import DEFAULT_PREFIX, MAX_PREFIX_BYTES, NODE_ID, PromptRecording, prefix_problem


class MemoryMonitor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID,
            display_name="Memory Monitor",
            category="Streamline/memory",
            description="Passes its input through unchanged. While a prompt holding it runs, RAM and VRAM "
                        "are recorded per executed node (exact VRAM peaks from torch.cuda, RAM sampled) and "
                        "drawn live on this node; at the end of the prompt a JSON report and a PNG chart are "
                        "written to output/streamline_memory/. Returns the summary of the nodes run so far.",
            inputs=[
                io.AnyType.Input("value", tooltip="Anything: it is passed through unchanged."),
                io.String.Input("report_prefix", default=DEFAULT_PREFIX,
                                tooltip="File name prefix of the report and chart, under output/streamline_memory/: "
                                        f"a plain name of at most {MAX_PREFIX_BYTES} bytes, no folders. "
                                        "May be linked (e.g. from a String node)."),
            ],
            outputs=[
                io.AnyType.Output("value_out", display_name="value", tooltip="The input, unchanged."),
                io.String.Output("summary", tooltip="Peak RAM / VRAM of the prompt so far and of each node."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()  # memory changes between runs: never serve a cached report

    @classmethod
    def validate_inputs(cls, report_prefix=None, **kwargs):
        if report_prefix is None:  # linked: ComfyUI passes the value at execution only, checked there
            return True
        problem = prefix_problem(report_prefix)
        return True if problem is None else f"Memory Monitor: {problem}."

    @classmethod
    def execute(cls, value, report_prefix=DEFAULT_PREFIX) -> io.NodeOutput:
        problem = prefix_problem(report_prefix)
        if problem is not None:  # a linked value, known only now
            raise ValueError(f"Memory Monitor: {problem}.")
        recording = PromptRecording.active
        if recording is None:  # called outside a recorded prompt (directly): memory at this point
            summary = format_summary(read_memory())
        else:
            recording.use_prefix(report_prefix)
            summary = recording.summary()
        return io.NodeOutput(value, summary, ui=ui.PreviewText(summary))
