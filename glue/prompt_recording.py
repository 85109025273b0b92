"""The Memory Monitor's prompt recording: a prompt holding the node is recorded whole.

Two wrappers, installed once when the pack loads, connect core.memory.recording to ComfyUI's
executor: around PromptExecutor.execute_async (a Recorder runs for every prompt that holds a
Memory Monitor; at its end, also a failed or interrupted one, the JSON report and PNG chart are
written and sent to the frontend) and around execution.reset_progress_state (each such prompt's
progress registry gets a handler that starts and finishes a recorded step per executed node).
Prompts without the node run exactly as stock.

Containment: the recording is a guest in ComfyUI's prompt worker thread. Everything the wrappers
do besides calling ComfyUI's own functions is guarded: an exception there (an unwritable output
folder, a failing event, a broken sampler) is logged and noted in the summary, never raised into
the worker, while whatever ComfyUI's executor itself raises propagates unchanged. A host without
one of the hooks gets a warning at load and a smaller recording, not a failed pack."""
import functools
import inspect
import json
import logging
import os
import time
import unicodedata
from typing import Optional

import folder_paths
import nodes

from ..core.memory.chart import draw_chart
from ..core.memory.recording import Recorder
from ..core.slicing import self_check

try:
    from comfy_execution.progress import ProgressHandler
except ImportError:  # an older or newer host: no per-node steps (install_prompt_recording warns)
    ProgressHandler = None

log = logging.getLogger(__name__)

NODE_ID = "StreamlineMemoryMonitor"
REPORT_SUBFOLDER = "streamline_memory"
DEFAULT_PREFIX = "memory_report"
MAX_PREFIX_BYTES = 100  # a name holds 255 bytes; "_00001_.json" and room for ComfyUI's %date% expansion
SAMPLES_EVENT = "streamline.memory.samples"
REPORT_EVENT = "streamline.memory.report"
WINDOWS_RESERVED = '<>:"|?*'


def prefix_problem(prefix) -> Optional[str]:
    """Why `prefix` cannot name a report file, as a sentence naming the rule; None when it can."""
    if not isinstance(prefix, str):
        return f"report_prefix must be text, got {type(prefix).__name__}"
    shown = repr(prefix if len(prefix) <= 40 else prefix[:40] + "...")
    rule = None
    size = len(prefix.encode("utf-8", "surrogatepass"))
    if not prefix.strip():
        rule = "it is empty"
    elif size > MAX_PREFIX_BYTES:
        rule = (f"it is {len(prefix)} characters ({size} bytes in UTF-8) long; at most {MAX_PREFIX_BYTES} bytes "
                f"are allowed (a file name holds at most 255 bytes, and the counter and extension are added)")
    elif "/" in prefix or "\\" in prefix:
        rule = f"it names a folder ('/' or '\\'); reports always go to output/{REPORT_SUBFOLDER}/"
    elif ".." in prefix:
        rule = "it contains '..'"
    elif any(unicodedata.category(c) in ("Cc", "Cs") for c in prefix):
        rule = "it contains a control character (such as a newline or a tab)"
    elif any(c in WINDOWS_RESERVED for c in prefix):
        rule = f"it contains one of {' '.join(WINDOWS_RESERVED)} (not allowed in file names on Windows)"
    if rule is None:
        return None
    return f"report_prefix {shown} is not a plain file name: {rule}"


def _guarded(what: str):
    """Runs the decorated function with any exception logged (with `what` failing) instead of raised."""
    def decorate(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception:
                log.exception("Memory Monitor: %s failed; the prompt goes on without it", what)
                return None
        return run
    return decorate


class PromptRecording:
    """The recording of the prompt running now, and where its report goes.

    The report's file name is fixed when the first Memory Monitor of the prompt executes (with the
    report_prefix it receives then, so a linked prefix counts), or at the end of the prompt with
    the prefix written in the prompt when no monitor executed."""
    active: Optional["PromptRecording"] = None

    def __init__(self, server, client_id, prompt_id: str, default_prefix: str, step_note: str = ""):
        self.server, self.client_id, self.default_prefix = server, client_id, default_prefix
        self.step_note = step_note  # why there are no per-node steps (a host without progress hooks)
        self.base: Optional[str] = None  # report path without extension, once fixed
        self.files: Optional[dict] = None
        self.problem: Optional[str] = None  # why the report cannot be written, once known
        self._send_failed = False
        self.recorder = Recorder(prompt_id, self._send_samples)
        self.checks_from = self_check.mark()  # self-check fallbacks after this happened during the prompt

    def use_prefix(self, prefix: str):
        """Fixes the report's files with `prefix` unless already fixed; checks that the folder takes them
        (a placeholder JSON is written now and replaced at the end) so the summary can say so."""
        if self.base is not None or self.problem is not None:
            return
        try:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
                f"{REPORT_SUBFOLDER}/{prefix}", folder_paths.get_output_directory())
            os.makedirs(folder, exist_ok=True)
            base = os.path.join(folder, f"{name}_{counter:05}_")
            with open(base + ".json", "w") as f:
                json.dump({"run_id": self.recorder.recording.run_id, "finished": None,
                           "note": "the prompt is running: the report replaces this file when it ends"}, f)
        except Exception as error:
            self._fail(error)
            return
        self.base = base
        self.files = {kind: {"filename": f"{name}_{counter:05}_.{kind}", "subfolder": subfolder, "type": "output"}
                      for kind in ("json", "png")}

    def _fail(self, error: Exception):
        self.problem = f"the report could not be written to output/{REPORT_SUBFOLDER}/ ({type(error).__name__}: {error})"
        log.warning("Memory Monitor: %s; the prompt goes on without it", self.problem)

    def report_line(self) -> str:
        if self.problem is not None:
            return f"report: {self.problem}"
        if self.files is None:
            return "report: written when the prompt ends"
        return f"report: output/{self.files['json']['subfolder']}/{self.files['json']['filename']} (+ .png)"

    def recording_summary(self) -> str:
        """The recording's summary, then the self-check fallbacks that happened during the prompt."""
        fallbacks = self_check.fallbacks(self.checks_from)
        return "\n".join([self.recorder.recording.summary(), *(r.message() for r in fallbacks)])

    def summary(self) -> str:
        lines = [self.recording_summary()]
        if self.step_note:
            lines.append(self.step_note)
        return "\n".join(lines + [self.report_line()])

    def _send(self, event: str, data: dict):
        try:
            self.server.send_sync(event, {"prompt_id": self.recorder.recording.run_id, **data}, self.client_id)
        except Exception:
            if not self._send_failed:  # once per prompt: the sampler would repeat it twice a second
                log.exception("Memory Monitor: could not send %s to the frontend", event)
            self._send_failed = True

    def _send_samples(self, samples):
        self._send(SAMPLES_EVENT, {"samples": [vars(s) for s in samples],
                                   "steps": [vars(r) for r in self.recorder.recording.steps]})

    def start(self):
        self.recorder.__enter__()

    def finish(self):
        """Stops the recorder, writes the report and sends it; logs what fails, never raises."""
        _guarded("stopping the memory sampler")(self.recorder.stop)()
        recording = self.recorder.recording
        self.use_prefix(self.default_prefix)
        if self.base is not None:
            try:
                with open(self.base + ".json", "w") as f:
                    json.dump({"finished": time.time(), "summary": self.recording_summary(), "peaks": recording.peaks(),
                               "step_note": self.step_note, **recording.as_dict()}, f, indent=1)
                draw_chart(recording).save(self.base + ".png")
            except Exception as error:
                self._fail(error)
        self._send(REPORT_EVENT, {"summary": self.summary(), "peaks": recording.peaks(),
                                  "steps": [vars(r) for r in recording.steps],
                                  "files": self.files if self.problem is None else None, "warning": self.problem})


class StepHandler(ProgressHandler or object):
    """A ComfyUI progress handler that makes every executed node a recorded step. Called in the prompt
    worker thread by ComfyUI's progress registry: nothing it raises may reach the registry."""

    def __init__(self, recorder: Recorder):
        if ProgressHandler is not None:
            super().__init__("streamline_memory")
        self.name, self.enabled = "streamline_memory", True
        self.recorder, self.registry = recorder, None

    def set_registry(self, registry):
        self.registry = registry

    @_guarded("recording the start of a node")
    def start_handler(self, node_id, state, prompt_id):
        dynprompt = getattr(self.registry, "dynprompt", None)
        node = dynprompt.get_node(node_id) if dynprompt is not None and dynprompt.has_node(node_id) else {}
        class_type = node.get("class_type", "")
        title = node.get("_meta", {}).get("title") or nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type) or class_type
        self.recorder.start_step(node_id, f"#{node_id} {title}")

    @_guarded("recording the end of a node")
    def finish_handler(self, node_id, state, prompt_id):
        self.recorder.finish_step(node_id)


def _prompt_prefix(prompt) -> Optional[str]:
    """The report prefix written in the prompt's first Memory Monitor ("memory_report" when linked or
    not usable), or None when the prompt has no Memory Monitor."""
    if not isinstance(prompt, dict):
        return None
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") == NODE_ID:
            prefix = (node.get("inputs") or {}).get("report_prefix")
            return prefix if prefix_problem(prefix) is None else DEFAULT_PREFIX
    return None


def _call_arguments(signature, args, kwargs) -> tuple:
    """(prompt, prompt_id, extra_data) of a call to execute_async(self, *args, **kwargs), by parameter name
    where the signature allows, else by ComfyUI's long-standing order (prompt, prompt_id, extra_data)."""
    bound = {}
    if signature is not None:
        try:
            bound = signature.bind(None, *args, **kwargs).arguments
        except TypeError:
            bound = {}

    def pick(name, position):
        if name in bound:
            return bound[name]
        if name in kwargs:
            return kwargs[name]
        return args[position] if len(args) > position else None

    extra_data = pick("extra_data", 2)
    return pick("prompt", 0), pick("prompt_id", 1), extra_data if isinstance(extra_data, dict) else {}


def _start_recording(signature, executor, args, kwargs, step_note="") -> Optional[PromptRecording]:
    """The recording of this prompt, started, or None when it holds no Memory Monitor or starting failed."""
    try:
        prompt, prompt_id, extra_data = _call_arguments(signature, args, kwargs)
        prefix = _prompt_prefix(prompt)
        if prefix is None:
            return None
        recording = PromptRecording(getattr(executor, "server", None), extra_data.get("client_id"),
                                    str(prompt_id), prefix, step_note)
        recording.start()
    except Exception:
        log.exception("Memory Monitor: could not start recording the prompt; it runs unrecorded")
        return None
    PromptRecording.active = recording
    return recording


def _finish_recording(recording: PromptRecording):
    PromptRecording.active = None
    try:
        recording.finish()
    except Exception:
        log.exception("Memory Monitor: could not finish the memory report")


def _progress_hooks(execution, progress):
    """(reset_progress_state, add_progress_handler, "") to record per-node steps with, or (None, None, note)
    with a warning when the host lacks one of them or ProgressHandler."""
    reset = getattr(execution, "reset_progress_state", None)
    add = getattr(execution, "add_progress_handler", None) or getattr(progress, "add_progress_handler", None)
    handler_base = getattr(progress, "ProgressHandler", None) if progress is not None else None
    missing = [name for name, hook in (("execution.reset_progress_state", reset),
                                       ("add_progress_handler", add),
                                       ("comfy_execution.progress.ProgressHandler", handler_base)) if hook is None]
    if missing:
        note = "per-node steps not recorded: this ComfyUI lacks " + ", ".join(missing)
        log.warning("Memory Monitor: %s; prompts are recorded as a whole (RAM/VRAM samples, no per-node steps)",
                    note)
        return None, None, note
    return reset, add, ""


def install_prompt_recording(execution=None, progress=None) -> bool:
    """Wraps ComfyUI's executor (the `execution` module, imported when not given) so prompts holding a
    Memory Monitor are recorded. Returns whether prompts will be recorded; a host lacking a hook gets a
    warning and a smaller recording (or none), never an exception at pack load."""
    try:
        return _install(execution, progress)
    except Exception:
        log.exception("Memory Monitor: could not hook into ComfyUI's executor; prompts are not recorded "
                      "(the node returns a memory snapshot)")
        return False


def _install(execution, progress) -> bool:
    if execution is None:
        import execution
    if progress is None:
        try:
            import comfy_execution.progress as progress
        except ImportError:
            progress = None
    executor = getattr(execution, "PromptExecutor", None)
    execute_async = getattr(executor, "execute_async", None)
    if execute_async is None or not inspect.iscoroutinefunction(execute_async):
        log.warning("Memory Monitor: this ComfyUI has no async PromptExecutor.execute_async; prompts are not "
                    "recorded (the node returns a memory snapshot)")
        return False
    if getattr(execute_async, "streamline_recording", False):
        return True
    try:
        signature = inspect.signature(execute_async)
    except (TypeError, ValueError):
        signature = None

    reset_progress_state, add_progress_handler, step_note = _progress_hooks(execution, progress)

    @functools.wraps(execute_async)
    async def recorded_execute_async(self, *args, **kwargs):
        self_check.new_round()  # every prompt: blocks that fell back earlier say so again
        recording = _start_recording(signature, self, args, kwargs, step_note)
        if recording is None:
            return await execute_async(self, *args, **kwargs)
        try:
            return await execute_async(self, *args, **kwargs)
        finally:
            _finish_recording(recording)

    if reset_progress_state is not None:
        @functools.wraps(reset_progress_state)
        def recorded_reset_progress_state(*args, **kwargs):
            result = reset_progress_state(*args, **kwargs)
            recording = PromptRecording.active
            if recording is not None:
                _guarded("adding the per-node step handler")(
                    lambda: add_progress_handler(StepHandler(recording.recorder)))()
            return result

        execution.reset_progress_state = recorded_reset_progress_state
    recorded_execute_async.streamline_recording = True
    executor.execute_async = recorded_execute_async
    return True
