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


# The names of the workflows the shipped examples replaced: -> (shipped workflow, without the slicing nodes)
LEGACY_WORKFLOWS = {
    "demo_wan21_t2v_tiny.api.json": ("wan2.1_t2v_1.3B_sliced", True),
    "demo_wan21_t2v_sliced_tiny.api.json": ("wan2.1_t2v_1.3B_sliced", False),
    "demo_wan21_t2v_planned_tiny.api.json": ("wan2.1_t2v_1.3B_planner", False),
    "demo_wan21_t2v_dualparal_tiny.api.json": ("wan2.1_t2v_1.3B_dualparal_long", False),
    "demo_svd_img2vid_tiny.api.json": ("svd_xt_img2vid_sliced", True),
    "demo_svd_img2vid_sliced_tiny.api.json": ("svd_xt_img2vid_sliced", False),
    "demo_cmd_reconstruction.api.json": ("cmd_reconstruction", False),
    "demo_cmd_generation.api.json": ("cmd_generation", False),
}


def load_workflow(name: str, stock: bool = False) -> dict:
    """A shipped example workflow (example_workflows/<name>.json) as the API prompt it queues, on the
    tiny fixture models (devkit/workflows.py); `stock=True` leaves out the slicing nodes."""
    from devkit.workflows import example_prompt

    if name in LEGACY_WORKFLOWS:
        name, stock = LEGACY_WORKFLOWS[name]
    return example_prompt(name, stock=stock)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    server = item.config.stash.get("comfy_server", None)
    if report.failed and server is not None and "comfy_server" in item.fixturenames:
        report.sections.append(("ComfyUI server log (tail)", server.log()[-15000:]))


@pytest.fixture(scope="module")
def svd_model(pack):
    from devkit.model_fixtures import build_svd
    from streamline_helpers import patcher
    return patcher(build_svd("micro"))


@pytest.fixture(scope="module")
def svd_vae(pack):
    from devkit.model_fixtures import build_svd_vae
    return build_svd_vae()


@pytest.fixture(scope="module")
def wan_model(pack):
    from devkit.model_fixtures import build_wan
    from streamline_helpers import patcher
    return patcher(build_wan("tiny"))
