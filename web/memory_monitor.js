// Memory Monitor widget: a live chart of RAM / VRAM over the running prompt (one marker per
// executed node, the peaks labelled) and the final summary, fed by the pack's server events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "StreamlineMemoryMonitor";
const GIB = 1024 ** 3;
const SERIES = [
    ["ram", "RAM", "#3465a4"],
    ["vram", "VRAM (torch)", "#c44e52"],
    ["vram_device", "VRAM (device)", "#dd8452"],
];

function monitors() {
    return (app.graph?._nodes ?? []).filter((node) => node.type === NODE && node.streamlineChart);
}

function createChart(node) {
    const container = document.createElement("div");
    container.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%";
    const canvas = document.createElement("canvas");
    canvas.width = 480;
    canvas.height = 200;
    canvas.style.cssText = "width:100%;flex:1 1 auto;min-height:120px;background:#fff;border-radius:4px";
    const summary = document.createElement("pre");
    summary.style.cssText = "margin:0;max-height:90px;overflow:auto;font-size:10px;white-space:pre-wrap;color:var(--input-text)";
    container.append(canvas, summary);
    node.addDOMWidget("memory_chart", "streamline_memory_chart", container, { serialize: false, getMinHeight: () => 280 });
    node.streamlineChart = { promptId: null, samples: [], steps: [], summary: "", peaks: null, canvas, summaryElement: summary };
    node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], 360)]);
}

function draw(chart) {
    const { canvas, samples, steps } = chart;
    const ctx = canvas.getContext("2d");
    const [w, h, left, bottom, top] = [canvas.width, canvas.height, 44, 18, 16];
    ctx.clearRect(0, 0, w, h);
    ctx.font = "10px sans-serif";
    const end = Math.max(1e-3, ...samples.map((s) => s.t), ...steps.map((r) => r.finished ?? r.started));
    const peakValues = steps.map((r) => r.vram_peak).filter((v) => v != null);
    const values = samples.flatMap((s) => SERIES.map(([key]) => s[key]).filter((v) => v != null));
    const ceiling = Math.max(1, ...values, ...peakValues) * 1.1;
    const x = (t) => left + ((w - left - 4) * t) / end;
    const y = (v) => h - bottom - ((h - bottom - top) * v) / ceiling;
    ctx.strokeStyle = "#ddd";
    ctx.fillStyle = "#666";
    for (let i = 0; i <= 4; i++) {
        const v = (ceiling * i) / 4;
        ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(w - 4, y(v)); ctx.stroke();
        ctx.fillText(`${(v / GIB).toFixed(2)}G`, 2, y(v) + 3);
    }
    ctx.fillText(`${end.toFixed(1)} s`, w - 40, h - 4);
    const duration = (r) => (r.finished ?? end) - r.started;
    const labelled = new Set([...steps].sort((a, b) => duration(b) - duration(a)).slice(0, 5));
    steps.forEach((record) => {
        ctx.strokeStyle = "#bbb";
        ctx.beginPath(); ctx.moveTo(x(record.started), top); ctx.lineTo(x(record.started), h - bottom); ctx.stroke();
    });
    [...labelled].sort((a, b) => a.started - b.started).forEach((record, index) => {
        ctx.fillStyle = "#555";
        ctx.fillText(record.label.slice(0, 22), Math.min(x(record.started) + 2, w - 110), top + 12 + 11 * index);
    });
    const legend = [];
    for (const [key, name, color] of SERIES) {
        const points = samples.filter((s) => s[key] != null);
        if (!points.length) continue;
        legend.push([name, color]);
        ctx.strokeStyle = color;
        ctx.lineWidth = 2;
        ctx.beginPath();
        points.forEach((s, i) => (i ? ctx.lineTo(x(s.t), y(s[key])) : ctx.moveTo(x(s.t), y(s[key]))));
        ctx.stroke();
        ctx.lineWidth = 1;
        const peak = points.reduce((a, b) => (b[key] > a[key] ? b : a));
        ctx.fillStyle = color;
        ctx.beginPath(); ctx.arc(x(peak.t), y(peak[key]), 3, 0, 2 * Math.PI); ctx.fill();
        ctx.fillText(`peak ${name} ${(peak[key] / GIB).toFixed(2)} GiB`, Math.min(x(peak.t) + 5, w - 150), Math.max(y(peak[key]) - 4, top + 8));
    }
    legend.forEach(([name, color], i) => { ctx.fillStyle = color; ctx.fillText(name, left + 4 + 90 * i, 10); });
    chart.summaryElement.textContent = chart.summary;
}

function update(detail, change) {
    for (const node of monitors()) {
        const chart = node.streamlineChart;
        if (chart.promptId !== detail.prompt_id) {
            Object.assign(chart, { promptId: detail.prompt_id, samples: [], steps: [], summary: "", peaks: null });
        }
        change(chart);
        draw(chart);
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
            }
        };
    },
});
