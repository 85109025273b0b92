"""A DualParal cluster: one rank per GPU (or CPU process) on every machine, started through torchrun,
serving ComfyUI's DualParal Multi-GPU Sampler (devices torchrun://HOST:PORT) through rank 0.

One machine (everything on loopback):

    STREAMLINE_DUALPARAL_KEY=... python dualparal_cluster.py --comfyui /path/to/ComfyUI --nproc-per-node 4

Two machines (node 0 at 10.0.0.1 listens on its LAN address; the same key on both):

    python dualparal_cluster.py --comfyui ... --key-file KEY --nnodes 2 --node-rank 0 --nproc-per-node 4 \\
        --master-addr 10.0.0.1 --listen 10.0.0.1
    python dualparal_cluster.py --comfyui ... --key-file KEY --nnodes 2 --node-rank 1 --nproc-per-node 4 \\
        --master-addr 10.0.0.1

This runs torchrun's launcher in this process (static rendezvous at --master-addr:--master-port),
with node 0's rendezvous store and rank 0's port for ComfyUI (--port) bound to --listen only
(default 127.0.0.1: nothing reachable from other machines). The pack's `core` is loaded by path, so
this file runs from wherever the pack is.
"""
import argparse
import importlib
import importlib.util
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

CORE_DIR = Path(__file__).resolve().with_name("core")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
LISTEN_VARIABLE = "STREAMLINE_DUALPARAL_LISTEN"


def _load_core(package: str = "streamline_cluster_core"):
    spec = importlib.util.spec_from_file_location(package, CORE_DIR / "__init__.py",
                                                  submodule_search_locations=[str(CORE_DIR)])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.dualparal.cluster")


def _bind_rendezvous_store(listen: str) -> None:
    """torchrun's node 0 hosts the rendezvous store on every address; hand it a socket bound to
    `listen` instead (TCPStore's master_listen_fd)."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    def bound_store(host_name, port, world_size, is_master, timeout, **options):
        if not is_master:
            return TCPStore(host_name, port, world_size, is_master, timeout, **options)
        family = socket.AF_INET6 if ":" in listen else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((listen, port))
        server.listen(128)
        return TCPStore(host_name, port, world_size, is_master, timeout, master_listen_fd=server.detach(),
                        **options)
    static_tcp_rendezvous.TCPStore = bound_store


def _launch(args, cluster) -> None:
    """Runs torchrun's launcher here; every rank runs this file again with --serve. The ranks inherit
    this environment without the key: node 0's rank 0 alone reads it, from the key file (or a private
    copy of STREAMLINE_DUALPARAL_KEY, removed when the launcher ends)."""
    from torch.distributed.run import main as torchrun
    try:
        key = cluster.read_key(args.key_file)
    except ValueError as error:
        sys.exit(f"dualparal_cluster.py: {error}")
    os.environ.pop(cluster.KEY_VARIABLE, None)
    os.environ[LISTEN_VARIABLE] = args.listen
    if args.listen in LOOPBACK:  # the ranks' own connections (gloo, NCCL) stay on this machine too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", cluster.loopback_interface())
        os.environ.setdefault("NCCL_SOCKET_IFNAME", cluster.loopback_interface())
    _bind_rendezvous_store(args.listen)
    with tempfile.TemporaryDirectory(prefix="streamline-dualparal-") as private:  # mode 700
        key_file = args.key_file
        if key_file is None and args.node_rank == 0:
            key_file = Path(private) / "key"
            with os.fdopen(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(key)
        # the key file's path, not the key, goes on the ranks' command line
        key_option = ["--key-file", str(key_file.resolve())] if args.node_rank == 0 else []
        torchrun([f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}",
                  f"--nproc-per-node={args.nproc_per_node}", f"--master-addr={args.master_addr}",
                  f"--master-port={args.master_port}", "--rdzv-backend=static", str(Path(__file__).resolve()),
                  "--serve", "--comfyui", str(args.comfyui), "--port", str(args.port), *key_option])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, type=Path,
                        help="ComfyUI's folder on this machine: its code rebuilds the layers ComfyUI sends "
                             "(no model files are needed here)")
    parser.add_argument("--port", type=int, default=29501, help="the port rank 0 listens on for ComfyUI")
    parser.add_argument("--listen", default="127.0.0.1",
                        help="the address node 0 listens on, for ComfyUI and for the other nodes' rendezvous "
                             "(default 127.0.0.1: this machine only; give node 0's LAN address for several "
                             "machines)")
    parser.add_argument("--key-file", type=Path,
                        help="a file holding the key ComfyUI must present (else STREAMLINE_DUALPARAL_KEY)")
    parser.add_argument("--nnodes", type=int, default=1, help="machines in the cluster")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's index (0 hosts rank 0)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this machine (one per GPU)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="node 0's address as the other nodes reach it")
    parser.add_argument("--master-port", type=int, default=29500, help="node 0's rendezvous port")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a rank started by torchrun
    args = parser.parse_args()
    if not (args.comfyui / "comfy" / "model_management.py").is_file():
        parser.error(f"--comfyui {args.comfyui}: no ComfyUI there (comfy/model_management.py is missing)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.path.insert(0, str(args.comfyui.resolve()))
    cluster = _load_core()
    if not args.serve:
        _launch(args, cluster)
        return
    key = cluster.read_key(args.key_file) if os.environ.get("RANK", "0") == "0" else b""  # rank 0 alone listens
    cluster.serve_cluster(args.port, os.environ.get(LISTEN_VARIABLE, "127.0.0.1"), key)


if __name__ == "__main__":
    main()
