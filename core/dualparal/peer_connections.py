"""Connections between ComfyUI and a cluster's rank 0 that cannot hang: every wait has a deadline,
and ComfyUI's side polls its interrupt while it waits.

ComfyUI connects (CONNECT_TIMEOUT_S), proves it holds the key and checks the peer does (multiprocessing's
HMAC challenge, HANDSHAKE_TIMEOUT_S), then waits at most REPLY_TIMEOUT_S for each message and for
each message it sends to be taken (plus a second per MIN_SEND_RATE bytes); rank 0's waits on ComfyUI
have the same deadlines. Rank 0 accepts every connection at once and runs each one's handshake in a
thread of its own with the same deadline, so a stranger that connects and sends nothing delays no
one; connections that passed wait in a queue for the one request the cluster runs at a time."""
import logging
import os
import queue
import socket
import threading
import time
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Callable

from . import wire
from .processes import POLL_S

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
# the longest a cluster may stay silent while ComfyUI waits (a greeting while it serves another
# request, a step's progress of the slowest block)
REPLY_TIMEOUT_S = 600.0
MIN_SEND_RATE = 10 * 2 ** 20  # bytes a second a peer must take a message at
MAX_HANDSHAKES = 64  # connections rank 0 authenticates at once; more are closed unread


class SilentPeer(Exception):
    """The peer sent nothing within the deadline; the message says what was awaited."""


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def authenticated_connection(address: tuple, key: bytes, check_interrupt: Callable[[], None]) -> Connection:
    """A connection to `address` whose peer passed the key handshake. Raises OSError where nothing
    answers, AuthenticationError for another key, SilentPeer past a deadline, and whatever
    `check_interrupt` raises (the connection is then dropped)."""
    state, lock = {}, threading.Lock()

    def handshake():
        try:
            sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
            sock.settimeout(None)
            with lock:
                state["socket"] = sock
                if state.get("abandoned"):
                    _shutdown(sock)
            connection = Connection(os.dup(sock.fileno()))
            state["connection"] = connection
            answer_challenge(connection, key)
            deliver_challenge(connection, key)
        except BaseException as error:  # handed to the waiting thread
            state["error"] = error

    def abandon():
        with lock:
            state["abandoned"] = True
            if "socket" in state:
                _shutdown(state["socket"])

    thread = threading.Thread(target=handshake, name="dualparal-handshake", daemon=True)
    thread.start()
    deadline = time.monotonic() + CONNECT_TIMEOUT_S + HANDSHAKE_TIMEOUT_S
    try:
        while thread.is_alive():
            thread.join(POLL_S)
            check_interrupt()
            if thread.is_alive() and time.monotonic() > deadline:
                raise SilentPeer(f"did not complete the key handshake within {HANDSHAKE_TIMEOUT_S:.0f} s")
    except BaseException:
        abandon()
        thread.join(CONNECT_TIMEOUT_S)
        _close(state)
        raise
    if "error" in state:
        _close(state)
        raise state["error"]
    state["socket"].close()  # the connection holds a descriptor of its own
    return state["connection"]


def _close(state: dict) -> None:
    for name in ("connection", "socket"):
        if name in state:
            state[name].close()


def _nothing() -> None:
    pass


class Peer:
    """A connection whose every receive and send has a deadline and polls `check_interrupt` while it
    waits (ComfyUI's interrupt; nothing on a cluster's side). A send that cannot finish (the peer
    stopped reading) or is interrupted shuts the socket, which ends the write."""

    def __init__(self, connection: Connection, waiter: str, check_interrupt: Callable[[], None] = _nothing):
        self.connection = connection
        self.waiter = waiter  # who waits, for the messages: "ComfyUI", "rank 0"
        self.check_interrupt = check_interrupt

    def receive(self, what: str, timeout_s: float = None) -> tuple:
        """The next message's (meta, tensors), waited for at most `timeout_s` (REPLY_TIMEOUT_S)."""
        return wire.decode(self.receive_bytes(what, timeout_s))

    def receive_bytes(self, what: str, timeout_s: float = None) -> bytes:
        timeout_s = REPLY_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.connection.poll(POLL_S):
            self.check_interrupt()
            if time.monotonic() > deadline:
                raise SilentPeer(f"sent nothing for {timeout_s:.0f} s while {self.waiter} waited for {what}")
        return self.connection.recv_bytes()

    def send(self, what: str, meta: dict, tensors: dict = None) -> None:
        self.send_bytes(wire.encode(meta, tensors), what)

    def send_bytes(self, data: bytes, what: str) -> None:
        """Sends `data` within REPLY_TIMEOUT_S plus a second per MIN_SEND_RATE bytes."""
        timeout_s = REPLY_TIMEOUT_S + len(data) / MIN_SEND_RATE
        failure = []

        def write():
            try:
                self.connection.send_bytes(data)
            except BaseException as error:  # handed to the waiting thread
                failure.append(error)
        writer = threading.Thread(target=write, name="dualparal-send", daemon=True)
        writer.start()
        deadline = time.monotonic() + timeout_s
        try:
            while writer.is_alive():
                writer.join(POLL_S)
                if writer.is_alive():
                    self.check_interrupt()
                    if time.monotonic() > deadline:
                        raise SilentPeer(f"did not take {what} within {timeout_s:.0f} s (it stopped reading)")
        except BaseException:
            with socket.socket(fileno=os.dup(self.connection.fileno())) as sock:
                _shutdown(sock)
            writer.join(CONNECT_TIMEOUT_S)
            raise
        if failure:
            raise failure[0]

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exception) -> None:
        self.connection.close()


class Doorman:
    """Rank 0's listener: accepts every connection, authenticates each in a thread of its own within
    HANDSHAKE_TIMEOUT_S, and queues those that hold the key (`next()`)."""

    def __init__(self, address: tuple, key: bytes):
        self.listener = Listener(address)  # no key here: the handshake runs per connection, below
        self.key = key
        self.ready = queue.Queue()
        self.slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
        threading.Thread(target=self._accept, name="dualparal-accept", daemon=True).start()

    def next(self) -> Connection:
        return self.ready.get()

    def _accept(self) -> None:
        while True:
            try:
                connection = self.listener.accept()
            except OSError as error:
                log.warning("accepting a connection failed: %s", error)
                continue
            peer = self.listener.last_accepted
            if not self.slots.acquire(blocking=False):
                log.warning("a connection from %s was closed unread: %d others are being authenticated", peer,
                            MAX_HANDSHAKES)
                connection.close()
                continue
            threading.Thread(target=self._authenticate, args=(connection, peer), name="dualparal-handshake",
                             daemon=True).start()

    def _authenticate(self, connection: Connection, peer) -> None:
        sock = socket.socket(fileno=os.dup(connection.fileno()))
        timer = threading.Timer(HANDSHAKE_TIMEOUT_S, _shutdown, (sock,))
        timer.start()
        try:
            deliver_challenge(connection, self.key)
            answer_challenge(connection, self.key)
            timer.cancel()  # (a deadline that fired meanwhile shuts the socket: the serve loop sees it closed)
            self.ready.put(connection)
        except Exception as error:  # AuthenticationError, EOFError, OSError (the deadline's shutdown)
            timer.cancel()
            log.warning("a connection from %s was closed before it was authenticated (%s: %s); is %s the same "
                        "for ComfyUI and the cluster, and is the peer ComfyUI?", peer, type(error).__name__,
                        str(error) or f"nothing within {HANDSHAKE_TIMEOUT_S:.0f} s", "STREAMLINE_DUALPARAL_KEY")
            connection.close()
        finally:
            sock.close()
            self.slots.release()
