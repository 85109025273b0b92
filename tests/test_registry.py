"""Registry-ready: the ComfyUI Registry's own check (`comfy node validate`, comfy-cli in .venv-tools/,
set up by scripts/setup_env.sh) passes on the pack's tracked files, and it does check: a pack with no
version fails it, and an eval() is reported."""
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

COMFY_CLI = REPO_ROOT / ".venv-tools" / "bin" / "comfy"


def tracked_copy(target):
    """The files a clone of the pack holds (what the Registry gets), copied to `target`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO_ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target / name)
    return target


def validate(folder) -> subprocess.CompletedProcess:
    assert COMFY_CLI.exists(), "comfy-cli is missing: run `make setup` (scripts/setup_env.sh makes .venv-tools/)"
    return subprocess.run([str(COMFY_CLI), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                          cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.fixture
def pack_copy(tmp_path):
    return tracked_copy(tmp_path / "pack")


def test_comfy_node_validate_passes(pack_copy):
    result = validate(pack_copy)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output and "Security warnings" not in output, output


def test_comfy_node_validate_catches_what_the_registry_refuses(pack_copy):
    pyproject = pack_copy / "pyproject.toml"
    text = pyproject.read_text()
    (pack_copy / "unsafe.py").write_text("def run(code):\n    return eval(code)\n")
    warned = validate(pack_copy)
    output = warned.stdout + warned.stderr
    assert "Security warnings" in output and "S307" in output, output
    pyproject.write_text(text.replace('version = "', 'version = "" # was "', 1))
    assert validate(pack_copy).returncode != 0
