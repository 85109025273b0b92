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
        snapshot = read_memory()
        summary = format_summary(snapshot)
        report_dir = os.path.join(folder_paths.get_output_directory(), REPORT_SUBFOLDER)
        os.makedirs(report_dir, exist_ok=True)
        report_path = os.path.join(report_dir, f"{report_prefix}_{time.strftime('%Y%m%d-%H%M%S')}_{time.time_ns() % 10**6:06d}.json")
        with open(report_path, "w") as f:
            json.dump({"time": time.time(), **snapshot.as_dict()}, f, indent=2)
        return io.NodeOutput(value, summary, ui=ui.PreviewText(summary))
