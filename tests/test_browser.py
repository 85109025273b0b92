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
    expected = load_workflow(ui_file.replace(".ui.json", ".api.json"))
    assert {k: (n["class_type"], n["inputs"]) for k, n in queued.items()} == \
        {k: (n["class_type"], n["inputs"]) for k, n in expected.items()}
