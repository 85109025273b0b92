"""The pack in the real ComfyUI frontend, in headless Chromium (Debian's package, driven by Playwright)."""
import json
import re

import pytest

from conftest import PACK_FOLDER_NAME, load_workflow
from devkit.browser import chromium_path, frontend_page, ui_workflow_to_api
from devkit.workflows import example_names, load_ui, ui_to_api

EXAMPLES = example_names()


@pytest.fixture(scope="module")
def page(comfy_server):
    assert chromium_path(), "chromium is missing: `make setup` installs Debian's package (as root)"
    with frontend_page(comfy_server.url) as page:
        page.console_errors = []
        page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.console_errors.append(f"{e.name}: {e.message}\n{e.stack}"))
        yield page


def test_frontend_registers_the_pack_nodes_and_extension(page):
    registered = page.evaluate("Object.keys(LiteGraph.registered_node_types)")
    assert "StreamlineMemoryMonitor" in registered
    assert "Streamline.MemoryMonitor" in page.evaluate("app.extensions.map(e => e.name)")


def test_node_library_lists_memory_monitor_under_streamline(page, artifacts_dir):
    page.locator(".node-library-tab-button").click()
    search = page.get_by_placeholder("Search", exact=False).first
    search.fill("Memory Monitor")
    entry = page.get_by_text("Memory Monitor", exact=True).first
    entry.wait_for(state="visible", timeout=30_000)
    page.screenshot(path=str(artifacts_dir / "node_library_memory_monitor.png"))
    assert entry.is_visible()


@pytest.mark.parametrize("name", EXAMPLES)
def test_converter_gives_what_the_frontend_queues(page, name):
    """devkit/workflows.py's pure-Python conversion of each shipped workflow equals the frontend's."""
    queued = ui_workflow_to_api(page, load_ui(name))
    for node in queued.values():  # the frontend's own display widget on Preview Any, ignored by the server
        if node["class_type"] == "PreviewAny":
            node["inputs"].pop("preview", None)
    converted = ui_to_api(load_ui(name))
    assert {k: (n["class_type"], n["inputs"]) for k, n in queued.items()} == \
        {k: (n["class_type"], n["inputs"]) for k, n in converted.items()}
    for node in load_ui(name)["nodes"]:
        if node.get("title") and str(node["id"]) in queued:
            assert queued[str(node["id"])]["_meta"]["title"] == converted[str(node["id"])]["_meta"]["title"]


def _pack_errors(errors: list) -> list:
    """Console errors that come from the pack: they name it, its nodes or its scripts. The frontend's
    own look-ups of node packs on api.comfy.org (blocked offline by its content security policy) are not
    the pack's."""
    return [e for e in errors if "api.comfy.org" not in e
            and any(word in e.lower() for word in ("streamline", PACK_FOLDER_NAME.lower(), "memory_monitor"))]


STABLE_CARD_JS = """(name) => {
    const element = [...document.querySelectorAll('[role=dialog] *')]
        .find((e) => e.children.length === 0 && e.textContent.trim() === name);
    const stable = element !== undefined && element === window.streamlineCard && element.isConnected;
    window.streamlineCard = element;
    return stable;
}"""


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_opens_from_the_templates_dialog(page, name, artifacts_dir):
    """Templates -> search the name -> click its card (extension templates are listed by file name):
    the graph loads with every node known, no dialog stays open (missing nodes, validation), and no
    console error comes from the pack."""
    page.evaluate("app.graph.clear()")
    page.console_errors.clear()
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")
    dialog.get_by_placeholder("Search").fill(name)
    card = dialog.get_by_text(name, exact=True).first
    card.wait_for(state="visible", timeout=30_000)
    # the list re-renders while the search filters and the thumbnails load (a busy machine stretches
    # that): click once the card's element has stayed the same over two polls
    page.wait_for_function(STABLE_CARD_JS, arg=name, polling=250, timeout=30_000)
    card.click()
    expected = len(load_ui(name)["nodes"])
    page.wait_for_function(f"app.graph.nodes.length === {expected}", timeout=30_000)
    page.get_by_role("dialog").first.wait_for(state="detached", timeout=30_000)
    unknown = page.evaluate("app.graph.nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type)")
    assert unknown == []
    assert sorted(page.evaluate("app.graph.nodes.map((n) => String(n.id))")) == \
        sorted(str(n["id"]) for n in load_ui(name)["nodes"])
    assert page.locator(".p-dialog, [role=dialog]").count() == 0
    # every file it names is in the models folder (fixtures, stand-ins): no missing-models warning either
    assert page.get_by_text(re.compile("missing model", re.IGNORECASE)).count() == 0
    assert _pack_errors(page.console_errors) == []
    if name == "wan2.1_t2v_1.3B_sliced":
        page.screenshot(path=str(artifacts_dir / "template_wan2.1_t2v_1.3B_sliced.png"))


MONITOR = "app.graph._nodes.find((n) => n.type === 'StreamlineMemoryMonitor')"

# From the page: the widget's label rectangles (kept on node.streamlineChart by web/memory_monitor.js)
# checked for overlaps and for staying inside the chart, and whether all of the summary can be read:
# the text is the report's, its element lies inside the node, and scrolled to its end it shows its end.
MONITOR_GEOMETRY_JS = """(() => {
    const node = %s;
    const chart = node.streamlineChart;
    const boxes = chart.labelBoxes;
    const overlaps = [];
    boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b) => {
        if (a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h) overlaps.push([a, b]);
    }));
    const outside = boxes.filter((b) =>
        b.x < 0 || b.y < 0 || b.x + b.w > chart.size.width || b.y + b.h > chart.size.height);
    const element = chart.summaryElement;
    element.scrollTop = element.scrollHeight;
    const rect = element.getBoundingClientRect();
    const canvasRect = app.canvas.canvas.getBoundingClientRect();
    const nodeBottom = canvasRect.top + (node.pos[1] + node.size[1] + app.canvas.ds.offset[1]) * app.canvas.ds.scale;
    return {boxes, overlaps, outside, size: chart.size, skipped: chart.skippedSteps.length, steps: chart.steps.length,
            text: element.textContent, summary: chart.summary, overflowY: getComputedStyle(element).overflowY,
            scrollHeight: element.scrollHeight, clientHeight: element.clientHeight, scrollTop: element.scrollTop,
            summaryTop: rect.top, summaryBottom: rect.bottom, nodeBottom};
})()""" % MONITOR

# Resolves once the widget's summary box and chart size stay the same over two animation frames.
MONITOR_SETTLED_JS = """async () => {
    const chart = (%s).streamlineChart;
    let previous = null;
    for (let frame = 0; frame < 600; frame++) {
        await new Promise((resolve) => requestAnimationFrame(resolve));
        const rect = chart.summaryElement.getBoundingClientRect();
        const now = JSON.stringify([rect.top, rect.bottom, rect.width, chart.size, chart.resolution]);
        if (now === previous) return true;
        previous = now;
    }
    return false;
}""" % MONITOR


def _monitor_geometry(page, whole_summary_in_view: bool) -> dict:
    """Checks the widget from the page: no two label rectangles intersect, all lie inside the chart, and
    the whole summary is reachable (in view, or scrolled to its end inside the node)."""
    assert page.evaluate(MONITOR_SETTLED_JS)
    geometry = page.evaluate(MONITOR_GEOMETRY_JS)
    assert geometry["size"]["width"] > 0 and geometry["boxes"], geometry
    assert not geometry["overlaps"], geometry["overlaps"]
    assert not geometry["outside"], geometry["outside"]
    steps = [b for b in geometry["boxes"] if b["kind"] == "step"]
    assert steps and len(steps) + geometry["skipped"] == geometry["steps"]
    assert geometry["text"] == geometry["summary"] and geometry["summary"]
    assert geometry["clientHeight"] >= 3 * 13 - 1  # at least three lines of it in view
    assert geometry["summaryBottom"] <= geometry["nodeBottom"] + 1, geometry  # not cut by the node's edge
    if whole_summary_in_view:
        assert geometry["scrollHeight"] <= geometry["clientHeight"] + 1, geometry
    else:  # longer than the widget shows: it scrolls to its last line
        assert geometry["overflowY"] in ("auto", "scroll")
        assert geometry["scrollTop"] + geometry["clientHeight"] >= geometry["scrollHeight"] - 1, geometry
    return geometry


def _feed_monitor_recording(page, recording, summary: str):
    """Sends a recorded report to the widget as the server's two events would."""
    samples = [vars(s) for s in recording.samples]
    steps = [vars(r) for r in recording.steps]
    page.evaluate("""async ([promptId, samples, steps, summary]) => {
        const { api } = await import("/scripts/api.js");
        const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));
        send("streamline.memory.samples", { prompt_id: promptId, samples, steps });
        send("streamline.memory.report", { prompt_id: promptId, steps, summary, peaks: { ram: 0, vram: null } });
    }""", [recording.run_id, samples, steps, summary])
    page.wait_for_function(f"{MONITOR}.streamlineChart.promptId === {json.dumps(recording.run_id)}")


def _show_monitor(page):
    page.evaluate(f"""(() => {{
        const node = {MONITOR};
        app.canvas.ds.scale = 1.2;
        app.canvas.centerOnNode(node);
        app.canvas.setDirty(true, true);
    }})()""")


def test_memory_monitor_widget_charts_the_running_prompt(page, pack, artifacts_dir):
    from streamline_helpers import recording_of

    prompt = load_workflow("wan2.1_t2v_1.3B_sliced", stock=True)  # the shipped graph on the fixtures
    page.evaluate("async (prompt) => { await app.loadApiJson(prompt, 'wan21_t2v'); app.graph.arrange?.(60); }", prompt)
    assert page.evaluate(f"!!{MONITOR}.streamlineChart")
    page.evaluate("app.queuePrompt(0)")
    page.wait_for_function(f"{MONITOR}.streamlineChart.peaks !== null", timeout=300_000)
    chart = page.evaluate(f"""(() => {{
        const chart = {MONITOR}.streamlineChart;
        return {{samples: chart.samples.length, steps: chart.steps.map((s) => s.label), summary: chart.summary,
                 ram: chart.samples.map((s) => s.ram)}};
    }})()""")
    assert chart["samples"] > 0 and min(chart["ram"]) > 0
    assert any(label.endswith("Memory Monitor") or "StreamlineMemoryMonitor" in label for label in chart["steps"])
    assert chart["summary"].startswith("peak RAM") and "VRAM unavailable" in chart["summary"]
    _show_monitor(page)
    _monitor_geometry(page, whole_summary_in_view=True)  # the node grew to the real report's summary
    page.screenshot(path=str(artifacts_dir / "memory_monitor_widget.png"))

    # recorded reports of many steps, very short and very long ones, long node titles
    for n_steps, in_view in ((12, True), (200, False)):
        recording = recording_of(n_steps, "mixed", vram=True, long_labels=True)
        recording.run_id = f"recorded-{n_steps}-steps"
        _feed_monitor_recording(page, recording, recording.summary() + "\nreport: output/streamline_memory/x.json")
        _show_monitor(page)
        geometry = _monitor_geometry(page, whole_summary_in_view=in_view)
        assert n_steps < 200 or geometry["skipped"] > 0  # a narrow chart cannot name 200 steps
    # the mouse wheel over the long summary scrolls it, not the graph
    summary = f"{MONITOR}.streamlineChart.summaryElement"
    x, y, scale = page.evaluate(f"""(() => {{
        const element = {summary};
        element.scrollTop = 0;
        const rect = element.getBoundingClientRect();
        return [rect.left + rect.width / 2, rect.top + rect.height / 2, app.canvas.ds.scale];
    }})()""")
    page.mouse.move(x, y)
    page.mouse.wheel(0, 300)
    page.wait_for_function(f"{summary}.scrollTop > 0")
    assert page.evaluate("app.canvas.ds.scale") == scale
    page.screenshot(path=str(artifacts_dir / "memory_monitor_widget_200_steps.png"))
    page.evaluate(f"{MONITOR}.setSize([300, {MONITOR}.size[1]]); app.canvas.setDirty(true, true)")  # placed again
    page.wait_for_function(f"{MONITOR}.streamlineChart.size.width < 290")
    _monitor_geometry(page, whole_summary_in_view=False)
