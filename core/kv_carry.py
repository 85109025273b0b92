"""Keys and values carried from one Wan block forward to the next: DualParal's feature cache.

DualParal runs a video's latent blocks one after another through the same layers. A layer keeps the
keys and values of the first frames of the latent block it just ran and appends them to the keys
and values of the next forward it runs (the block before it in the video), at the positions right
after that block's frames: context crosses block borders without running those frames again. Keys
are kept after their RMSNorm and before RoPE, which is applied at the positions of the forward that
reads them. Attention code finds the carry of its layer in transformer_options[KV_CARRY].
"""
from typing import Callable, Optional

import torch

KV_CARRY = "streamline_kv_carry"


class KVCarry:
    def __init__(self):
        self.keep: Optional[slice] = None  # tokens of the current forward kept for the next one
        self._held: Optional[tuple] = None  # (keys, values) kept by the previous forward
        self._held_freqs: Optional[torch.Tensor] = None
        self._kept: Optional[tuple] = None

    def plan(self, keep: Optional[slice], held_freqs: Optional[torch.Tensor]) -> None:
        """Before a forward: which of its tokens to keep, and the RoPE frequencies of the positions
        the held tokens take in it (None: the held tokens are not read and are dropped)."""
        self.keep = keep
        self._held_freqs = held_freqs
        if held_freqs is None:
            self._held = None
        elif self._held is None or self._held[0].shape[1] != held_freqs.shape[1]:
            held = 0 if self._held is None else self._held[0].shape[1]
            raise RuntimeError(f"the carry holds {held} tokens, the forward expects {held_freqs.shape[1]}")

    @property
    def appended_tokens(self) -> int:
        return 0 if self._held is None else self._held[0].shape[1]

    def keep_part(self, s: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Tokens `s` of the forward's raw keys and values: the part inside `keep` is kept."""
        if self.keep is None:
            return
        lo, hi = max(s.start, self.keep.start), min(s.stop, self.keep.stop)
        if lo >= hi:
            return
        if self._kept is None:
            length = self.keep.stop - self.keep.start
            self._kept = tuple(t.new_empty((t.shape[0], length, t.shape[2])) for t in (keys, values))
        offset = self.keep.start
        self._kept[0][:, lo - offset:hi - offset] = keys[:, lo - s.start:hi - s.start]
        self._kept[1][:, lo - offset:hi - offset] = values[:, lo - s.start:hi - s.start]

    def fill_appended(self, keys: torch.Tensor, values: torch.Tensor, apply_rope: Callable, heads: int) -> None:
        """Writes the held keys (with RoPE at their positions here) and values into the tails of the
        forward's key and value buffers, then holds what this forward kept."""
        if self._held is not None:
            held_keys, held_values = self._held
            batch, tokens, dim = held_keys.shape
            keys.copy_(apply_rope(held_keys.view(batch, tokens, heads, dim // heads), self._held_freqs).flatten(2))
            values.copy_(held_values)
        self._held, self._kept, self._held_freqs = self._kept, None, None
