"""A rank of a DualParal cluster: torchrun starts one per GPU (or CPU process) on every machine, and
ComfyUI's DualParal Multi-GPU Sampler sends it work through rank 0 (devices torchrun://HOST:PORT).

    torchrun --nnodes=2 --node-rank=0 --nproc-per-node=4 --master-addr=HOST --master-port=29500 \\
        dualparal_cluster.py --comfyui /path/to/ComfyUI --port 29501

on HOST (node rank 0, whose first process is rank 0) and with --node-rank=1 on the other machine.
The pack's `core` is loaded by path, so this file runs from wherever the pack is.
"""
import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

CORE_DIR = Path(__file__).resolve().with_name("core")


def _load_core(package: str = "streamline_cluster_core"):
    spec = importlib.util.spec_from_file_location(package, CORE_DIR / "__init__.py",
                                                  submodule_search_locations=[str(CORE_DIR)])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.dualparal.cluster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, type=Path,
                        help="ComfyUI's folder on this machine: its code rebuilds the layers ComfyUI sends "
                             "(no model files are needed here)")
    parser.add_argument("--port", type=int, help="the port rank 0 listens on for ComfyUI (default 29501)")
    args = parser.parse_args()
    if not (args.comfyui / "comfy" / "model_management.py").is_file():
        parser.error(f"--comfyui {args.comfyui}: no ComfyUI there (comfy/model_management.py is missing)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.path.insert(0, str(args.comfyui.resolve()))
    cluster = _load_core()
    cluster.serve_cluster(args.port or cluster.DEFAULT_PORT)


if __name__ == "__main__":
    main()
