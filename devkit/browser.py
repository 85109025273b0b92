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


def api_to_ui_workflow(page, api_prompt: dict, name: str, note: str | None = None) -> dict:
    """Lets the frontend itself turn an API-format prompt into a UI workflow (nodes with the prompt's
    `_meta.title`, links, widgets), laid out in columns, with a Note left of the graph if given."""
    return json.loads(page.evaluate("""async ([prompt, name, note]) => {
        await app.loadApiJson(prompt, name);
        app.graph.arrange?.(60);
        for (const node of app.graph.nodes)  // shared workflows reproduce their outputs: keep seeds fixed
            for (const widget of node.widgets ?? [])
                if (widget.name === "control_after_generate") widget.value = "fixed";
        if (note) {
            const left = Math.min(...app.graph.nodes.map((n) => n.pos[0]));
            const top = Math.min(...app.graph.nodes.map((n) => n.pos[1]));
            const node = LiteGraph.createNode("Note");
            node.title = "Read me: which files go where";
            node.widgets[0].value = note;
            node.size = [420, 380];
            node.pos = [left - 480, top];
            app.graph.add(node);
        }
        const data = app.graph.serialize();
        for (const node of data.nodes)  // every node's title saved, also where it is the node's display name
            node.title ??= app.graph.getNodeById(node.id).title;
        return JSON.stringify(data);  // as saved: undefined fields left out, not null
    }""", [api_prompt, name, note]))


def fit_graph(page, square_on_pack: bool = False) -> dict:
    """Zooms and pans the canvas so that every node is in view (at most at 100 %, so the text stays
    drawn); returns the graph's rectangle on the page. `square_on_pack`: a square around the pack's
    nodes instead (what a Templates card shows)."""
    rect = page.evaluate("""(squareOnPack) => {
        const bounds = (nodes) => [Math.min(...nodes.map((n) => n.pos[0])) - 20, Math.min(...nodes.map((n) => n.pos[1])) - 50,
                                   Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20,
                                   Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20];
        let [x0, y0, x1, y1] = bounds(app.graph.nodes);
        const pack = app.graph.nodes.filter((n) => n.type.startsWith("Streamline"));
        if (squareOnPack && pack.length) {  // a square around the pack's nodes, moved inside the graph where it fits
            const [px0, py0, px1, py1] = bounds(pack), side = Math.max(px1 - px0, py1 - py0, 700);
            const place = (low, high, from, to) => side >= to - from ? (from + to - side) / 2
                : Math.min(Math.max((low + high - side) / 2, from), to - side);
            [x0, y0] = [place(px0, px1, x0, x1), place(py0, py1, y0, y1)];
            [x1, y1] = [x0 + side, y0 + side];
        }
        const canvas = app.canvas.canvas, box = canvas.getBoundingClientRect();
        const width = box.width - 140, height = box.height - 200;  // clear of the side bar and the top bar
        const scale = Math.min(1, width / (x1 - x0), height / (y1 - y0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset[0] = 100 / scale - x0;
        app.canvas.ds.offset[1] = 150 / scale - y0;
        app.canvas.setDirty(true, true);
        return {x: box.left + 100, y: box.top + 150, width: (x1 - x0) * scale, height: (y1 - y0) * scale};
    }""", square_on_pack)
    page.evaluate("() => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)))")
    return rect


def thumbnail(page, workflow: dict, path, side: int = 640) -> None:
    """A square JPEG of the workflow's graph around the pack's nodes, `side` pixels (the Templates dialog
    shows <name>.jpg for extension templates, on square cards). Drawn on a large page so that the
    nodes' text is legible, then scaled down."""
    import io

    from PIL import Image

    viewport = page.viewport_size
    page.set_viewport_size({"width": 2600, "height": 1700})
    try:
        page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
        rect = fit_graph(page, square_on_pack=True)
        png = page.screenshot(clip=rect, type="png")
    finally:
        page.set_viewport_size(viewport)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((side, side), Image.LANCZOS)
    image.save(path, "JPEG", quality=85)


def ui_workflow_to_api(page, workflow: dict) -> dict:
    """Loads a UI workflow in the frontend and returns the API prompt it would queue."""
    return page.evaluate("""async (workflow) => {
        await app.loadGraphData(workflow);
        return (await app.graphToPrompt()).output;
    }""", workflow)
