"""Memory Monitor: the recorder and chart in core, and the node class called in-process."""
import mmap

import pytest
import torch


def test_recorder_gives_each_step_its_ram_peak_and_samples_the_run(pack):
    from comfyui_streamline.core.memory.recording import Recorder

    published = []
    with Recorder("run", published.extend, publish_seconds=0.05) as recorder:
        recorder.start_step("1", "small")
        small = torch.ones(1024)
        recorder.finish_step("1")
        recorder.start_step("2", "large")
        large = mmap.mmap(-1, 96 * 1024 ** 2)  # fresh pages, whatever the allocators hold free
        for offset in range(0, len(large), mmap.PAGESIZE):
            large[offset] = 1
        recorder.sample()
        large.close()
        recorder.finish_step("2")
        recorder.start_step("3", "left running")  # closed by stop()
    recording = recorder.recording
    assert [r.label for r in recording.steps] == ["small", "large", "left running"]
    assert all(r.finished is not None and r.finished >= r.started for r in recording.steps)
    assert recording.steps[1].ram_peak >= recording.steps[0].ram_peak + 64 * 1024 ** 2
    assert published and all(sample in recording.samples for sample in published)  # the thread's samples
    assert recording.peaks()["ram"] >= recording.steps[1].ram_peak
    summary = recording.summary()
    assert summary.splitlines()[0].startswith("peak RAM") and "large: RAM" in summary
    if not torch.cuda.is_available():
        assert "VRAM unavailable" in summary and recording.steps[1].vram_peak is None
    del small


def test_chart_draws_the_recording(pack, artifacts_dir):
    from comfyui_streamline.core.memory.chart import HEIGHT, WIDTH, draw_chart
    from comfyui_streamline.core.memory.recording import Recorder

    with Recorder("chart") as recorder:
        for i in range(3):
            recorder.start_step(str(i), f"step {i}")
            recorder.sample()
    image = draw_chart(recorder.recording)
    image.save(artifacts_dir / "memory_chart_unit.png")
    assert image.size == (WIDTH, HEIGHT)
    assert len(image.getcolors(maxcolors=1 << 16)) > 3  # lines and text, not a blank canvas


def test_node_passes_its_input_through_and_summarises_memory_when_called_directly(pack):
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor

    frames = torch.rand(3, 8, 8, 3)
    output = MemoryMonitor.execute(value=frames, report_prefix="unit")
    assert output.args[0] is frames
    assert output.args[1].startswith("RAM:")


@pytest.mark.parametrize("prefix, rule", [
    ("../escape", "names a folder"), ("sub/dir", "names a folder"), ("sub\\dir", "names a folder"),
    ("", "is empty"), ("   ", "is empty"), ("a..b", "contains '..'"), ("two\nlines", "control character"),
    ("tab\there", "control character"), ("x" * 300, "at most 100 bytes"), ("\u00e9" * 60, "120 bytes"),
    ("a:b", "not allowed in file names on Windows"), (42, "must be text")])
def test_rejects_a_report_prefix_that_is_not_a_plain_name_naming_the_rule(pack, prefix, rule):
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor

    message = MemoryMonitor.validate_inputs(report_prefix=prefix)
    assert message is not True and rule in message and message.startswith("Memory Monitor: report_prefix")
    with pytest.raises(ValueError, match="report_prefix"):  # the same rule for a linked value, at execution
        MemoryMonitor.execute(value=1, report_prefix=prefix)


@pytest.mark.parametrize("prefix", ["fine_name", "x" * 100, "%year%-%month% run 2", "Speicher-Bericht_\u00fc"])
def test_accepts_plain_names_and_a_linked_prefix_it_cannot_see_yet(pack, prefix):
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor

    assert MemoryMonitor.validate_inputs(report_prefix=prefix) is True
    assert MemoryMonitor.validate_inputs(report_prefix=None) is True  # linked: ComfyUI passes None here


def test_says_vram_is_unavailable_without_a_gpu(pack):
    from comfyui_streamline.core.memory.readings import format_summary, read_memory

    snapshot = read_memory()
    if torch.cuda.is_available():
        assert snapshot.devices and "cuda:0" in format_summary(snapshot)
    else:
        assert snapshot.devices == [] and "VRAM unavailable" in format_summary(snapshot)


class _StubNVML:
    """pynvml's surface as the memory API uses it: two GPUs, this process on the first."""
    class NVMLError(Exception):
        pass

    def __init__(self, fail=False):
        self.fail, self.shut = fail, False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.fail:
            raise self.NVMLError("GPU is lost")
        return type("Info", (), {"used": (handle + 1) * 2 ** 30, "total": 80 * 2 ** 30})

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        import os
        return [type("Process", (), {"pid": os.getpid(), "usedGpuMemory": 2 ** 29})] if handle == 0 else []


@pytest.mark.parametrize("fail", [False, True])
def test_nvml_readings_and_a_failing_nvml(pack, monkeypatch, fail):
    """Device-wide VRAM from NVML (all processes, all GPUs); an NVML error mid-run means no reading,
    not a crash of the sampler."""
    import sys

    from comfyui_streamline.core.memory import readings as memory

    stub = _StubNVML(fail)
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.nvml_used() == (None if fail else 3 * 2 ** 30)
    assert stub.shut


# --- the executor wrapper: hosts without hooks, failures contained, the executor's own errors passed on ---

class _FakeServer:
    def __init__(self, fail=False):
        self.fail, self.events = fail, []

    def send_sync(self, event, data, sid=None):
        if self.fail:
            raise RuntimeError("the frontend connection broke")
        self.events.append((event, data, sid))


def _monitor(prefix="unit_report"):
    return {"1": {"class_type": "StreamlineMemoryMonitor", "inputs": {"value": 1, "report_prefix": prefix}}}


def _fake_host(execute_async, **hooks):
    """A stand-in for ComfyUI's `execution` module: a PromptExecutor with `execute_async` and the given hooks."""
    import types

    executor = type("PromptExecutor", (), {"execute_async": execute_async,
                                           "__init__": lambda self, server=None: setattr(self, "server", server)})
    return types.SimpleNamespace(PromptExecutor=executor, **hooks)


def test_a_host_without_progress_hooks_gets_a_warning_and_a_recording_without_steps(pack, monkeypatch, caplog,
                                                                                     tmp_path):
    import asyncio
    import json
    import logging
    import types

    import folder_paths

    from comfyui_streamline.glue import prompt_recording as memory_monitor
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))

    async def execute_async(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
        return MemoryMonitor.execute(value="v", report_prefix="hookless").args[1]

    host = _fake_host(execute_async)  # no reset_progress_state / add_progress_handler
    with caplog.at_level(logging.WARNING):
        assert memory_monitor.install_prompt_recording(host, types.SimpleNamespace()) is True  # no ProgressHandler
    warning = caplog.text
    for hook in ("execution.reset_progress_state", "add_progress_handler", "ProgressHandler"):
        assert hook in warning
    assert "no per-node steps" in warning
    assert memory_monitor.install_prompt_recording(host) is True  # installed once, not wrapped twice

    server = _FakeServer()
    # keyword arguments only: the wrapper reads prompt / prompt_id / extra_data by name
    summary = asyncio.run(host.PromptExecutor(server).execute_async(
        prompt=_monitor(), prompt_id="p1", extra_data={"client_id": "c1"}, execute_outputs=[]))
    assert "per-node steps not recorded" in summary and "hookless_00001_.json" in summary
    report = json.loads((tmp_path / "streamline_memory" / "hookless_00001_.json").read_text())
    assert report["steps"] == [] and report["samples"] and report["finished"]
    assert (tmp_path / "streamline_memory" / "hookless_00001_.png").is_file()
    (event, data, sid), = [e for e in server.events if e[0] == memory_monitor.REPORT_EVENT]
    assert data["prompt_id"] == "p1" and sid == "c1" and data["warning"] is None
    assert data["files"]["json"]["filename"] == "hookless_00001_.json"
    assert memory_monitor.PromptRecording.active is None

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # no executor to wrap at all: a warning, no exception at load
        assert memory_monitor.install_prompt_recording(types.SimpleNamespace(), types.SimpleNamespace()) is False
        assert memory_monitor.install_prompt_recording(_fake_host(lambda self, *a: None)) is False  # not async
    assert caplog.text.count("prompts are not recorded") == 2


def test_the_wrapper_contains_its_own_failures_and_passes_the_executors_on(pack, monkeypatch, caplog, tmp_path):
    import asyncio
    import logging

    import folder_paths

    from comfyui_streamline.glue import prompt_recording as memory_monitor
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor
    from comfy_execution import progress

    (tmp_path / "streamline_memory").write_text("a file where the report folder should be")
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))

    class ExecutorError(Exception):
        pass

    async def execute_async(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
        host.reset_progress_state(prompt_id, None)
        summary = MemoryMonitor.execute(value="v", report_prefix="contained").args[1]
        if prompt.get("fail"):
            raise ExecutorError("the executor's own error")
        return summary

    registered = []
    host = _fake_host(execute_async, reset_progress_state=lambda prompt_id, dynprompt: None,
                      add_progress_handler=registered.append)
    assert memory_monitor.install_prompt_recording(host, progress) is True
    executor = host.PromptExecutor(_FakeServer(fail=True))  # every event send raises

    with caplog.at_level(logging.WARNING):
        summary = asyncio.run(executor.execute_async(_monitor(), "p2", {"client_id": "c2"}))
    assert "report could not be written" in summary and "NotADirectoryError" in summary
    assert "could not be written" in caplog.text and "could not send" in caplog.text
    assert len(registered) == 1 and isinstance(registered[0], progress.ProgressHandler)

    with pytest.raises(ExecutorError, match="the executor's own error"):  # unchanged, through the finally
        asyncio.run(executor.execute_async({**_monitor(), "fail": {"class_type": "Fail"}}, "p3", {}))
    assert memory_monitor.PromptRecording.active is None

    class BrokenRecorder:  # starting the recording itself fails: the prompt runs unrecorded
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no sampler thread today")

    monkeypatch.setattr(memory_monitor, "Recorder", BrokenRecorder)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = asyncio.run(executor.execute_async(_monitor(), "p4"))
    assert summary.startswith("RAM:")  # the node saw no recording and summarised memory directly
    assert "could not start recording" in caplog.text


def test_the_step_handler_keeps_its_failures_to_itself(pack, caplog):
    import logging

    from comfyui_streamline.core.memory.recording import Recorder
    from comfyui_streamline.glue.prompt_recording import StepHandler

    handler = StepHandler(Recorder("steps"))
    handler.set_registry(object())  # no dynprompt: the label falls back to the node id
    handler.start_handler("5", {}, "steps")
    handler.finish_handler("5", {}, "steps")
    assert [s.label for s in handler.recorder.recording.steps] == ["#5 "]
    handler.recorder = None  # anything raising inside the handler is logged, not raised into ComfyUI
    with caplog.at_level(logging.ERROR):
        handler.start_handler("6", {}, "steps")
    assert "recording the start of a node failed" in caplog.text


# --- through the HTTP API of a real headless ComfyUI ---

def _string_and_monitor(prefix, linked=False, text="passed through"):
    """A PrimitiveString (a stock node) into a Memory Monitor; `linked` feeds report_prefix from it."""
    return {"1": {"class_type": "PrimitiveString", "inputs": {"value": prefix if linked else text}},
            "2": {"class_type": "StreamlineMemoryMonitor",
                  "inputs": {"value": ["1", 0], "report_prefix": ["1", 0] if linked else prefix}}}


def _run_watching_events(comfy_server, prompt, timeout=180):
    """Runs `prompt` with a websocket client attached; returns its result and its memory report event."""
    import json
    import time
    import uuid

    import websocket

    from comfyui_streamline.glue.prompt_recording import REPORT_EVENT

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{comfy_server.port}/ws?clientId={client_id}", timeout=timeout)
    try:
        ws.recv()  # the server's first status message: this client is registered
        prompt_id = comfy_server.queue(prompt, client_id=client_id)
        deadline = time.monotonic() + timeout
        while True:
            ws.settimeout(max(deadline - time.monotonic(), 0.1))
            message = ws.recv()
            if isinstance(message, str):
                message = json.loads(message)
                if message["type"] == REPORT_EVENT and message["data"]["prompt_id"] == prompt_id:
                    return comfy_server.wait(prompt_id, timeout), message["data"]
    finally:
        ws.close()


def test_an_unwritable_report_folder_completes_the_prompt_and_the_queue_goes_on(comfy_server):
    folder = comfy_server.output_dir / "streamline_memory"
    aside = comfy_server.output_dir / "streamline_memory.aside"
    if folder.exists():
        folder.rename(aside)
    folder.write_text("a file where the report folder should be")
    try:
        result, event = _run_watching_events(comfy_server, _string_and_monitor("unwritable_check"))
        assert result.status == "success", result.error
        summary = result.outputs["2"]["text"][0]
        assert "report could not be written" in summary and "NotADirectoryError" in summary
        assert event["files"] is None and "could not be written" in event["warning"]
        assert "could not be written" in event["summary"]
        assert "Memory Monitor: the report could not be written" in comfy_server.log()
        # the prompt worker lives on: the next prompt runs
        assert comfy_server.run(_string_and_monitor("unwritable_again"), timeout=120).status == "success"
        assert folder.is_file()
    finally:
        folder.unlink()
        if aside.exists():
            aside.rename(folder)


def test_a_linked_report_prefix_names_the_report(comfy_server):
    import json

    result, event = _run_watching_events(comfy_server, _string_and_monitor("linked_prefix_check", linked=True))
    assert result.status == "success", result.error
    folder = comfy_server.output_dir / "streamline_memory"
    report, chart = sorted(folder.glob("linked_prefix_check_*"))
    assert (report.name, chart.name) == ("linked_prefix_check_00001_.json", "linked_prefix_check_00001_.png")
    assert report.name in result.outputs["2"]["text"][0]
    assert event["files"]["json"]["filename"] == report.name and event["warning"] is None
    assert json.loads(report.read_text())["finished"]
    assert not list(folder.glob("memory_report_*"))  # not the default name


def test_a_linked_invalid_report_prefix_fails_the_node_with_the_rule(comfy_server):
    result = comfy_server.run(_string_and_monitor("linked/escape", linked=True), timeout=120)
    assert result.status == "error"
    assert result.error["node_type"] == "StreamlineMemoryMonitor"
    assert "not a plain file name: it names a folder" in result.error["exception_message"]
    assert comfy_server.run(_string_and_monitor("after_linked_error"), timeout=120).status == "success"


@pytest.mark.parametrize("prefix, rule", [("p" * 300, "300 characters"), ("a/b", "names a folder")])
def test_an_invalid_report_prefix_is_refused_at_validation(comfy_server, prefix, rule):
    from devkit.comfy_server import PromptRejected

    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(_string_and_monitor(prefix))
    errors = rejected.value.body["node_errors"]["2"]["errors"]
    assert any("not a plain file name" in e["details"] and rule in e["details"] for e in errors), errors
