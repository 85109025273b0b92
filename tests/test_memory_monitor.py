"""Memory Monitor node, called in-process through its node class."""
import json

import pytest
import torch


def test_passes_its_input_through_and_writes_a_report(pack, tmp_path):
    import folder_paths
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor

    folder_paths.set_output_directory(str(tmp_path))
    frames = torch.rand(3, 8, 8, 3)
    output = MemoryMonitor.execute(value=frames, report_prefix="unit")
    assert output.args[0] is frames
    summary = output.args[1]
    assert summary.startswith("RAM:")
    report = json.loads(next((tmp_path / "streamline_memory").glob("unit_*.json")).read_text())
    assert report["ram_rss"] > 0 and report["ram_peak"] >= report["ram_rss"] // 2


def test_says_vram_is_unavailable_without_a_gpu(pack, tmp_path):
    from comfyui_streamline.core.memory import format_summary, read_memory

    snapshot = read_memory()
    if torch.cuda.is_available():
        assert snapshot.devices and "cuda:0" in format_summary(snapshot)
    else:
        assert snapshot.devices == [] and "VRAM unavailable" in format_summary(snapshot)


@pytest.mark.parametrize("prefix", ["../escape", "sub/dir", ""])
def test_rejects_a_report_prefix_that_is_not_a_plain_name(pack, tmp_path, prefix):
    import folder_paths
    from comfyui_streamline.nodes.memory_monitor import MemoryMonitor

    folder_paths.set_output_directory(str(tmp_path))
    with pytest.raises(ValueError, match="plain file name"):
        MemoryMonitor.execute(value=1, report_prefix=prefix)
    assert not any(tmp_path.parent.glob("escape*"))
