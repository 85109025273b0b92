"""Locates the ComfyUI this checkout runs against and makes it (and the pack) importable in-process."""
import importlib.util
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_streamline"


def comfyui_dir() -> Path:
    path = Path(os.environ.get("COMFYUI_DIR") or REPO_ROOT / ".comfyui").resolve()
    if not (path / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI at {path}: run `make setup` (or set COMFYUI_DIR=/path/to/ComfyUI).")
    return path


def comfyui_version() -> str:
    """The version the ComfyUI under test declares (its comfyui_version.py), without importing it."""
    text = (comfyui_dir() / "comfyui_version.py").read_text()
    return re.search(r"__version__\s*=\s*[\"']([^\"']+)", text).group(1)


def import_comfyui() -> Path:
    """Puts ComfyUI on sys.path, on the CPU unless CUDA is present, ready for `import comfy.*`/`nodes`."""
    root = comfyui_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True  # must precede the first import of comfy.model_management
    # SDPA attention, as ComfyUI picks on a GPU (on a CPU it would pick sub-quadratic attention), so
    # in-process measurements match what users' cards run.
    args.use_pytorch_cross_attention = True
    import utils.extra_config  # noqa: F401  (before `nodes`/`server`, which shadow `utils`)
    return root


def import_pack():
    """Imports this checkout as a package, the way ComfyUI loads a custom node folder."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    import_comfyui()
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
