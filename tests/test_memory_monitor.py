"""Memory Monitor: the recorder and chart in core, and the node class called in-process."""
import mmap

import pytest
import torch


def test_recorder_gives_each_step_its_ram_peak_and_samples_the_run(pack):
    from comfyui_streamline.core.memory_recording import Recorder

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
    from comfyui_streamline.core.memory_chart import HEIGHT, WIDTH, draw_chart
    from comfyui_streamline.core.memory_recording import Recorder

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


@pytest.mark.parametrize("prefix", ["../escape", "sub/dir", ""])
def test_rejects_a_report_prefix_that_is_not_a_plain_name(pack, prefix):
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor

    assert "plain file name" in MemoryMonitor.validate_inputs(report_prefix=prefix)
    assert MemoryMonitor.validate_inputs(report_prefix="fine_name") is True


def test_says_vram_is_unavailable_without_a_gpu(pack):
    from comfyui_streamline.core.memory import format_summary, read_memory

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

    from comfyui_streamline.core import memory

    stub = _StubNVML(fail)
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.nvml_used() == (None if fail else 3 * 2 ** 30)
    assert stub.shut
