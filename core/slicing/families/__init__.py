"""The family table: one module per model family, each holding its rows (what its blocks are, how
they are sliced, how each is probed, what the planner, Step Rehash and DualParal use of it)."""
from . import diffusers_svd, svd, wan

FAMILIES = (*svd.FAMILIES, *wan.FAMILIES, *diffusers_svd.FAMILIES)
