"""Headless Chromium (Debian's package) on the real ComfyUI frontend, driven by Playwright."""
import json
import shutil
from contextlib import contextmanager

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return shutil.which("chromium")


@contextmanager
def frontend_page(url: str):
    """A page with ComfyUI's frontend loaded and its node definitions registered."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_function("window.app?.graph && window.LiteGraph?.registered_node_types", timeout=90_000)
            yield page
        finally:
            browser.close()


def api_to_ui_workflow(page, api_prompt: dict, name: str) -> dict:
    """Lets the frontend itself turn an API-format prompt into a UI workflow (nodes, links, widgets)."""
    return json.loads(page.evaluate("""async ([prompt, name]) => {
        await app.loadApiJson(prompt, name);
        app.graph.arrange?.(60);
        for (const node of app.graph.nodes)  // shared workflows reproduce their outputs: keep seeds fixed
            for (const widget of node.widgets ?? [])
                if (widget.name === "control_after_generate") widget.value = "fixed";
        return JSON.stringify(app.graph.serialize());  // as saved: undefined fields left out, not null
    }""", [api_prompt, name]))


def ui_workflow_to_api(page, workflow: dict) -> dict:
    """Loads a UI workflow in the frontend and returns the API prompt it would queue."""
    return page.evaluate("""async (workflow) => {
        await app.loadGraphData(workflow);
        return (await app.graphToPrompt()).output;
    }""", workflow)
