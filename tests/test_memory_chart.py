"""The Memory Monitor's PNG chart: the geometry of its label layout (boxes, not pixels) at any number
of steps, with very short and very long steps and long node titles."""
import itertools

import pytest

from streamline_helpers import recording_of


CASES = list(itertools.product([1, 5, 30, 200], ["short", "long", "mixed"], [False, True]))


@pytest.mark.parametrize("n_steps, durations, vram", CASES)
def test_chart_labels_never_overlap_and_stay_inside_the_image(pack, n_steps, durations, vram):
    from comfyui_streamline.core.memory.chart import HEIGHT, WIDTH, boxes_intersect, layout_chart

    recording = recording_of(n_steps, durations, vram, long_labels=True)
    layout = layout_chart(recording)
    labels = layout.labels
    for label in labels:
        x0, y0, x1, y1 = label.box
        assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= HEIGHT, label
    for a, b in itertools.combinations(labels, 2):
        assert not boxes_intersect(a.box, b.box), (a, b)

    steps = {label.step_id: label for label in labels if label.kind == "step"}
    records = {r.step_id: r for r in recording.steps}
    assert steps, "at least one step is labelled"
    assert len(steps) + len(layout.skipped_steps) == n_steps
    for step_id, label in steps.items():  # abbreviated at most down to the node id
        assert label.text.startswith(f"#{step_id}"), label
        assert records[step_id].label.startswith(label.text.rstrip("\u2026")), label
    longest = max(recording.steps, key=lambda r: (r.finished - r.started, -r.started))
    assert longest.step_id in steps, "the longest step is labelled"
    if vram:
        assert max(recording.steps, key=lambda r: r.vram_peak).step_id in steps, "the VRAM-peak step is labelled"
    assert {label.text.split(" ")[1] for label in labels if label.kind == "peak"} == (
        {"RAM", "VRAM"} if vram else {"RAM"})
    if n_steps == 1:
        assert steps["1"].text == recording.steps[0].label or steps["1"].text.endswith("\u2026")
    if layout.skipped_steps:
        assert any(label.kind == "note" and f"of {n_steps}" in label.text for label in labels)


def test_chart_layout_at_many_steps_labels_several_and_abbreviates_before_skipping(pack):
    from comfyui_streamline.core.memory.chart import layout_chart

    layout = layout_chart(recording_of(200, "mixed", True, long_labels=True))
    steps = [label for label in layout.labels if label.kind == "step"]
    assert len(steps) >= 10  # the band's rows are used, not one label per row
    assert any(label.text.endswith("\u2026") for label in steps)  # long titles abbreviated, not dropped


def test_chart_is_drawn_from_the_layout(pack, artifacts_dir):
    from comfyui_streamline.core.memory.chart import HEIGHT, WIDTH, draw_chart

    for n_steps in (5, 200):
        image = draw_chart(recording_of(n_steps, "mixed", True, long_labels=True))
        image.save(artifacts_dir / f"memory_chart_{n_steps}_steps.png")
        assert image.size == (WIDTH, HEIGHT)
        assert len(image.getcolors(maxcolors=1 << 16)) > 3
