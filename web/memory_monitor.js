// Memory Monitor widget: a live chart of RAM / VRAM over the running prompt (one marker per
// executed node, the peaks labelled) and the final summary, fed by the pack's server events.
//
// Every text on the chart is placed by one layout pass that keeps the label boxes apart and inside
// the canvas at any number of steps: the peaks first, then the steps in order of importance (the
// VRAM-peak step, the RAM-peak step, then the longest), each in the first free row of the band under
// the plot, abbreviated ("#12 KSam…", then "#12") when the full text finds no room, left out when not
// even the node id fits. The boxes are kept on the node (`node.streamlineChart.labelBoxes`, in CSS
// pixels of the canvas) so that tests can check the geometry. The summary below the chart is all
// there: the node grows to show it (up to SUMMARY_MAX_HEIGHT pixels), beyond that it scrolls.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "StreamlineMemoryMonitor";
const GIB = 1024 ** 3;
const SERIES = [
    ["ram", "RAM", "#3465a4"],
    ["vram", "VRAM (torch)", "#c44e52"],
    ["vram_device", "VRAM (device)", "#dd8452"],
];
const FONT = "10px sans-serif";
const LINE = 12; // the line box of one label
const GAP = 3; // horizontal space kept between two labels
const ELLIPSIS = "\u2026";
const CHART_MIN_HEIGHT = 150;
const SUMMARY_LINE = 13; // 10px monospace text, one line
const SUMMARY_MIN_LINES = 3;
const SUMMARY_MAX_HEIGHT = 260;
const SPACING = 4;

function monitors() {
    return (app.graph?._nodes ?? []).filter((node) => node.type === NODE && node.streamlineChart);
}

function createChart(node) {
    const container = document.createElement("div");
    container.style.cssText = `display:flex;flex-direction:column;gap:${SPACING}px;width:100%;height:100%;overflow:hidden`;
    const frame = document.createElement("div"); // takes the height the summary leaves, at least CHART_MIN_HEIGHT
    frame.style.cssText = `position:relative;flex:1 1 0;min-height:${CHART_MIN_HEIGHT}px;background:#fff;border-radius:4px;overflow:hidden`;
    const canvas = document.createElement("canvas");
    canvas.style.cssText = "position:absolute;left:0;top:0;width:100%;height:100%";
    frame.append(canvas);
    const summary = document.createElement("pre");
    summary.className = "streamline-memory-summary";
    summary.style.cssText = `margin:0;flex:0 1 auto;min-height:0;overflow:auto;font-size:10px;line-height:${SUMMARY_LINE}px;`
        + "white-space:pre-wrap;overflow-wrap:anywhere;color:var(--input-text)";
    summary.addEventListener("wheel", (event) => { // scroll the summary, not the graph, while it can scroll
        if (summary.scrollHeight > summary.clientHeight) event.stopPropagation();
    }, { passive: true });
    container.append(frame, summary);
    const widget = node.addDOMWidget("memory_chart", "streamline_memory_chart", container, {
        serialize: false,
        getMinHeight: () => node.streamlineChart?.growTo || CHART_MIN_HEIGHT + SPACING + SUMMARY_MIN_LINES * SUMMARY_LINE,
    });
    node.streamlineChart = {
        promptId: null, samples: [], steps: [], summary: "", peaks: null, canvas, frame, container, widget,
        summaryElement: summary, labelBoxes: [], skippedSteps: [], size: { width: 0, height: 0 }, resolution: 0,
        shownSummary: null, growTo: 0,
    };
    new ResizeObserver(() => draw(node.streamlineChart)).observe(frame);
    node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], 400)]);
}

function gib(value, unit = "G") {
    const v = value / GIB;
    return `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)}${unit}`;
}

function intersects(a, b, gap = 0) {
    return a.x < b.x + b.w + gap && b.x < a.x + a.w + gap && a.y < b.y + b.h && b.y < a.y + a.h;
}

// Places labels without overlap; `labels` holds what is placed, in canvas CSS pixels.
class Placer {
    constructor(ctx, width, height) {
        Object.assign(this, { ctx, width, height, labels: [] });
    }

    textWidth(text) {
        return Math.ceil(this.ctx.measureText(text).width);
    }

    box(text, x, y) { // the line box, grown to the glyphs' own box where they reach further
        const m = this.ctx.measureText(text);
        const [x0, y0] = [Math.min(x, x - Math.ceil(m.actualBoundingBoxLeft)), Math.min(y, y - Math.ceil(m.actualBoundingBoxAscent))];
        const x1 = Math.max(x + Math.ceil(m.width), x + Math.ceil(m.actualBoundingBoxRight));
        const y1 = Math.max(y + LINE, y + Math.ceil(m.actualBoundingBoxDescent));
        return { x: x0, y: y0, w: x1 - x0, h: y1 - y0 };
    }

    fit(text, width) { // `text`, cut with an ellipsis to at most `width` pixels ("" when nothing fits)
        if (this.textWidth(text) <= width) return text;
        let [low, high] = [0, text.length];
        while (low < high) {
            const middle = (low + high + 1) >> 1;
            if (this.textWidth(text.slice(0, middle).trimEnd() + ELLIPSIS) <= width) low = middle;
            else high = middle - 1;
        }
        return low ? text.slice(0, low).trimEnd() + ELLIPSIS : "";
    }

    free(box, [bx0, by0, bx1, by1]) {
        return bx0 <= box.x && by0 <= box.y && box.x + box.w <= bx1 && box.y + box.h <= by1
            && !this.labels.some((other) => intersects(box, other, GAP));
    }

    // The first of `texts` (most preferred first) at the first of `positions(width)` that is inside
    // `bounds` and clear of every placed label.
    place(kind, texts, positions, bounds, color, stepId = null) {
        for (const text of texts) {
            const width = this.textWidth(text);
            for (let [x, y] of positions(width)) {
                x = Math.round(Math.min(Math.max(x, bounds[0]), bounds[2] - width));
                y = Math.round(y);
                const box = this.box(text, x, y);
                if (this.free(box, bounds)) {
                    const label = { kind, text, color, stepId, at: [x, y], ...box };
                    this.labels.push(label);
                    return label;
                }
            }
        }
        return null;
    }

    fixed(kind, text, x, y, color) {
        text = this.fit(text, this.width - 2 - Math.max(0, x));
        return text ? this.place(kind, [text], () => [[Math.max(0, x), y]], [0, 0, this.width, this.height], color) : null;
    }
}

function stepTexts(placer, label) { // "#12 KSampler" -> "#12 KSam…" -> "#12"
    const [head, ...rest] = label.split(" ");
    const prefix = head.startsWith("#") && rest.length ? head : "";
    const texts = [placer.fit(label, 160), placer.fit(label, 90), placer.fit(label, 55), prefix || placer.fit(label, 30)];
    return [...new Set(texts)].filter((text) => text && text !== ELLIPSIS);
}

function stepPriority(steps, end) { // the VRAM-peak step, the RAM-peak step, then the longest first
    const duration = (r) => (r.finished ?? end) - r.started;
    const order = [...steps].sort((a, b) => duration(b) - duration(a) || a.started - b.started);
    const first = [];
    const withVram = steps.filter((r) => r.vram_peak != null);
    if (withVram.length) first.push(withVram.reduce((a, b) => (b.vram_peak > a.vram_peak ? b : a)));
    if (steps.length) first.push(steps.reduce((a, b) => ((b.ram_peak ?? 0) > (a.ram_peak ?? 0) ? b : a)));
    return [...new Set([...first, ...order])];
}

function layout(ctx, chart, width, height) {
    const { samples, steps } = chart;
    const placer = new Placer(ctx, width, height);
    const end = Math.max(1e-3, ...samples.map((s) => s.t), ...steps.map((r) => r.finished ?? r.started));
    const series = SERIES.map(([key, name, color]) => ({ key, name, color, points: samples.filter((s) => s[key] != null) }));
    const peakValues = steps.map((r) => r.vram_peak).filter((v) => v != null);
    const values = samples.flatMap((s) => SERIES.map(([key]) => s[key]).filter((v) => v != null));
    const ceiling = Math.max(1, ...values, ...peakValues) * 1.1;
    const rows = Math.max(1, Math.min(5, Math.floor((height - 22 - 60 - 4) / (LINE + 1))));
    const plot = { left: 44, top: 22, right: width - 4, bottom: height - 4 - rows * (LINE + 1) };
    const x = (t) => plot.left + ((plot.right - plot.left) * t) / end;
    const y = (v) => plot.bottom - ((plot.bottom - plot.top) * v) / ceiling;
    const ticks = Math.max(1, Math.min(4, Math.floor((plot.bottom - plot.top) / (LINE + 4))));

    let legendX = plot.left + 4;
    for (const { name, color, points } of series) {
        if (!points.length) continue;
        const label = placer.fixed("legend", name, legendX, 2, color);
        if (label) legendX = label.x + label.w + 10;
    }
    for (let i = 0; i <= ticks; i++) {
        const text = gib((ceiling * i) / ticks);
        placer.fixed("y-tick", text, plot.left - 4 - placer.textWidth(text), y((ceiling * i) / ticks) - LINE / 2, "#666");
    }
    const axisY = plot.bottom + 3;
    placer.fixed("x-axis", "0 s", plot.left, axisY, "#666");
    const endText = `${end.toFixed(1)} s`;
    placer.fixed("x-axis", endText, plot.right - placer.textWidth(endText), axisY, "#666");

    const inner = [plot.left + 2, plot.top + 2, plot.right - 2, plot.bottom - 2];
    const peaks = [];
    for (const { key, name, color, points } of series) {
        if (!points.length) continue;
        const peak = points.reduce((a, b) => (b[key] > a[key] ? b : a));
        const [px, py] = [x(peak.t), y(peak[key])];
        peaks.push({ px, py, color });
        placer.place("peak", [`peak ${name} ${gib(peak[key], " GiB")}`, `${name} ${gib(peak[key])}`], function* (w) {
            yield* [[px + 5, py - LINE - 2], [px - 5 - w, py - LINE - 2], [px + 5, py + 3], [px - 5 - w, py + 3]];
            for (let k = 1; k <= (plot.bottom - plot.top) / LINE; k++) {
                for (const dy of [py + 3 + k * LINE, py - LINE - 2 - k * LINE]) yield* [[px + 5, dy], [px - 5 - w, dy]];
            }
        }, inner, color);
    }

    const rowYs = Array.from({ length: rows }, (_, i) => axisY + i * (LINE + 1));
    const band = [plot.left, plot.bottom + 1, width - 2, height - 2];
    const skipped = [];
    for (const record of stepPriority(steps, end)) {
        const mx = x(record.started);
        const placed = placer.place("step", stepTexts(placer, record.label), function* (w) {
            for (const row of rowYs) yield* [[mx + 3, row], [mx - 3 - w, row]];
        }, band, "#555", record.step_id);
        if (!placed) skipped.push(record.step_id);
    }
    if (skipped.length) placer.fixed("note", `${steps.length - skipped.length}/${steps.length} steps labelled`, legendX, 2, "#888");
    return { labels: placer.labels, skipped, plot, x, y, ticks, ceiling, end, series, peaks };
}

function draw(chart) {
    const { canvas, frame, samples, steps } = chart;
    const [width, height] = [frame.clientWidth, frame.clientHeight];
    if (!width || !height) return; // not shown now: drawn when it is (the ResizeObserver calls back)
    const resolution = Math.min(4, Math.max(1, (window.devicePixelRatio || 1) * (app.canvas?.ds?.scale ?? 1)));
    canvas.width = Math.round(width * resolution);
    canvas.height = Math.round(height * resolution);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(resolution, 0, 0, resolution, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = FONT;
    ctx.textBaseline = "top";
    const { labels, skipped, plot, x, y, ticks, ceiling, end, series, peaks } = layout(ctx, chart, width, height);

    ctx.strokeStyle = "#ddd";
    ctx.lineWidth = 1;
    for (let i = 0; i <= ticks; i++) {
        const v = y((ceiling * i) / ticks);
        ctx.beginPath(); ctx.moveTo(plot.left, v); ctx.lineTo(plot.right, v); ctx.stroke();
    }
    const labelled = new Set(labels.filter((l) => l.kind === "step").map((l) => l.stepId));
    for (const record of steps) {
        ctx.strokeStyle = labelled.has(record.step_id) ? "#999" : "#e2e2e2";
        ctx.beginPath(); ctx.moveTo(x(record.started), plot.top); ctx.lineTo(x(record.started), plot.bottom); ctx.stroke();
        if (record.vram_peak != null) {
            ctx.strokeStyle = "#c44e52";
            ctx.beginPath();
            ctx.moveTo(x(record.started), y(record.vram_peak)); ctx.lineTo(x(record.finished ?? end), y(record.vram_peak));
            ctx.stroke();
        }
    }
    for (const { key, color, points } of series) {
        if (!points.length) continue;
        ctx.strokeStyle = color;
        ctx.lineWidth = 2;
        ctx.beginPath();
        points.forEach((s, i) => (i ? ctx.lineTo(x(s.t), y(s[key])) : ctx.moveTo(x(s.t), y(s[key]))));
        ctx.stroke();
        ctx.lineWidth = 1;
    }
    for (const { px, py, color } of peaks) {
        ctx.fillStyle = color;
        ctx.beginPath(); ctx.arc(px, py, 3, 0, 2 * Math.PI); ctx.fill();
    }
    for (const label of labels) {
        if (label.kind === "peak") { ctx.fillStyle = "rgba(255,255,255,0.85)"; ctx.fillRect(label.x, label.y, label.w, label.h); }
        ctx.fillStyle = label.color;
        ctx.fillText(label.text, ...label.at);
    }
    Object.assign(chart, {
        labelBoxes: labels.map(({ kind, text, stepId, x, y, w, h }) => ({ kind, text, stepId, x, y, w, h })),
        skippedSteps: skipped, size: { width, height }, resolution,
    });
}

// Shows the summary, growing the node once per new summary so that all of it is in view (up to
// SUMMARY_MAX_HEIGHT pixels; a longer one scrolls within that).
function showSummary(node) {
    const chart = node.streamlineChart;
    if (chart.shownSummary === chart.summary) return;
    chart.shownSummary = chart.summary;
    const element = chart.summaryElement;
    element.textContent = chart.summary;
    if (!chart.summary) return;
    const lines = chart.summary.split("\n").length;
    const content = Math.min(SUMMARY_MAX_HEIGHT, Math.max(element.scrollHeight, lines * SUMMARY_LINE));
    // the node's height with the widget that tall, from LiteGraph's own layout (the DOM may lag a frame);
    // the frontend gives the element the widget's height less its margin above and below
    chart.growTo = CHART_MIN_HEIGHT + SPACING + content + 2 * (chart.widget.margin ?? 10);
    let height;
    try {
        height = node.computeSize()[1];
    } finally {
        chart.growTo = 0;
    }
    if (height > node.size[1]) {
        node.setSize([node.size[0], height]);
        node.setDirtyCanvas(true, true);
    }
}

function update(detail, change) {
    for (const node of monitors()) {
        const chart = node.streamlineChart;
        if (chart.promptId !== detail.prompt_id) {
            Object.assign(chart, { promptId: detail.prompt_id, samples: [], steps: [], summary: "", peaks: null });
        }
        change(chart);
        draw(chart);
        showSummary(node);
        node.setDirtyCanvas(true, true);
    }
}

app.registerExtension({
    name: "Streamline.MemoryMonitor",
    setup() {
        api.addEventListener("streamline.memory.samples", ({ detail }) =>
            update(detail, (chart) => { chart.samples.push(...detail.samples); chart.steps = detail.steps; }));
        api.addEventListener("streamline.memory.report", ({ detail }) =>
            update(detail, (chart) => Object.assign(chart, { steps: detail.steps, summary: detail.summary, peaks: detail.peaks })));
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== NODE) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            onNodeCreated?.apply(this, arguments);
            createChart(this);
        };
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            if (this.streamlineChart && !this.streamlineChart.summary) {
                this.streamlineChart.summary = (message?.text ?? []).join("\n");
                draw(this.streamlineChart);
                showSummary(this);
            }
        };
        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function () { // sharp text at the graph's zoom
            onDrawForeground?.apply(this, arguments);
            const chart = this.streamlineChart;
            const resolution = Math.min(4, Math.max(1, (window.devicePixelRatio || 1) * (app.canvas?.ds?.scale ?? 1)));
            if (chart && chart.resolution && chart.resolution !== resolution) draw(chart);
        };
    },
});
