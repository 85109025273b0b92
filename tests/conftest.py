import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from devkit.comfy_env import comfyui_dir, comfyui_version, import_comfyui, import_pack  # noqa: E402
from devkit.comfy_server import ComfyServer  # noqa: E402
from devkit.demo_assets import prepare_base_dir  # noqa: E402

import_comfyui()

# The default host's screenshots and charts go to artifacts/, another host's to artifacts/comfyui-VERSION/.
ARTIFACTS = REPO_ROOT / "artifacts"
if comfyui_dir() != (REPO_ROOT / ".comfyui").resolve():
    ARTIFACTS = ARTIFACTS / f"comfyui-{comfyui_version()}"
# A folder name with a dot and a dash: the pack must not depend on what its folder is called.
PACK_FOLDER_NAME = "streamline-pack.under_test"


def pytest_report_header(config):
    import torch
    return f"host: ComfyUI {comfyui_version()} at {comfyui_dir()}; python {sys.executable}; torch {torch.__version__}"


@pytest.fixture(scope="session")
def pack():
    """The pack imported in-process as ComfyUI imports a custom node folder."""
    return import_pack()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("comfy_base")
    prepare_base_dir(base)
    server = ComfyServer(base, pack_folder_name=PACK_FOLDER_NAME).start()
    request.config.stash["comfy_server"] = server
    yield server
    server.stop()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def load_workflow(name: str) -> dict:
    return json.loads((REPO_ROOT / "workflows" / name).read_text())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    server = item.config.stash.get("comfy_server", None)
    if report.failed and server is not None and "comfy_server" in item.fixturenames:
        report.sections.append(("ComfyUI server log (tail)", server.log()[-15000:]))
