"""DualParal over a torchrun cluster: two torchrun "machines" on this host (static rendezvous, one CPU
rank each, as the README starts them on several machines) serve the sampler's requests through
devices torchrun://HOST:PORT."""
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from conftest import REPO_ROOT
from devkit.comfy_env import comfyui_dir
from devkit.model_fixtures import build_wan
from test_dualparal import NEGATIVE, POSITIVE, dualparal, empty_latent
from test_slicing_nodes import SAMPLING_TOLERANCE, patcher, relative_difference

KEY = "streamline-test-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TorchrunCluster:
    """`torchrun ... dualparal_cluster.py` once per node, every node on this host."""

    def __init__(self, log_dir, nodes: int = 2, ranks_per_node: int = 1):
        self.port, master_port = free_port(), free_port()
        self.address = f"torchrun://127.0.0.1:{self.port}"
        environment = {**os.environ, "STREAMLINE_DUALPARAL_KEY": KEY, "OMP_NUM_THREADS": "1"}
        self.nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node-rank={node}",
             f"--nproc-per-node={ranks_per_node}", "--master-addr=127.0.0.1", f"--master-port={master_port}",
             str(REPO_ROOT / "dualparal_cluster.py"), "--comfyui", str(comfyui_dir()), "--port", str(self.port)],
            env=environment, stdout=(log_dir / f"node{node}.log").open("w"), stderr=subprocess.STDOUT)
            for node in range(nodes)]
        self._wait_listening()

    def _wait_listening(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert all(node.poll() is None for node in self.nodes), "a torchrun node ended while starting"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError("the cluster's rank 0 did not listen")

    def ranks(self) -> list:
        """The rank processes torchrun started (its agents' children)."""
        return [child for node in self.nodes if node.poll() is None
                for child in psutil.Process(node.pid).children(recursive=True)
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]

    def wait_ended(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(node.poll() is None for node in self.nodes):
            time.sleep(0.2)
        return all(node.poll() is not None for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            for process in [*psutil.Process(node.pid).children(recursive=True), node] if node.poll() is None else []:
                process.kill()
            node.wait(timeout=30)


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMLINE_DUALPARAL_KEY", KEY)
    started = TorchrunCluster(tmp_path)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def wan2(pack):
    return patcher(build_wan("tiny", layers=2))


def test_two_torchrun_nodes_sample_the_latent_of_one_rank_and_serve_the_next_prompt(wan2, cluster):
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    too_many_ranks = dict(model=patcher(build_wan("tiny", layers=1)), positive=POSITIVE, negative=NEGATIVE, seed=0, steps=2,
                          cfg=1.0, shift=5.0, devices=cluster.address, frames_per_block=2, cache_frames=1, denoise=1.0,
                          latent_image=empty_latent(4))
    with pytest.raises(ValueError, match="2 ranks for a model with 1 transformer layers"):
        DualParalSampler.execute(**too_many_ranks)  # refused by ComfyUI; the cluster goes on serving
    for frames, steps in ((7, 3), (5, 2)):
        one, _, _ = dualparal(wan2, empty_latent(frames), "cpu:1", steps=steps)
        ours, stats, _ = dualparal(wan2, empty_latent(frames), cluster.address, steps=steps)
        assert relative_difference(ours["samples"], one["samples"]) <= SAMPLING_TOLERANCE
        assert [(s.rank, s.layers) for s in stats] == [(0, (0, 1)), (1, (1, 2))]
        assert all(s.device == f"{socket.gethostname()} cpu" and s.jobs > 0 and s.peak_bytes > 0 for s in stats)
        assert stats[0].sent_bytes > 0 and stats[1].sent_bytes > 0
    assert len(cluster.ranks()) == 2


def _run_in_thread(model, address) -> tuple:
    outcome = {}

    def run():
        try:
            outcome["result"] = dualparal(model, empty_latent(8), address, steps=100000)
        except BaseException as error:  # noqa: BLE001 (the test inspects it)
            outcome["error"] = error
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(8.0)  # the request has reached every rank and they are sampling
    assert thread.is_alive(), outcome
    return thread, outcome


def test_a_killed_rank_on_the_other_node_ends_the_run_with_a_clear_error(wan2, cluster):
    from comfyui_streamline.core.dualparal.processes import WorkerError

    thread, outcome = _run_in_thread(wan2, cluster.address)
    psutil.Process(cluster.nodes[1].pid).children(recursive=True)[0].kill()
    killed_at = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive() and time.monotonic() - killed_at < 60
    assert isinstance(outcome["error"], WorkerError), outcome
    assert f"the DualParal cluster at 127.0.0.1:{cluster.port} failed" in str(outcome["error"])
    assert "start torchrun again" in str(outcome["error"])
    assert cluster.wait_ended(60), "torchrun left ranks behind"


def test_interrupting_a_cluster_run_ends_its_ranks_and_an_absent_cluster_is_named(wan2, cluster):
    import comfy.model_management

    thread, outcome = _run_in_thread(wan2, cluster.address)
    comfy.model_management.interrupt_current_processing(True)
    thread.join(timeout=60)
    assert isinstance(outcome.get("error"), comfy.model_management.InterruptProcessingException), outcome
    assert cluster.wait_ended(60), "the ranks went on after the interrupt"
    with pytest.raises(Exception, match=f"no DualParal cluster answers at 127.0.0.1:{cluster.port}"):
        dualparal(wan2, empty_latent(4), cluster.address)
    with pytest.raises(Exception, match="write torchrun://HOST:PORT"):
        dualparal(wan2, empty_latent(4), "torchrun://nohost")
