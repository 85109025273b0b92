"""A PNG line chart of a Recording: RAM and VRAM over time, a marker where each step starts, the
peaks labelled. Drawn with Pillow (ComfyUI's own image library), no plotting dependency.

Every text goes through one layout pass (`layout_chart`) that gives each label a box and places the
step and peak labels so that no two boxes intersect and all stay inside the image, at any number of
steps: the peak-VRAM, peak-RAM and longest steps are placed first, each in the first free row of the
label band under the plot (starting at its marker, or ending there), abbreviated ("#12 KSam…", then
"#12") when the full text finds no room, and left out when not even the node id fits (every step is
in the JSON report and the summary). `draw_chart` draws exactly the boxes of that layout."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from .readings import GIB
from .recording import Recording

WIDTH, HEIGHT = 960, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 48, 92
SERIES = (("ram", "RAM (process RSS)", (52, 101, 164)),
          ("vram", "VRAM (torch allocated)", (196, 78, 82)),
          ("vram_device", "VRAM (device, NVML)", (221, 132, 82)))
FONT_SIZE = 12
GAP = 3  # horizontal space kept between two labels
STEP_LABEL_MAX_WIDTH = 220
ELLIPSIS = "\u2026"
GREY, DARK = (70, 70, 70), (30, 30, 30)


def _font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Label:
    kind: str  # "title", "legend", "note", "y-tick", "x-axis", "peak" or "step"
    text: str
    box: tuple  # (x0, y0, x1, y1): the text's line box, the glyphs inside it; drawn at (x0, y0)
    fill: tuple = GREY
    step_id: Optional[str] = None
    at: tuple = (0, 0)  # where the text is drawn (left, top of the line)


@dataclass
class ChartLayout:
    width: int
    height: int
    plot: tuple  # (x0, y0, x1, y1) of the plot area
    end: float  # seconds at the right edge
    top: float  # bytes at the top edge
    labels: list = field(default_factory=list)
    skipped_steps: list = field(default_factory=list)  # step ids without a label (no room)

    def x(self, t: float) -> float:
        return self.plot[0] + (self.plot[2] - self.plot[0]) * t / self.end

    def y(self, value: float) -> float:
        return self.plot[3] - (self.plot[3] - self.plot[1]) * value / self.top


def boxes_intersect(a, b, gap: float = 0) -> bool:
    """Whether two (x0, y0, x1, y1) boxes overlap (touching edges do not), `gap` apart horizontally."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] and b[1] < a[3]


class _Placer:
    def __init__(self, draw: ImageDraw.ImageDraw, font, width: int, height: int):
        self.draw, self.font, self.width, self.height = draw, font, width, height
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (FONT_SIZE, 2)
        self.line = ascent + descent
        self.labels: list[Label] = []

    def text_width(self, text: str) -> int:
        return math.ceil(self.draw.textlength(text, font=self.font))

    def box(self, text: str, x: float, y: float) -> tuple:
        x, y = round(x), round(y)
        box = (x, y, x + self.text_width(text), y + self.line)
        ink = self.draw.textbbox((x, y), text, font=self.font)  # the glyphs, never outside the line box
        return (min(box[0], ink[0]), min(box[1], ink[1]), max(box[2], ink[2]), max(box[3], ink[3]))

    def fit(self, text: str, width: float) -> str:
        """`text`, cut with an ellipsis to at most `width` pixels ("" when not even one letter fits)."""
        if self.text_width(text) <= width:
            return text
        low, high = 0, len(text)  # the longest prefix that fits with the ellipsis
        while low < high:
            middle = (low + high + 1) // 2
            if self.text_width(text[:middle].rstrip() + ELLIPSIS) <= width:
                low = middle
            else:
                high = middle - 1
        return text[:low].rstrip() + ELLIPSIS if low else ""

    def free(self, box, bounds) -> bool:
        return (bounds[0] <= box[0] and bounds[1] <= box[1] and box[2] <= bounds[2] and box[3] <= bounds[3]
                and not any(boxes_intersect(box, other.box, GAP) for other in self.labels))

    def fixed(self, kind: str, text: str, x: float, y: float, fill=GREY) -> Optional[Label]:
        """A label at a set place, cut to the image's width; left out when it would cover another."""
        text = self.fit(text, self.width - 2 - max(x, 0))
        if not text:
            return None
        box = self.box(text, max(x, 0), y)
        if not self.free(box, (0, 0, self.width, self.height)):
            return None
        label = Label(kind, text, box, fill, at=(round(max(x, 0)), round(y)))
        self.labels.append(label)
        return label

    def first_free(self, kind: str, texts, positions, bounds, fill=GREY, step_id=None) -> Optional[Label]:
        """The first of `texts` (most to least preferred) at the first of `positions(width)` whose box is
        inside `bounds` and clear of every placed label; None when none is."""
        for text in texts:
            width = self.text_width(text)
            for x, y in positions(width):
                x = min(max(x, bounds[0]), bounds[2] - width)
                box = self.box(text, x, y)
                if self.free(box, bounds):
                    label = Label(kind, text, box, fill, step_id, (round(x), round(y)))
                    self.labels.append(label)
                    return label
        return None


def _gib(value: float) -> str:
    value /= GIB
    return f"{value:.0f} GiB" if value >= 100 else f"{value:.1f} GiB" if value >= 10 else f"{value:.2f} GiB"


def _step_texts(placer: _Placer, label: str) -> list[str]:
    """The step's label from the full text to the node id alone ("#12 KSampler" -> "#12 KSam…" -> "#12")."""
    head, _, rest = label.partition(" ")
    prefix = head if head.startswith("#") and rest else ""
    texts = [placer.fit(label, STEP_LABEL_MAX_WIDTH)]
    for width in (120, 70):
        texts.append(placer.fit(label, width))
    texts.append(prefix or placer.fit(label, 40))
    unique = []
    for text in texts:
        if text and text not in unique and text != ELLIPSIS:
            unique.append(text)
    return unique


def _step_priority(recording: Recording, end: float) -> list:
    """Steps in labelling order: the VRAM-peak step, the RAM-peak step, then the longest first."""
    steps = list(recording.steps)
    duration = {id(r): (r.finished if r.finished is not None else end) - r.started for r in steps}
    order = sorted(steps, key=lambda r: (-duration[id(r)], r.started))
    first = []
    with_vram = [r for r in steps if r.vram_peak is not None]
    if with_vram:
        first.append(max(with_vram, key=lambda r: r.vram_peak))
    if steps:
        first.append(max(steps, key=lambda r: r.ram_peak))
    seen, result = set(), []
    for record in first + order:
        if id(record) not in seen:
            seen.add(id(record))
            result.append(record)
    return result


def layout_chart(recording: Recording, title: str = "Memory over the prompt",
                 width: int = WIDTH, height: int = HEIGHT) -> ChartLayout:
    """Where every text of the chart goes: a ChartLayout whose `labels` never intersect (not even
    within GAP pixels side by side) and lie inside the image."""
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placer = _Placer(scratch, _font(), width, height)
    line = placer.line
    samples = recording.samples
    end = max([s.t for s in samples] + [r.finished or r.started for r in recording.steps] + [1e-3])
    series = {key: [(s.t, getattr(s, key)) for s in samples if getattr(s, key) is not None] for key, _, _ in SERIES}
    step_peaks = [r.vram_peak for r in recording.steps if r.vram_peak is not None]
    top = max([v for points in series.values() for _, v in points] + step_peaks + [1]) * 1.1
    plot = (LEFT, TOP, width - RIGHT, height - BOTTOM)
    layout = ChartLayout(width, height, plot, end, top)

    # fixed texts: the title with the legend, the y axis, the time axis
    x = 8
    heading = placer.fixed("title", title, x, 6, DARK)
    x = heading.box[2] + 12 if heading else x
    for key, name, color in SERIES:
        if series[key] and x < width - 40:
            legend = placer.fixed("legend", name, x, 6, color)
            if legend:
                x = legend.box[2] + 12
    if not series["vram"] and recording.vram_note:
        placer.fixed("note", f"({recording.vram_note})", x, 6, GREY)
    for i in range(5):
        value = top * i / 4
        text = _gib(value)
        placer.fixed("y-tick", text, LEFT - 4 - placer.text_width(text), layout.y(value) - line / 2)
    axis_y = plot[3] + 3
    placer.fixed("x-axis", "0 s", plot[0], axis_y)
    end_text = f"{end:.1f} s"
    placer.fixed("x-axis", end_text, plot[2] - placer.text_width(end_text), axis_y)

    # the peaks, next to their dots inside the plot
    inner = (plot[0] + 2, plot[1] + 2, plot[2] - 2, plot[3] - 2)
    for key, name, color in SERIES:
        if not series[key]:
            continue
        t, peak = max(series[key], key=lambda p: p[1])
        px, py = layout.x(t), layout.y(peak)

        def around(w, px=px, py=py):
            yield from ((px + 6, py - line - 2), (px - 6 - w, py - line - 2), (px + 6, py + 3), (px - 6 - w, py + 3))
            for k in range(1, int((plot[3] - plot[1]) / line) + 1):  # further away, down then up
                for dy in (py + 3 + k * line, py - line - 2 - k * line):
                    yield px + 6, dy
                    yield px - 6 - w, dy

        placer.first_free("peak", [f"peak {name.split(' ')[0]} {_gib(peak)}"], around, inner, color)

    # the steps: a row of the band under the plot each, most important first
    rows = []
    y = axis_y
    while y + line <= height - 2:
        rows.append(y)
        y += line + 1
    band = (plot[0], plot[3] + 1, width - 2, height - 2)
    for record in _step_priority(recording, end):
        mx = layout.x(record.started)

        def at_marker(w, mx=mx):
            for row in rows:
                yield mx + 3, row
                yield mx - 3 - w, row

        if placer.first_free("step", _step_texts(placer, record.label), at_marker, band, GREY, record.step_id) is None:
            layout.skipped_steps.append(record.step_id)

    if layout.skipped_steps:
        placer.fixed("note", f"step labels: {len(recording.steps) - len(layout.skipped_steps)} of "
                     f"{len(recording.steps)} steps (the peak and longest first; every step is in the JSON report)",
                     8, 6 + line + 2, GREY)
    layout.labels = placer.labels
    return layout


def draw_chart(recording: Recording, title: str = "Memory over the prompt") -> Image.Image:
    layout = layout_chart(recording, title)
    image = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    plot, end = layout.plot, layout.end
    draw.rectangle(plot, outline=(160, 160, 160))
    for i in range(5):
        y = layout.y(layout.top * i / 4)
        draw.line([plot[0], y, plot[2], y], fill=(232, 232, 232))
    labelled = {label.step_id for label in layout.labels if label.kind == "step"}
    for record in recording.steps:
        x = layout.x(record.started)
        draw.line([x, plot[1], x, plot[3]], fill=(150, 150, 150) if record.step_id in labelled else (215, 215, 215))
        if record.vram_peak is not None:  # the exact per-step peak, between samples too
            y = layout.y(record.vram_peak)
            draw.line([x, y, layout.x(record.finished or end), y], fill=(196, 78, 82), width=1)
    for key, _, color in SERIES:
        points = [(layout.x(s.t), layout.y(getattr(s, key))) for s in recording.samples if getattr(s, key) is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        if points:
            peak = max((s for s in recording.samples if getattr(s, key) is not None), key=lambda s: getattr(s, key))
            px, py = layout.x(peak.t), layout.y(getattr(peak, key))
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
    for label in layout.labels:
        if label.kind == "peak":  # readable over the lines
            draw.rectangle(label.box, fill="white")
        draw.text(label.at, label.text, fill=label.fill, font=font)
    return image
