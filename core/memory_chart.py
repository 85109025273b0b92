"""A PNG line chart of a Recording: RAM and VRAM over time, a marker where each step starts, the
peaks labelled. Drawn with Pillow (ComfyUI's own image library), no plotting dependency."""
from PIL import Image, ImageDraw

from .memory import GIB
from .memory_recording import Recording

WIDTH, HEIGHT = 960, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 40, 92
SERIES = (("ram", "RAM (process RSS)", (52, 101, 164)),
          ("vram", "VRAM (torch allocated)", (196, 78, 82)),
          ("vram_device", "VRAM (device, NVML)", (221, 132, 82)))


def draw_chart(recording: Recording, title: str = "Memory over the prompt") -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    samples = recording.samples
    end = max([s.t for s in samples] + [r.finished or r.started for r in recording.steps] + [1e-3])
    series = {key: [(s.t, getattr(s, key)) for s in samples if getattr(s, key) is not None] for key, _, _ in SERIES}
    step_peaks = [r.vram_peak for r in recording.steps if r.vram_peak is not None]
    top = max([v for points in series.values() for _, v in points] + step_peaks + [1]) * 1.1

    def xy(t, value):
        return (LEFT + (WIDTH - LEFT - RIGHT) * t / end, HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * value / top)

    draw.rectangle([LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM], outline=(160, 160, 160))
    for i in range(5):
        value = top * i / 4
        y = xy(0, value)[1]
        draw.line([LEFT, y, WIDTH - RIGHT, y], fill=(232, 232, 232))
        draw.text((4, y - 6), f"{value / GIB:.2f} GiB", fill=(90, 90, 90))
    draw.text((WIDTH - RIGHT - 60, HEIGHT - BOTTOM + 4), f"{end:.1f} s", fill=(90, 90, 90))
    for index, record in enumerate(recording.steps):
        x = xy(record.started, 0)[0]
        draw.line([x, TOP, x, HEIGHT - BOTTOM], fill=(200, 200, 200))
        draw.text((min(x + 2, WIDTH - RIGHT - 150), HEIGHT - BOTTOM + 18 + 12 * (index % 5)), record.label[:28],
                  fill=(70, 70, 70))
        if record.vram_peak is not None:  # the exact per-step peak, between samples too
            draw.line([x, xy(0, record.vram_peak)[1], xy(record.finished or end, 0)[0], xy(0, record.vram_peak)[1]],
                      fill=(196, 78, 82), width=1)
    for key, name, color in SERIES:
        points = [xy(t, v) for t, v in series[key]]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        if points:
            t, peak = max(series[key], key=lambda p: p[1])
            px, py = xy(t, peak)
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
            draw.text((min(px + 6, WIDTH - 200), max(py - 14, TOP)), f"peak {name.split(' ')[0]} {peak / GIB:.2f} GiB",
                      fill=color)
    legend = [name for key, name, _ in SERIES if series[key]]
    draw.text((LEFT, 8), f"{title}: " + ", ".join(legend) + ("" if series["vram"] else f" ({recording.vram_note})"),
              fill=(30, 30, 30))
    return image
