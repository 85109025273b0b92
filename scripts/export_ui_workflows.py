"""Writes workflows/<name>.ui.json for every workflows/<name>.api.json, converted by the real frontend."""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.browser import api_to_ui_workflow, frontend_page  # noqa: E402
from devkit.comfy_env import REPO_ROOT  # noqa: E402
from devkit.comfy_server import ComfyServer  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server, frontend_page(server.url) as page:
        for api_file in sorted((REPO_ROOT / "workflows").glob("*.api.json")):
            name = api_file.name.removesuffix(".api.json")
            workflow = api_to_ui_workflow(page, json.loads(api_file.read_text()), name)
            (api_file.parent / f"{name}.ui.json").write_text(json.dumps(workflow, indent=1) + "\n")
            print(f"wrote workflows/{name}.ui.json")


if __name__ == "__main__":
    main()
