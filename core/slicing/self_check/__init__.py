"""Patches that check themselves.

`slicing_patches` hands every replacement it makes to `checked`, which wraps it in a `Checker`. The
first time the patched module runs (once per patch made: per model instance, slicing settings and
host version, and again when a node makes its patches anew), the checker cuts the real call's
inputs down to a probe: a few frames or tokens and a small spatial crop of the real inputs, with
the real weights, on the module's device and dtype. Under no_grad it runs
the host's stock forward (the class's own `forward` / `decode`: what runs without the patch) and a
sliced forward made by the same maker with probe settings that cross chunk and strip borders on the
probe, and compares the two. Within tolerance, the installed sliced forward runs from then on;
beyond it, the stock forward does, and a warning naming the block (class and path) and the host
version goes to the log and to the listeners (the nodes put it on the slicing node and in the
Memory Monitor's report): a broken replacement costs memory, never silently wrong output.

A whole-model patch group (the SVD UNet: its skip fusion and head, Probe.group) is checked in one
probe with every checked block inside it sliced as well. Only where that differs from stock is each
part checked on its own: then every other checked module inside a probe runs stock (or, for the
parts of one patch group, the probe's own companion), so each check compares one replacement
against the host's code alone and the warning names the block that differs. A probe that runs out
of memory, or finds dropout active, leaves its block sliced and unchecked (with a warning); the
host's interrupt passes through.

What a probe of each block is comes from its family's row (families/: `Family.probes`, keyed by
the maker of the sliced forward); a maker marked UNCHECKED_PROBE runs unchecked (logged once at
debug level). The mechanism here knows no family.
"""
from .checker import ENABLED, Checker, checked, link_groups
from .comparison import EXACT_TOLERANCE, LOW_PRECISION_TOLERANCE, compare, tolerance
from .probes import UNCHECKED_PROBE, Probe, ProbeSettings, maker_of
from .results import (FELL_BACK, NOT_CHECKED, PASSED, UNCHECKED, CheckResult, add_listener, fallbacks, host_version,
                      mark, new_round, remove_listener, results, tagged)

__all__ = ["ENABLED", "Checker", "checked", "link_groups", "EXACT_TOLERANCE", "LOW_PRECISION_TOLERANCE", "compare",
           "tolerance", "UNCHECKED_PROBE", "Probe", "ProbeSettings", "maker_of", "FELL_BACK", "NOT_CHECKED", "PASSED",
           "UNCHECKED", "CheckResult", "add_listener", "fallbacks", "host_version", "mark", "new_round",
           "remove_listener", "results", "tagged"]
