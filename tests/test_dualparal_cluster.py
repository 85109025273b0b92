"""DualParal over a torchrun cluster: two "machines" on this host (dualparal_cluster.py, static
rendezvous, one CPU rank each, as the README starts them on several machines) serve the sampler's
requests through devices torchrun://HOST:PORT; what crosses the socket cannot run code, keys and the
allowlist are enforced, and nothing listens beyond loopback by default."""
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import AuthenticationError, Client, Listener

import psutil
import pytest
import torch

from conftest import REPO_ROOT
from devkit.comfy_env import comfyui_dir
from devkit.model_fixtures import build_wan
from streamline_helpers import (NEGATIVE, POSITIVE, SAMPLING_TOLERANCE, cfg_patched, dualparal, dualparal_i2v,
                               empty_latent, image_to_video, patcher, relative_difference, run_in_thread,
                               ti2v_5b_conditioning, two_experts)

KEY = "streamline-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


class Cluster:
    """`dualparal_cluster.py` once per node, every node on this host."""

    def __init__(self, log_dir, nodes: int = 2):
        self.port, master_port = free_port(), free_port()
        self.address = f"torchrun://127.0.0.1:{self.port}"
        environment = {**os.environ, "STREAMLINE_DUALPARAL_KEY": KEY, "OMP_NUM_THREADS": "1"}
        self.nodes = [subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "dualparal_cluster.py"), "--comfyui", str(comfyui_dir()),
             "--port", str(self.port), f"--nnodes={nodes}", f"--node-rank={node}", f"--master-port={master_port}"],
            env=environment, stdout=(log_dir / f"node{node}.log").open("w"), stderr=subprocess.STDOUT)
            for node in range(nodes)]
        wait_for(self._listening, 120, "the cluster's rank 0 did not listen")

    def _listening(self) -> bool:
        assert all(node.poll() is None for node in self.nodes), "a cluster node ended while starting"
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def processes(self) -> list:
        return [process for node in self.nodes if node.poll() is None
                for process in [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE]

    def ranks(self) -> list:
        return [p for p in self.processes() if "--serve" in p.cmdline()]

    def listening_sockets(self) -> set:
        return {(c.laddr.ip, c.laddr.port) for p in self.processes() for c in p.net_connections("inet")
                if c.status == "LISTEN"}

    def wait_ended(self, timeout_s: float) -> bool:
        try:
            wait_for(lambda: all(node.poll() is not None for node in self.nodes), timeout_s, "")
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        for process in reversed(self.processes()):
            process.kill()
        for node in self.nodes:
            node.wait(timeout=30)


def allow(monkeypatch, port: int) -> None:
    monkeypatch.setenv("STREAMLINE_DUALPARAL_KEY", KEY)
    monkeypatch.setenv("STREAMLINE_DUALPARAL_CLUSTERS", f"127.0.0.1:{port}")


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    started = Cluster(tmp_path)
    allow(monkeypatch, started.port)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def wan2(pack):
    return patcher(build_wan("tiny", layers=2))


def test_two_nodes_sample_the_latent_of_one_rank_listen_on_loopback_only_and_refuse_strangers(wan2, cluster):
    from comfyui_streamline.nodes.dualparal import DualParalSampler

    listening = cluster.listening_sockets()
    assert ("127.0.0.1", cluster.port) in listening and len(listening) > 2  # ComfyUI's port, rendezvous, gloo
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
    for rank in cluster.ranks():  # the launchers had the key in their environment; no rank has it
        assert KEY not in " ".join(rank.cmdline()) and KEY not in "".join(rank.environ().values())
    assert len(cluster.ranks()) == 2
    with pytest.raises(AuthenticationError):
        Client(("127.0.0.1", cluster.port), authkey=b"not-the-key-of-this-cluster")
    with socket.create_connection(("127.0.0.1", cluster.port)) as stranger:  # no handshake, a pickle instead
        stranger.sendall(pickle.dumps(("request", os.system)))
    too_many_ranks = dict(model=patcher(build_wan("tiny", layers=1)), positive=POSITIVE, negative=NEGATIVE, seed=0,
                          steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", devices=cluster.address, frames_per_block=2, cache_frames=1,
                          denoise=1.0, latent_image=empty_latent(4))
    with pytest.raises(ValueError, match="2 ranks for a model with 1 transformer layers"):
        DualParalSampler.execute(**too_many_ranks)  # refused by ComfyUI; the cluster goes on serving
    for frames, steps in ((7, 3), (5, 2)):
        one, _, _ = dualparal(wan2, empty_latent(frames), "cpu:1", steps=steps)
        ours, stats, _ = dualparal(wan2, empty_latent(frames), cluster.address, steps=steps)
        assert relative_difference(ours["samples"], one["samples"]) <= SAMPLING_TOLERANCE
        assert [(s.rank, s.layers) for s in stats] == [(0, (0, 1)), (1, (1, 2))]
        assert all(s.device == f"{socket.gethostname()} cpu" and s.jobs > 0 and s.peak_bytes > 0 for s in stats)
        assert stats[0].sent_bytes > 0 and stats[1].sent_bytes > 0
    # Wan 2.2 A14B: both experts on every rank; the high-noise one's CFG patches answered by ComfyUI
    high, low = cfg_patched(wan2), patcher(build_wan("tiny", layers=2, seed=11))
    one, _, _ = two_experts(high, low, empty_latent(5), "cpu:1", 2, sampler="uni_pc")
    ours, _, _ = two_experts(high, low, empty_latent(5), cluster.address, 2, sampler="uni_pc")
    assert relative_difference(ours["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    i2v, conditioning = patcher(build_wan("tiny", layers=2, variant="2.1 i2v")), image_to_video()
    one, _, _ = dualparal_i2v(i2v, conditioning, "cpu:1", 2, 1)
    ours, _, _ = dualparal_i2v(i2v, conditioning, cluster.address, 2, 1)
    assert relative_difference(ours["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    ti2v, latent = patcher(build_wan("tiny", layers=2, variant="2.2 ti2v 5B")), ti2v_5b_conditioning(13)
    one, _, _ = dualparal(ti2v, latent, "cpu:1")
    ours, _, _ = dualparal(ti2v, latent, cluster.address)
    assert relative_difference(ours["samples"], one["samples"]) <= SAMPLING_TOLERANCE
    assert len(cluster.ranks()) == 2


def test_ten_idle_strangers_do_not_delay_a_key_holder_and_are_closed_at_their_deadline(wan2, cluster):
    """Rank 0 authenticates each connection in a thread of its own with a deadline: a key holder is
    greeted while ten strangers that connected first and sent nothing are still waiting, the prompt
    samples, and each stranger is closed once its handshake deadline passes."""
    from comfyui_streamline.core.dualparal.peer_connections import Peer, authenticated_connection

    strangers = [socket.create_connection(("127.0.0.1", cluster.port)) for _ in range(10)]
    try:
        with Peer(authenticated_connection(("127.0.0.1", cluster.port), KEY.encode(), lambda: None), "the test") as holder:
            greeting, _ = holder.receive("the greeting", timeout_s=60)
        assert greeting["kind"] == "devices" and len(greeting["devices"]) == 2
        for stranger in strangers:  # still connected, still unanswered (challenged only)
            stranger.settimeout(0)
            try:
                assert stranger.recv(1 << 16), "a stranger was closed before the key holder was greeted"
            except BlockingIOError:
                pass
        one, _, _ = dualparal(wan2, empty_latent(5), "cpu:1", steps=2)
        ours, _, _ = dualparal(wan2, empty_latent(5), cluster.address, steps=2)
        assert relative_difference(ours["samples"], one["samples"]) <= SAMPLING_TOLERANCE
        for stranger in strangers:
            stranger.settimeout(60)
            while stranger.recv(1 << 16):  # the challenge, then the close at the deadline
                pass
    finally:
        for stranger in strangers:
            stranger.close()
    assert len(cluster.ranks()) == 2  # the cluster serves on


def test_a_killed_rank_on_the_other_node_ends_the_run_with_a_clear_error(wan2, cluster):
    from comfyui_streamline.core.dualparal.processes import WorkerError

    with run_in_thread(wan2, cluster.address) as (thread, outcome):
        [rank] = [p for p in cluster.ranks() if psutil.Process(cluster.nodes[1].pid) in p.parents()]
        rank.kill()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], WorkerError), outcome
    assert f"the DualParal cluster at 127.0.0.1:{cluster.port} failed" in str(outcome["error"])
    assert "start torchrun again" in str(outcome["error"])
    assert cluster.wait_ended(60), "the cluster left ranks behind"


def test_interrupting_a_cluster_run_ends_its_ranks_and_an_absent_cluster_is_named(wan2, cluster):
    import comfy.model_management

    with run_in_thread(wan2, cluster.address) as (thread, outcome):
        comfy.model_management.interrupt_current_processing(True)
        thread.join(timeout=60)
    assert isinstance(outcome.get("error"), comfy.model_management.InterruptProcessingException), outcome
    assert cluster.wait_ended(60), "the ranks went on after the interrupt"
    with pytest.raises(Exception, match=f"no DualParal cluster answers at 127.0.0.1:{cluster.port}"):
        dualparal(wan2, empty_latent(4), cluster.address)


@pytest.mark.parametrize("devices", ["torchrun://nohost", "torchrun://127.0.0.1:99999", "torchrun://127.0.0.1:0"])
def test_a_malformed_cluster_address_is_named(wan2, devices):
    with pytest.raises(ValueError, match="write torchrun://HOST:PORT with a port from 1 to 65535"):
        dualparal(wan2, empty_latent(4), devices)


class FakeCluster:
    """A peer on loopback that holds the key and answers with a pickle that would write a marker."""

    def __init__(self, marker, key: str = KEY):
        self.listener = Listener(("127.0.0.1", 0), authkey=key.encode())
        self.port = self.listener.address[1]
        self.connections = 0
        self.received = []
        threading.Thread(target=self._serve, args=(marker,), daemon=True).start()

    def _serve(self, marker):
        try:
            connection = self.listener.accept()
        except AuthenticationError:
            return
        with connection:
            self.connections += 1
            connection.send_bytes(pickle.dumps(Exploit(str(marker))))
            try:
                while True:
                    self.received.append(connection.recv_bytes())
            except (EOFError, OSError):
                pass


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_cluster_runs_no_code_in_comfyui_and_gets_nothing_of_the_model(wan2, monkeypatch, tmp_path):
    marker = tmp_path / "pwned"
    peer = FakeCluster(marker)
    allow(monkeypatch, peer.port)
    with pytest.raises(Exception, match="answered with a message that is not DualParal's") as refused:
        dualparal(wan2, empty_latent(4), f"torchrun://127.0.0.1:{peer.port}")
    assert "nothing more was sent" in str(refused.value)
    wait_for(lambda: peer.connections == 1, 30, "ComfyUI never connected")
    assert not marker.exists()
    assert peer.received == []


def test_a_cluster_with_another_key_is_refused_before_anything_is_read_or_sent(wan2, monkeypatch, tmp_path):
    marker = tmp_path / "pwned"
    peer = FakeCluster(marker, key="an-impersonator-without-the-key")
    allow(monkeypatch, peer.port)
    with pytest.raises(ValueError, match=f"the DualParal cluster at 127.0.0.1:{peer.port} refused ComfyUI's key"):
        dualparal(wan2, empty_latent(4), f"torchrun://127.0.0.1:{peer.port}")
    assert not marker.exists() and peer.received == []


def test_a_cluster_missing_from_the_allowlist_is_never_contacted(wan2, monkeypatch, tmp_path):
    peer = Listener(("127.0.0.1", 0), authkey=KEY.encode())
    monkeypatch.setenv("STREAMLINE_DUALPARAL_KEY", KEY)
    monkeypatch.setenv("STREAMLINE_DUALPARAL_CLUSTERS", "10.0.0.1:29501")
    address = f"torchrun://127.0.0.1:{peer.address[1]}"
    with pytest.raises(ValueError, match=f"add the line 127.0.0.1:{peer.address[1]} to .*dualparal_clusters.txt"):
        dualparal(wan2, empty_latent(4), address)
    peer._listener._socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer._listener._socket.accept()  # no connection is waiting
    peer.close()


@pytest.mark.parametrize("key, message", [(None, "no DualParal cluster key: set STREAMLINE_DUALPARAL_KEY"),
                                          ("streamline-dualparal", "too weak"), ("short", "too weak")])
def test_comfyui_and_the_cluster_refuse_to_run_without_a_real_key(wan2, monkeypatch, key, message):
    port = free_port()
    monkeypatch.setenv("STREAMLINE_DUALPARAL_CLUSTERS", f"127.0.0.1:{port}")
    environment = {k: v for k, v in os.environ.items() if k != "STREAMLINE_DUALPARAL_KEY"}
    if key is None:
        monkeypatch.delenv("STREAMLINE_DUALPARAL_KEY", raising=False)
    else:
        monkeypatch.setenv("STREAMLINE_DUALPARAL_KEY", key)
        environment["STREAMLINE_DUALPARAL_KEY"] = key
    with pytest.raises(ValueError, match=message):
        dualparal(wan2, empty_latent(4), f"torchrun://127.0.0.1:{port}")
    started = subprocess.run([sys.executable, str(REPO_ROOT / "dualparal_cluster.py"), "--comfyui", str(comfyui_dir()),
                              "--port", str(port)], env=environment, capture_output=True, text=True, timeout=300)
    assert started.returncode != 0 and message.split(":")[0] in started.stderr, started.stderr


def test_a_message_decodes_only_to_json_and_tensors(pack):
    from comfyui_streamline.core.dualparal.wire import MalformedMessage, decode, encode

    meta, tensors = decode(encode({"kind": "progress", "done": 1}, {"x": torch.arange(4.0)}))
    assert meta == {"kind": "progress", "done": 1} and torch.equal(tensors["x"], torch.arange(4.0))
    for hostile in (pickle.dumps(Exploit("/nonexistent/marker")), b"", b"\xff" * 8 + b"{}"):
        with pytest.raises(MalformedMessage):
            decode(hostile)
