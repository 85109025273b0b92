"""Worker processes for the ranks: spawned, handed their payload, watched, and always cleaned up.

A worker that dies (killed, out of memory) or fails stops the run: the others are killed at once
and the error names the rank. Interrupts from the host (`check_interrupt` raising) do the same.
"""
import multiprocessing
import queue
from multiprocessing import resource_sharer
import resource
import runpy
import sys
import time
import types
from contextlib import contextmanager
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Callable, Optional

CORE_DIR = Path(__file__).resolve().parents[1]
BOOTSTRAP = Path(__file__).with_name("worker_bootstrap.py")
POLL_S = 0.2


class WorkerError(RuntimeError):
    pass


@contextmanager
def _main_module_hidden():
    """spawn re-imports the parent's __main__ module in each child; the host's (ComfyUI's main.py,
    which parses the command line and starts a server) must not run there."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _raise_open_file_limit() -> None:
    """Each shared weight tensor holds a file descriptor while it is sent: lift the soft limit
    (often 1,024) to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextmanager
def _unfetched_handles_closed():
    """Pickling a shared tensor for a spawned process registers a duplicate of its file descriptor
    with multiprocessing's resource sharer until the child fetches it. A worker killed before it read
    its payload never does: close what the run registered and nobody fetched, or each such handle
    keeps an fd open and its shared memory alive for good."""
    sharer = resource_sharer._resource_sharer
    before = set(sharer._cache)
    try:
        yield
    finally:
        with sharer._lock:
            unfetched = [sharer._cache.pop(key) for key in set(sharer._cache) - before]
        for _, close in unfetched:
            close()


def _describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def run_workers(payloads: list, environments: list, host_setup: list, progress: Callable[[int, int], None],
                check_interrupt: Callable[[], None], guide: Optional[Callable] = None) -> list:
    """Runs one worker per payload; returns each rank's statistics (dicts), in rank order. `guide`
    answers the first rank's guidance questions (pipeline.relayed_guidance)."""
    context = multiprocessing.get_context("spawn")
    outbox = _queue(context)
    inboxes = [_queue(context) for _ in payloads]
    processes = [context.Process(
        target=runpy.run_path, args=(str(BOOTSTRAP),), daemon=True, name=f"streamline-dualparal-rank{rank}",
        kwargs={"run_name": "streamline_dualparal_worker", "init_globals": {
            "RANK": rank, "CORE_DIR": str(CORE_DIR), "ENVIRONMENT": environment, "HOST_SETUP": host_setup,
            "INBOX": inbox, "OUTBOX": outbox}})
        for rank, (inbox, environment) in enumerate(zip(inboxes, environments))]
    try:
        with _main_module_hidden():
            for process in processes:
                process.start()
        _raise_open_file_limit()
        with _unfetched_handles_closed():
            try:
                for inbox, payload in zip(inboxes, payloads):
                    # pickled here, not in the queue's feeder thread, so that a payload that cannot
                    # be sent raises instead of leaving its worker waiting
                    inbox.put(bytes(ForkingPickler.dumps(payload)))
                return _collect(processes, outbox, inboxes[0], progress, check_interrupt, guide)
            finally:
                _stop(processes)  # before the handles close: no worker is fetching one then
    finally:
        _stop(processes)
        for channel in (outbox, *inboxes):
            _discard(channel)


def _discard(channel) -> None:
    """Closes a queue whose other end has gone with its worker. A payload bigger than the pipe's
    buffer leaves the queue's feeder thread blocked writing to a worker killed before it read: with
    this process's read end closed too, the write breaks (ignored: see _queue) and the thread ends, so no thread, pipe or semaphore outlives the run."""
    channel._reader.close()
    channel.cancel_join_thread()
    channel.close()
    if channel._thread is not None:
        channel._thread.join(timeout=30)


def _queue(context):
    """A queue whose feeder thread ends quietly on a broken pipe (its reader gone with a killed
    worker): multiprocessing.Queue's own switch, read when the thread starts."""
    channel = context.Queue()
    channel._ignore_epipe = True
    return channel


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=30)


def _collect(processes, outbox, first_inbox, progress, check_interrupt, guide) -> list:
    stats = {}
    while len(stats) < len(processes):
        check_interrupt()
        try:
            message = outbox.get(timeout=POLL_S)
        except queue.Empty:
            _raise_if_dead(processes, stats)
            continue
        kind, *body = message
        if kind == "progress":
            progress(*body)
        elif kind == "guide" and guide is not None:
            first_inbox.put(guide(*body))
        elif kind == "done":
            stats[body[0]] = body[1]
        else:
            time.sleep(1.0)  # a rank failing because a peer died: blame the dead peer
            _raise_if_dead(processes, stats, also=f"rank {body[0]} reported: {body[1]}")
            raise WorkerError(f"DualParal rank {body[0]} failed: {body[1]}")
    for process in processes:
        process.join(timeout=30)
    return [stats[rank] for rank in range(len(processes))]


def _raise_if_dead(processes, finished, also: str = "") -> None:
    """Raises for a worker that ended without a word: exit code 0 follows its statistics and 1 its
    error report, both still on their way through the queue."""
    dead = [(rank, p.exitcode) for rank, p in enumerate(processes)
            if p.exitcode not in (None, 0, 1) and rank not in finished]
    if dead:
        rank, code = dead[0]
        raise WorkerError(f"DualParal worker rank {rank} stopped ({_describe_exit(code)}); the run was cancelled "
                          f"and all workers were stopped.{' ' + also if also else ''}")
