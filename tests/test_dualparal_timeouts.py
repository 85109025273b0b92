"""DualParal never hangs on a peer: ComfyUI's connection to a cluster has a deadline on every wait
(connect, key handshake, each reply) and ComfyUI's interrupt ends a prompt stuck on a silent peer;
errors name the address and what to check. Peers here are sockets on loopback that go silent."""
import socket
import threading
import time
from multiprocessing.connection import Listener

import pytest

from devkit.model_fixtures import build_wan
from streamline_helpers import NEGATIVE, POSITIVE, dualparal, empty_latent, patcher

KEY = "streamline-test-key-0123456789"


@pytest.fixture(scope="module")
def wan2(pack):
    return patcher(build_wan("tiny", layers=2))


@pytest.fixture
def silent_listener(monkeypatch):
    """A socket that takes connections (the kernel completes them) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        monkeypatch.setenv("STREAMLINE_DUALPARAL_KEY", KEY)
        monkeypatch.setenv("STREAMLINE_DUALPARAL_CLUSTERS", f"127.0.0.1:{port}")
        yield port


def key_holder(monkeypatch, behaviour):
    """A peer on loopback that passes the key handshake with ComfyUI's first connection, then runs
    `behaviour(connection, event)`; yields (port, event) with ComfyUI allowed to connect to it."""
    listener = Listener(("127.0.0.1", 0), authkey=KEY.encode())
    held, event = [], threading.Event()

    def serve():
        held.append(listener.accept())
        behaviour(held[0], event)
    threading.Thread(target=serve, daemon=True).start()
    port = listener.address[1]
    monkeypatch.setenv("STREAMLINE_DUALPARAL_KEY", KEY)
    monkeypatch.setenv("STREAMLINE_DUALPARAL_CLUSTERS", f"127.0.0.1:{port}")
    yield port, event
    for connection in held:
        connection.close()
    listener.close()


@pytest.fixture
def key_holder_that_never_greets(monkeypatch):
    """A peer that passes the key handshake, then sends nothing; the event: it was reached."""
    yield from key_holder(monkeypatch, lambda connection, accepted: accepted.set())


@pytest.fixture(scope="module")
def wan_70mb(pack):
    """A first rank's layers far bigger than the sockets' buffers."""
    return patcher(build_wan("tiny", layers=4, ffn_dim=8192))


@pytest.fixture
def key_holder_that_stops_reading(monkeypatch):
    """A peer that passes the key handshake, greets with one device, reads the request, then reads
    nothing more; the event: ComfyUI has begun sending the layers."""
    from comfyui_streamline.core.dualparal import wire

    def stop_reading(connection, stopped):
        connection.send_bytes(wire.encode({"kind": "devices", "devices": ["peer cpu"]}))
        connection.recv_bytes()
        if connection.poll(60):
            stopped.set()
    yield from key_holder(monkeypatch, stop_reading)


def peer_timeouts(monkeypatch, **seconds):
    from comfyui_streamline.core.dualparal import peer_connections
    for name, value in seconds.items():
        monkeypatch.setattr(peer_connections, name, value)


def test_a_peer_that_never_answers_the_handshake_is_named_after_its_deadline(wan2, silent_listener, monkeypatch):
    peer_timeouts(monkeypatch, HANDSHAKE_TIMEOUT_S=1.0)
    with pytest.raises(ValueError, match=rf"the DualParal cluster at 127.0.0.1:{silent_listener} accepted the "
                                         r"connection but did not complete the key handshake within 1 s: check"):
        dualparal(wan2, empty_latent(4), f"torchrun://127.0.0.1:{silent_listener}")


def test_a_key_holder_that_never_greets_is_named_after_the_reply_deadline(wan2, key_holder_that_never_greets,
                                                                         monkeypatch):
    from comfyui_streamline.core.dualparal import WorkerError
    port, _ = key_holder_that_never_greets
    peer_timeouts(monkeypatch, REPLY_TIMEOUT_S=1.0)
    with pytest.raises(WorkerError, match=rf"cluster at 127.0.0.1:{port} failed: it sent nothing for 1 s while "
                                          r"ComfyUI waited for its greeting"):
        dualparal(wan2, empty_latent(4), f"torchrun://127.0.0.1:{port}")


def test_a_peer_that_stops_reading_is_named_after_the_send_deadline(wan_70mb, key_holder_that_stops_reading,
                                                                   monkeypatch):
    from comfyui_streamline.core.dualparal import WorkerError
    port, _ = key_holder_that_stops_reading
    peer_timeouts(monkeypatch, REPLY_TIMEOUT_S=1.0, MIN_SEND_RATE=1e12)
    with pytest.raises(WorkerError, match=rf"cluster at 127.0.0.1:{port} failed: it did not take rank 0's layers "
                                          r"within 1 s \(it stopped reading\)"):
        dualparal(wan_70mb, empty_latent(4), f"torchrun://127.0.0.1:{port}")


def interrupted_within(model, devices: str, started: threading.Event, seconds: float) -> BaseException:
    """Runs DualParal on `devices` in a thread, interrupts it (as /interrupt does) once `started` is
    set, and returns what it raised within `seconds` of the interrupt."""
    import comfy.model_management
    outcome = {}

    def run():
        try:
            dualparal(model, empty_latent(4), devices)
        except BaseException as error:  # noqa: BLE001 (the test inspects it)
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(30), "the run never reached the peer"
        comfy.model_management.interrupt_current_processing(True)
        interrupted = time.monotonic()
        thread.join(seconds + 5)
        assert not thread.is_alive(), "the prompt still waits on the silent peer"
        assert time.monotonic() - interrupted <= seconds
    finally:
        comfy.model_management.interrupt_current_processing(False)
    return outcome.get("error")


def test_an_interrupt_ends_a_prompt_stuck_in_the_handshake_within_2_s(wan2, silent_listener):
    """Default deadlines (longer than the test): only the interrupt can end the wait."""
    import comfy.model_management
    connected = threading.Event()
    real_connect = socket.create_connection

    def connecting(*args, **kwargs):
        sock = real_connect(*args, **kwargs)
        connected.set()
        return sock
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "create_connection", connecting)
        error = interrupted_within(wan2, f"torchrun://127.0.0.1:{silent_listener}", connected, 2.0)
    assert isinstance(error, comfy.model_management.InterruptProcessingException), error


def test_an_interrupt_ends_a_prompt_waiting_for_a_greeting_within_2_s(wan2, key_holder_that_never_greets):
    import comfy.model_management
    port, accepted = key_holder_that_never_greets
    error = interrupted_within(wan2, f"torchrun://127.0.0.1:{port}", accepted, 2.0)
    assert isinstance(error, comfy.model_management.InterruptProcessingException), error


@pytest.mark.parametrize("devices, message", [
    ("cpu:" + "9" * 100000, "write cpu:N with N from 1 to 9999"),
    ("cuda:" + "9" * 100000, "is not a device; write auto, cpu:N"),
    ("torchrun://127.0.0.1:" + "9" * 100000, "with a port from 1 to 65535"),
])
def test_absurd_device_strings_get_the_fix_not_a_raw_python_error(wan2, devices, message):
    from comfyui_streamline.nodes.dualparal import DualParalSampler
    with pytest.raises(ValueError, match=message) as refused:
        DualParalSampler.execute(model=wan2, positive=POSITIVE, negative=NEGATIVE, latent_image=empty_latent(4), seed=0,
                                 steps=2, cfg=4.0, sampler_name="euler", scheduler="simple", devices=devices,
                                 frames_per_block=2, cache_frames=1, denoise=1.0)
    assert str(refused.value).startswith("DualParal Multi-GPU Sampler: ") and len(str(refused.value)) < 400


def test_the_allowlist_hint_for_an_ipv6_cluster_is_bracketed(wan2, monkeypatch):
    monkeypatch.setenv("STREAMLINE_DUALPARAL_KEY", KEY)
    monkeypatch.setenv("STREAMLINE_DUALPARAL_CLUSTERS", "")
    with pytest.raises(ValueError, match=r"add the line \[::1\]:1 to"):
        dualparal(wan2, empty_latent(4), "torchrun://[::1]:1")


def test_an_interrupt_ends_a_prompt_stuck_sending_to_a_peer_that_stopped_reading_within_2_s(
        wan_70mb, key_holder_that_stops_reading):
    import comfy.model_management
    port, stopped = key_holder_that_stops_reading
    error = interrupted_within(wan_70mb, f"torchrun://127.0.0.1:{port}", stopped, 2.0)
    assert isinstance(error, comfy.model_management.InterruptProcessingException), error
