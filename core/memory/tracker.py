"""Peak of live tensor storage, counted at the dispatch level.

Works on real CPU tensors and under FakeTensorMode or on the meta device, so the activation peak of a
full-size model's forward can be measured on a machine without its memory. Only storage created while
the tracker is active is counted (weights and inputs that already exist are not: `track_existing` adds
them). A storage is live while any tensor viewing it is alive.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorageTracker(TorchDispatchMode):
    """`device_type` ("cuda", "cpu", ...) counts only storage on that kind of device."""

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type
        self._views: dict[int, set[int]] = {}  # storage key -> ids of live tensors viewing it
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        # An output viewing an input's storage that is not tracked (a weight's transpose, a
        # parameter returned by .to()) allocates nothing.
        untracked_inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                            if isinstance(t, torch.Tensor)} - self._views.keys()
        self._track(output, untracked_inputs)
        return output

    def track_existing(self, *tensors) -> None:
        self._track(tensors)

    def _track(self, tree, skip: frozenset = frozenset()) -> None:
        for tensor in tree_flatten(tree)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in skip:
                self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        if self.device_type is not None and tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: unique while alive, also for fake/meta storage
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = set()
            self._sizes[key] = storage.nbytes()
            self.current += self._sizes[key]
            self.peak = max(self.peak, self.current)
        if id(tensor) not in views:
            views.add(id(tensor))
            weakref.finalize(tensor, self._release, key, id(tensor))

    def _release(self, key: int, tensor_id: int) -> None:
        views = self._views.get(key)
        if views is None:
            return
        views.discard(tensor_id)
        if not views:
            del self._views[key]
            self.current -= self._sizes.pop(key)
