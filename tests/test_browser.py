"""The pack in the real ComfyUI frontend, in headless Chromium (Debian's package, driven by Playwright)."""
import json

import pytest

from conftest import REPO_ROOT, load_workflow
from devkit.browser import chromium_path, frontend_page, ui_workflow_to_api

UI_WORKFLOWS = sorted(p.name for p in (REPO_ROOT / "workflows").glob("*.ui.json"))


@pytest.fixture(scope="module")
def page(comfy_server):
    assert chromium_path(), "chromium is missing: `make setup` installs Debian's package (as root)"
    with frontend_page(comfy_server.url) as page:
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


@pytest.mark.parametrize("ui_file", UI_WORKFLOWS)
def test_ui_workflow_queues_the_same_prompt_as_its_api_twin(page, ui_file):
    queued = ui_workflow_to_api(page, json.loads((REPO_ROOT / "workflows" / ui_file).read_text()))
    for node in queued.values():  # the frontend's own display widget on Preview Any, ignored by the server
        if node["class_type"] == "PreviewAny":
            node["inputs"].pop("preview", None)
    expected = load_workflow(ui_file.replace(".ui.json", ".api.json"))
    assert {k: (n["class_type"], n["inputs"]) for k, n in queued.items()} == \
        {k: (n["class_type"], n["inputs"]) for k, n in expected.items()}


def test_memory_monitor_widget_charts_the_running_prompt(page, artifacts_dir):
    workflow = json.loads((REPO_ROOT / "workflows" / "demo_wan21_t2v_tiny.ui.json").read_text())
    page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
    monitor = "app.graph._nodes.find((n) => n.type === 'StreamlineMemoryMonitor')"
    assert page.evaluate(f"!!{monitor}.streamlineChart")
    page.evaluate("app.queuePrompt(0)")
    page.wait_for_function(f"{monitor}.streamlineChart.peaks !== null", timeout=300_000)
    chart = page.evaluate(f"""(() => {{
        const chart = {monitor}.streamlineChart;
        return {{samples: chart.samples.length, steps: chart.steps.map((s) => s.label), summary: chart.summary,
                 ram: chart.samples.map((s) => s.ram)}};
    }})()""")
    assert chart["samples"] > 0 and min(chart["ram"]) > 0
    assert any(label.endswith("Memory Monitor") or "StreamlineMemoryMonitor" in label for label in chart["steps"])
    assert chart["summary"].startswith("peak RAM") and "VRAM unavailable" in chart["summary"]
    page.evaluate(f"""(() => {{
        const node = {monitor};
        app.canvas.ds.scale = 1.2;
        app.canvas.centerOnNode(node);
        app.canvas.setDirty(true, true);
    }})()""")
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "memory_monitor_widget.png"))
