"""The Checker: a checked replacement that probes its first call and runs sliced or stock from
then on, and the groups that check a whole model in one probe."""
import inspect
import logging
import os
import threading
import time
from typing import Callable, Optional

import torch
from torch import nn

from ..settings import SliceSettings
from .comparison import compare
from .probes import _MISSING, UNCHECKED_PROBE, Call, ProbeSettings, maker_of
from .results import (FELL_BACK, NOT_CHECKED, PASSED, UNCHECKED, CheckResult, _say_again, current_tag, host_version,
                      record, set_in_thread)

log = logging.getLogger(__name__.rpartition(".")[0])

ENABLED = os.environ.get("STREAMLINE_SELF_CHECK", "1") != "0"  # STREAMLINE_SELF_CHECK=0: no probes at all
_lock = threading.RLock()  # one decision per checker
_local = threading.local()  # the overrides of the probe running now (_probing)

_unchecked_logged = set()


class _StockFailed(Exception):
    pass


def _out_of_memory(error: Exception) -> bool:
    message = str(error).lower()
    return (isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message
            or "can't allocate memory" in message)


def _passes_through(error: Exception) -> bool:
    """Exceptions a probe must not swallow: the host's interrupt (the user pressed Cancel)."""
    return type(error).__name__ == "InterruptProcessingException"


def _dropout_active(module: nn.Module) -> bool:
    return any(m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def _probing(overrides: dict):
    return set_in_thread(_local, "overrides", overrides)


def _unreal(args: tuple, kwargs: dict, module: nn.Module) -> bool:
    """Whether the call holds, or the module computes with, fake or meta tensors (memory prediction,
    fake-tensor benchmarks; real inputs to a fake module come out fake)."""
    from torch._subclasses.fake_tensor import is_fake
    values = [*args, *kwargs.values(), next(module.parameters(), None)]
    return any(isinstance(v, torch.Tensor) and (v.is_meta or is_fake(v)) for v in values)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class Checker:
    """A checked replacement of `owner.<attribute>`: called like it, runs the installed sliced
    forward once the first probe has passed, the stock one once it has failed."""

    def __init__(self, module: nn.Module, key: str, sliced: Callable, make: Callable, settings: SliceSettings,
                 base: str, tag: Optional[dict], probes: dict):
        owner_path, _, attribute = key.rpartition(".")
        self.module, self.key, self.make, self.settings, self.tag = module, key, make, settings, tag
        self.owner = module.get_submodule(owner_path) if owner_path else module
        self.attribute, self.sliced = attribute, sliced
        self.path = f"{base}{owner_path}".rstrip(".")
        stock = getattr(type(self.owner), attribute, None)
        self.stock = stock.__get__(self.owner) if callable(stock) else None
        self.maker = maker_of(sliced)
        self.probe = probes.get(self.maker, _MISSING)
        self.host = host_version(self.owner)
        self.leader: Optional[Checker] = None
        self.companions: list = []
        self.members: list = []
        self.result: Optional[CheckResult] = None
        self._run: Optional[Callable] = None

    @property
    def where(self) -> str:
        return f"{type(self.owner).__name__} at {self.path or '<model>'} ({self.attribute})"

    def __repr__(self):
        return f"<Streamline checked {self.maker} of {type(self.owner).__name__} at {self.path or '<model>'}>"

    def __call__(self, *args, **kwargs):
        overrides = getattr(_local, "overrides", None)
        if overrides is not None:  # inside another block's probe: stock, or that probe's own companion
            return overrides.get(self, self.stock)(*args, **kwargs)
        if self._run is None and getattr(self.probe, "caller", False):
            return self._call_then_check_caller(args, kwargs)
        run = self._run or self._resolve(args, kwargs)
        if run is self.stock:  # a fallback: said again once per round
            _say_again(self.result if self.leader is None else self.leader.result)
        return run(*args, **kwargs)

    def _call_then_check_caller(self, args, kwargs):
        """A caller (Probe.caller): the real call first, in which its blocks check themselves, then
        its probe with each block as decided; where that falls back, the call again, every block
        stock. Its own pass-through runs either way."""
        output = self.sliced(*args, **kwargs)
        with _lock:
            if self._run is None:
                self.result = self._check(args, kwargs)
                if self.result is not None:
                    self._run = self.sliced
        if self.result is not None and self.result.fell_back:
            del output
            output = self.sliced(*args, **kwargs)
        return output

    def _resolve(self, args, kwargs) -> Callable:
        if self.leader is not None:  # decided with the group's leader
            if self.leader.result is None:
                return self.sliced
            self._run = self.stock if self.leader.result.fell_back else self.sliced
            return self._run
        with _lock:
            if self._run is None:
                self.result = self._check(args, kwargs)
                if self.result is None:  # this call could not be probed: sliced, unchecked, until one can
                    return self.sliced
                self._run = self.stock if self.result.fell_back else self.sliced
            return self._run

    def _check(self, args, kwargs) -> Optional[CheckResult]:
        if not ENABLED or _compiling():
            return None
        if self.probe is UNCHECKED_PROBE or self.probe is _MISSING or self.stock is None:
            if self.maker not in _unchecked_logged:
                _unchecked_logged.add(self.maker)
                log.log(logging.WARNING if self.probe is _MISSING else logging.DEBUG,
                        "Streamline self-check: %s (%s) %s; its blocks run unchecked", self.maker,
                        type(self.owner).__name__, "has no probe in its family's row" if self.probe is _MISSING
                        else "is marked unchecked in its family's row")
            return CheckResult(0, UNCHECKED, type(self.owner).__name__, self.path, self.attribute, self.host,
                               "no probe rule", self.tag)
        if _unreal(args, kwargs, self.owner):
            return None
        if _dropout_active(self.owner):
            return record(self, NOT_CHECKED, "dropout is active (training mode): two runs cannot be compared")
        started = time.perf_counter()
        if self.members:
            outcome, detail = self._probe(args, kwargs, self.members)
            if outcome is None:
                return None
            if self.probe.caller:
                return self._caller_result(outcome, detail, time.perf_counter() - started)
            if outcome == PASSED:
                result = record(self, PASSED, f"{detail}; with the {len(self.members)} sliced blocks inside it",
                                 time.perf_counter() - started)
                for member in self.members:
                    member.result = record(member, PASSED, f"checked with {self.where}")
                    member._run = member.sliced
                return result
            log.debug("Streamline self-check: %s with its blocks sliced: %s; checking each block on its own",
                      self.where, detail)
        outcome, detail = self._probe(args, kwargs, ())
        if outcome is None:
            return None
        return record(self, outcome, detail, time.perf_counter() - started)

    def _caller_result(self, outcome: str, detail: str, seconds: float) -> CheckResult:
        """A caller's probe, its blocks as each decided alone: where it differs, the blocks still
        sliced are wrong in this caller (exact alone or not) and every one falls back to stock."""
        if outcome != FELL_BACK:
            return record(self, outcome, f"{detail}; with the sliced blocks inside it", seconds)
        sliced = [m for m in self.members if not (m.result is not None and m.result.fell_back)]
        result = record(self, FELL_BACK, f"with its {len(sliced)} sliced blocks: {detail}; every block inside "
                                          f"runs stock", seconds)
        for member in sliced:
            member.result = record(member, FELL_BACK, f"wrong inside {self.where}")
            member._run = member.stock
        return result

    def _probe(self, args, kwargs, members) -> tuple:
        """(outcome, detail) of a probe with `members` sliced too, or (None, None) where this call
        cannot be cut."""
        try:
            outputs = self.probe_outputs(args, kwargs, members)
        except _StockFailed as failure:
            return NOT_CHECKED, f"the stock {self.attribute} failed on the probe: {failure}"
        if outputs is None:
            return None, None
        stock, sliced, error = outputs
        if error is not None and _out_of_memory(error):  # says nothing of the replacement; stock would not fit
            return NOT_CHECKED, f"out of memory during the probe ({type(error).__name__})"
        if error is not None:
            return FELL_BACK, f"the sliced {self.attribute} raised {type(error).__name__}: {error}"
        convolutions = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.owner.modules())
        matches, detail = compare(stock, sliced, convolutions)
        return (PASSED if matches else FELL_BACK), detail

    def probe_outputs(self, args, kwargs, members=()) -> Optional[tuple]:
        """(stock output, sliced output or None, the sliced forward's exception or None) on the probe
        cut from this call, with the companions and `members` sliced as well, or None where this call
        cannot be cut. Raises _StockFailed when stock fails."""
        try:
            call = self.probe.cut(self.owner, Call(inspect.signature(self.stock), args, kwargs))
        except Exception as error:
            raise _StockFailed(f"cutting the probe raised {type(error).__name__}: {error}") from None
        if call is None:
            return None
        made = {}

        def probe_forward(checker):
            patches = made.get((id(checker.module), checker.make))
            if patches is None:
                patches = made[id(checker.module), checker.make] = checker.make(
                    checker.module, ProbeSettings.of(checker.settings))
            return patches.get(checker.key)
        sliced = probe_forward(self)
        overrides = {c: c.stock if c.result is not None and c.result.fell_back else probe_forward(c)
                     for c in (*self.companions, *members)}
        overrides = {c: forward for c, forward in overrides.items() if forward is not None}
        with torch.no_grad():
            with _probing({}):
                try:
                    expected = call.copy().run(self.stock)
                except Exception as error:
                    if _passes_through(error):
                        raise
                    raise _StockFailed(f"{type(error).__name__}: {error}") from None
            with _probing(overrides):
                try:
                    return expected, call.copy().run(sliced), None
                except Exception as error:
                    if _passes_through(error):
                        raise
                    return expected, None, error


def checked(module: nn.Module, make: Callable, settings: SliceSettings, base: str, probes: dict) -> dict:
    """`make(module, settings)` (a block table row's patches: attribute path from `module` ->
    replacement), each replacement wrapped in a Checker with its probe from `probes` (the family
    row's: maker of the sliced forward -> Probe); `base` is `module`'s path in the model."""
    patches = make(module, settings)
    tag = current_tag()
    checkers = {key: Checker(module, key, value, make, settings, base, tag, probes) for key, value in patches.items()}
    for leader in [c for c in checkers.values() if c.probe is not None and c.probe.group]:
        for checker in checkers.values():
            if checker is not leader:
                checker.leader = leader
                leader.companions.append(checker)
    return checkers


def link_groups(checkers) -> None:
    """Makes every checker of a patched model whose module lies inside a group leader's module (its
    companions aside) a member of that leader (see Probe.group)."""
    checkers = list(checkers)
    for leader in [c for c in checkers if c.probe is not None and c.probe.group]:
        inside = {id(m) for m in leader.owner.modules()}
        leader.members = [c for c in checkers if c is not leader and c.leader is None and id(c.owner) in inside]
