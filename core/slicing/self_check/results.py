"""The self-check's results: a small registry the nodes read (results, fallbacks, listeners), and a
round per prompt in which each earlier fallback is said again once."""
import logging
import sys
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Optional

from torch import nn

log = logging.getLogger(__name__.rpartition(".")[0])

PASSED, FELL_BACK, UNCHECKED, NOT_CHECKED = "passed", "fell back to stock", "unchecked", "not checked"


def host_version(module: Optional[nn.Module] = None) -> str:
    """The host's version, read without importing it: 'ComfyUI 0.3.75' (or 'ComfyUI unknown'),
    plus diffusers' version for a diffusers block."""
    comfy = getattr(sys.modules.get("comfyui_version"), "__version__", None)
    host = f"ComfyUI {comfy or 'unknown'}"
    if module is not None and type(module).__module__.startswith("diffusers"):
        host += f" / diffusers {getattr(sys.modules.get('diffusers'), '__version__', 'unknown')}"
    return host



@dataclass(frozen=True)
class CheckResult:
    seq: int
    outcome: str  # PASSED, FELL_BACK, UNCHECKED or NOT_CHECKED
    block: str  # class of the patched module
    path: str  # its attribute path from the patched model ("" for the model itself)
    attribute: str  # the replaced attribute: "forward" or "decode"
    host: str
    detail: str
    tag: Optional[dict] = None  # who made the patch (the nodes: {"node": title, "node_id": id})
    seconds: float = 0.0  # wall time of the probe
    found_earlier: bool = False  # a fallback found in an earlier round, said again in this one (new_round)

    @property
    def fell_back(self) -> bool:
        return self.outcome == FELL_BACK

    @property
    def where(self) -> str:
        return f"{self.block} at {self.path or '<model>'} ({self.attribute})"

    def message(self) -> str:
        if self.found_earlier:
            return (f"Streamline self-check: {self.where} runs stock, as it has since it did not match "
                    f"{self.host}'s stock {self.attribute} on a probe ({self.detail}).")
        if self.fell_back:
            return (f"Streamline self-check: {self.where} does not match {self.host}'s stock {self.attribute} on a "
                    f"probe ({self.detail}); this block runs stock from now on (stock output, stock memory).")
        return f"Streamline self-check: {self.where} {self.outcome} on {self.host} ({self.detail})."


_results = deque(maxlen=1000)
_listeners = []
_seq = [0]
_said_this_round = set()  # the fallbacks (their first results' seq) said since new_round
_lock = threading.RLock()
_local = threading.local()  # the tag of the patches made now (tagged)


def new_round() -> None:
    """A new prompt begins: each block that fell back earlier says so again (log, listeners,
    `fallbacks`) the first time it runs in this round."""
    with _lock:
        _said_this_round.clear()


def _say_again(result: CheckResult) -> None:
    if result.seq in _said_this_round:
        return
    with _lock:
        if result.seq in _said_this_round:
            return
        _said_this_round.add(result.seq)
        _seq[0] += 1
        again = replace(result, seq=_seq[0], found_earlier=True)
        _results.append(again)
    _tell(again)


def results(since: int = 0) -> list:
    """Check results recorded after sequence number `since` (see `mark`), oldest first."""
    return [r for r in list(_results) if r.seq > since]


def fallbacks(since: int = 0) -> list:
    return [r for r in results(since) if r.fell_back]


def mark() -> int:
    """The sequence number of the latest result: `results(mark())` later gives what came after."""
    return _seq[0]


def add_listener(listener: Callable) -> None:
    """`listener(result)` is called for every new CheckResult (its exceptions are logged, not raised)."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: Callable) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def record(checker, outcome: str, detail: str, seconds: float = 0.0) -> CheckResult:
    with _lock:
        _seq[0] += 1
        result = CheckResult(_seq[0], outcome, type(checker.owner).__name__, checker.path, checker.attribute,
                             checker.host, detail, checker.tag, seconds)
        _results.append(result)
        if result.fell_back:
            _said_this_round.add(result.seq)
    _tell(result)
    return result


def _tell(result: CheckResult) -> None:
    """Logs a result and hands it to the listeners."""
    if result.fell_back:
        log.warning("%s", result.message())
    elif result.outcome == NOT_CHECKED:
        log.warning("%s; it runs sliced, unchecked.", result.message())
    else:
        log.debug("%s", result.message())
    for listener in list(_listeners):
        try:
            listener(result)
        except Exception:
            log.exception("Streamline self-check: a result listener failed")


@contextmanager
def set_in_thread(local: threading.local, name: str, value):
    """`local.<name>` is `value` inside the with-block, in this thread, and what it was after."""
    previous = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)


def tagged(tag: Optional[dict]):
    """Checkers made inside the with-block carry `tag` in their results (the nodes use it to name
    the node that made the patches)."""
    return set_in_thread(_local, "tag", tag)


def current_tag() -> Optional[dict]:
    return getattr(_local, "tag", None)
