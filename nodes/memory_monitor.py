import json
import os
import time

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..core.memory import format_summary, read_memory

REPORT_SUBFOLDER = "streamline_memory"


class MemoryMonitor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineMemoryMonitor",
            display_name="Memory Monitor",
            category="Streamline/memory",
            description="Passes its input through unchanged and reports process RAM and per-GPU VRAM "
                        "(current and peak) at the point it runs, as a summary string and a JSON report "
                        "in the output folder.",
            inputs=[
                io.AnyType.Input("value", tooltip="Anything: it is passed through unchanged."),
                io.String.Input("report_prefix", default="memory_report",
                                tooltip="File name prefix of the JSON report, under output/streamline_memory/."),
            ],
            outputs=[
                io.AnyType.Output("value_out", display_name="value", tooltip="The input, unchanged."),
                io.String.Output("summary", tooltip="Human-readable memory summary."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()  # memory changes between runs: never serve a cached report

    @classmethod
    def execute(cls, value, report_prefix) -> io.NodeOutput:
        if not report_prefix or any(part in report_prefix for part in ("/", "\\", "..")):
            raise ValueError(f"Memory Monitor: report_prefix {report_prefix!r} must be a plain file name "
                             f"(no folders): reports always go to output/{REPORT_SUBFOLDER}/.")
        snapshot = read_memory()
        summary = format_summary(snapshot)
        folder, name, counter, _, _ = folder_paths.get_save_image_path(
            f"{REPORT_SUBFOLDER}/{report_prefix}", folder_paths.get_output_directory())
        with open(os.path.join(folder, f"{name}_{counter:05}_.json"), "w") as f:
            json.dump({"time": time.time(), **snapshot.as_dict()}, f, indent=2)
        return io.NodeOutput(value, summary, ui=ui.PreviewText(summary))
