"""Memory Monitor: a pass-through node whose presence in a prompt makes the whole prompt recorded.

Two wrappers, installed once when the pack loads, connect core.memory_recording to ComfyUI's
executor: around PromptExecutor.execute_async (a Recorder runs for every prompt that holds a
Memory Monitor; at its end, also a failed or interrupted one, the JSON report and PNG chart are
written and sent to the frontend) and around execution.reset_progress_state (each such prompt's
progress registry gets a handler that starts and finishes a recorded step per executed node).
Prompts without the node run exactly as stock."""
import json
import logging
import os
import time
from typing import Optional

import folder_paths
import nodes
from comfy_api.v0_0_2 import io, ui
from comfy_execution.progress import ProgressHandler

from ..core.memory import format_summary, read_memory
from ..core.memory_chart import draw_chart
from ..core.memory_recording import Recorder

log = logging.getLogger(__name__)

NODE_ID = "StreamlineMemoryMonitor"
REPORT_SUBFOLDER = "streamline_memory"
SAMPLES_EVENT = "streamline.memory.samples"
REPORT_EVENT = "streamline.memory.report"


class PromptRecording:
    """The recording of the prompt running now, and where its report goes."""
    active: Optional["PromptRecording"] = None

    def __init__(self, server, prompt_id: str, report_prefix: str):
        self.server, self.client_id = server, server.client_id
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            f"{REPORT_SUBFOLDER}/{report_prefix}", folder_paths.get_output_directory())
        self.base = os.path.join(folder, f"{name}_{counter:05}_")
        self.files = {kind: {"filename": f"{name}_{counter:05}_.{kind}", "subfolder": subfolder, "type": "output"}
                      for kind in ("json", "png")}
        self.recorder = Recorder(prompt_id, self._send_samples)

    def _send(self, event: str, data: dict):
        self.server.send_sync(event, {"prompt_id": self.recorder.recording.run_id, **data}, self.client_id)

    def _send_samples(self, samples):
        self._send(SAMPLES_EVENT, {"samples": [vars(s) for s in samples],
                                   "steps": [vars(r) for r in self.recorder.recording.steps]})

    def finish(self):
        self.recorder.stop()
        recording = self.recorder.recording
        with open(self.base + ".json", "w") as f:
            json.dump({"finished": time.time(), "summary": recording.summary(), "peaks": recording.peaks(),
                       **recording.as_dict()}, f, indent=1)
        draw_chart(recording).save(self.base + ".png")
        self._send(REPORT_EVENT, {"summary": recording.summary(), "peaks": recording.peaks(),
                                  "steps": [vars(r) for r in recording.steps], "files": self.files})


class StepHandler(ProgressHandler):
    """A ComfyUI progress handler that makes every executed node a recorded step."""

    def __init__(self, recorder: Recorder):
        super().__init__("streamline_memory")
        self.recorder, self.registry = recorder, None

    def set_registry(self, registry):
        self.registry = registry

    def start_handler(self, node_id, state, prompt_id):
        node = self.registry.dynprompt.get_node(node_id) if self.registry.dynprompt.has_node(node_id) else {}
        class_type = node.get("class_type", "")
        title = node.get("_meta", {}).get("title") or nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type) or class_type
        self.recorder.start_step(node_id, f"#{node_id} {title}")

    def finish_handler(self, node_id, state, prompt_id):
        self.recorder.finish_step(node_id)


def _report_prefix(prompt: dict) -> Optional[str]:
    """The report prefix of the prompt's first Memory Monitor, or None when it has none."""
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") == NODE_ID:
            prefix = node.get("inputs", {}).get("report_prefix")
            return prefix if _plain_name(prefix) else "memory_report"
    return None


def _plain_name(prefix) -> bool:
    return isinstance(prefix, str) and bool(prefix) and not any(part in prefix for part in ("/", "\\", ".."))


def install_prompt_recording():
    import execution

    executor = execution.PromptExecutor
    if getattr(executor.execute_async, "streamline_recording", False):
        return
    execute_async, reset_progress_state = executor.execute_async, execution.reset_progress_state

    async def recorded_execute_async(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
        prefix = _report_prefix(prompt)
        if prefix is None:
            return await execute_async(self, prompt, prompt_id, extra_data, execute_outputs)
        self.server.client_id = extra_data.get("client_id")
        recording = PromptRecording.active = PromptRecording(self.server, prompt_id, prefix)
        recording.recorder.__enter__()
        try:
            return await execute_async(self, prompt, prompt_id, extra_data, execute_outputs)
        finally:
            PromptRecording.active = None
            try:
                recording.finish()
            except Exception:  # a report that cannot be written must not fail the prompt
                log.exception("Memory Monitor: could not write the memory report")

    def recorded_reset_progress_state(prompt_id, dynprompt):
        reset_progress_state(prompt_id, dynprompt)
        if PromptRecording.active is not None:
            execution.add_progress_handler(StepHandler(PromptRecording.active.recorder))

    recorded_execute_async.streamline_recording = True
    executor.execute_async = recorded_execute_async
    execution.reset_progress_state = recorded_reset_progress_state


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
                io.String.Input("report_prefix", default="memory_report",
                                tooltip="File name prefix of the report and chart, under output/streamline_memory/."),
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
    def validate_inputs(cls, report_prefix, **kwargs):
        if not _plain_name(report_prefix):
            return (f"Memory Monitor: report_prefix {report_prefix!r} must be a plain file name (no folders): "
                    f"reports always go to output/{REPORT_SUBFOLDER}/.")
        return True

    @classmethod
    def execute(cls, value, report_prefix) -> io.NodeOutput:
        recording = PromptRecording.active
        if recording is None:  # called outside a recorded prompt (directly): memory at this point
            summary = format_summary(read_memory())
        else:
            summary = recording.recorder.recording.summary() + \
                f"\nreport: output/{recording.files['json']['subfolder']}/{recording.files['json']['filename']} (+ .png)"
        return io.NodeOutput(value, summary, ui=ui.PreviewText(summary))
