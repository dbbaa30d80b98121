"""Key/value cache for step-by-step causal decoding, with an optional sliding window."""
from __future__ import annotations

import torch


class SlidingBuffer:
    """The newest entries of a sequence along dim ``dim``, kept contiguous in one preallocated tensor.

    ``append(x)`` writes the new entries after the held ones and returns a view of the last
    ``visible`` entries ending with them: one copy per call, no concatenation. When the free room
    runs out, the entries that can still be seen move to the front (once every ``~keep`` steps) or
    the storage grows (doubling, when ``keep`` is None), so a step costs amortised O(new entries).
    Views returned by ``append`` stay valid until the next ``append``.
    """

    def __init__(self, keep: int | None, dim: int):
        self.keep = keep            # entries kept after an append (None: all)
        self.dim = dim
        self.storage: torch.Tensor | None = None
        self.start = 0              # held entries are storage[start:start + length] along dim
        self.length = 0

    def held(self) -> torch.Tensor | None:
        if self.storage is None:
            return None
        return self.storage.narrow(self.dim, self.start, self.length)

    def append(self, x: torch.Tensor, visible: int | None = None) -> torch.Tensor:
        """Add ``x``'s entries; returns the last ``visible`` (default all held) entries, ending with ``x``'s."""
        n = x.shape[self.dim]
        write_at, first, visible = self.reserve(n, visible, like=x)
        self.storage.narrow(self.dim, write_at, n).copy_(x)
        return self.storage.narrow(self.dim, first, visible)

    def reserve(self, n: int, visible: int | None = None, like: torch.Tensor | None = None) -> tuple[int, int, int]:
        """Make room for ``n`` entries and count them as held; the caller writes them.

        Returns ``(write_at, first, visible)``: the new entries go to ``write_at .. write_at + n - 1``
        along ``dim`` and the entries to read are ``first .. first + visible - 1``. ``like`` (shaped
        as the new entries) sizes the first allocation; later ones follow the storage.
        """
        total = self.length + n
        visible = total if visible is None else min(visible, total)
        if self.keep is None:
            still_needed = self.length
        else:  # what the returned view and the kept window need of the held entries
            still_needed = min(self.length, max(visible - n, min(self.keep, total) - n, 0))
        if self.storage is None or self.start + self.length + n > self.storage.shape[self.dim]:
            template = like if like is not None else self.storage
            if template is None:
                raise ValueError("the first reserve of a SlidingBuffer needs `like` to size its storage")
            self._make_room(template, n, still_needed)
        write_at = self.start + self.length
        self.length += n
        first = self.start + self.length - visible
        if self.keep is not None and self.length > self.keep:
            self.start += self.length - self.keep
            self.length = self.keep
        return write_at, first, visible

    def _make_room(self, x: torch.Tensor, n: int, still_needed: int) -> None:
        """Move the ``still_needed`` newest held entries to the front of storage with room for ``n`` more."""
        old = None
        if self.storage is not None and still_needed:
            old = self.storage.narrow(self.dim, self.start + self.length - still_needed, still_needed).clone()
        if self.keep is None:
            cap = max(16, 2 * (still_needed + n))
        else:
            cap = 2 * self.keep + n  # compacts once every ~keep single steps
        if self.storage is None or self.storage.shape[self.dim] < cap or not _same_kind(self.storage, x, self.dim):
            shape = list(x.shape)
            shape[self.dim] = cap
            self.storage = x.new_empty(shape)
        if old is not None:
            self.storage.narrow(self.dim, 0, still_needed).copy_(old)
        self.start, self.length = 0, still_needed


def _same_kind(a: torch.Tensor, b: torch.Tensor, dim: int) -> bool:
    """Whether ``b``'s entries fit into ``a`` (same dtype, device and sizes but along ``dim``)."""
    return (a.dtype == b.dtype and a.device == b.device and a.dim() == b.dim()
            and all(x == y for i, (x, y) in enumerate(zip(a.shape, b.shape)) if i != dim))


class KVCache:
    """Keys and values of every attention layer of a model, plus the absolute position ``pos``.

    ``pos`` is the position of the next step to be fed; it only counts up. Keys are stored as the
    attention layer hands them over (vqext's rotate them for RoPE once, so they never need
    rotating again). With ``max_len`` the cache keeps only the newest
    ``max_len`` positions per layer (a sliding window): the oldest are dropped while positions
    keep counting, so a step at position ``p`` sees keys ``p - max_len + 1 .. p``. ``pos`` may be
    an int or a ``(B,)`` int tensor (per-row offsets).

    Storage is preallocated per layer (:class:`SlidingBuffer`, keys and values side by side): a
    step writes its keys and values with one copy and attends to views, instead of concatenating
    the whole history every step.

    Protocol, per step of ``n`` new positions: each layer calls ``append(layer, k, v)`` (or
    ``append_kv(layer, kv)``) and attends to what it returns; the model then calls ``advance(n)`` once.
    """

    def __init__(self, num_layers: int, max_len: int | None = None, start_pos: int | torch.Tensor = 0):
        if not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be an int >= 0, got {num_layers!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be None or an int >= 1, got {max_len!r}")
        if isinstance(start_pos, torch.Tensor):
            start_pos = start_pos.to(torch.int64).reshape(-1).clone()
        elif not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an int >= 0 or a per-batch int tensor, got {start_pos!r}")
        self.num_layers = num_layers
        self.max_len = max_len
        self.pos = start_pos
        self._kv = [SlidingBuffer(max_len, dim=3) for _ in range(num_layers)]  # (2, B, Hk, n, d) each

    @property
    def keys(self) -> list[torch.Tensor | None]:
        """Per layer, the held keys ``(B, Hk, n, d)`` (views), or None before the first append."""
        return [None if b.storage is None else b.held()[0] for b in self._kv]

    @property
    def values(self) -> list[torch.Tensor | None]:
        return [None if b.storage is None else b.held()[1] for b in self._kv]

    def __len__(self) -> int:
        """Number of cached positions (in layer 0; every layer holds the same count)."""
        return self._kv[0].length if self.num_layers else 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Add ``k``, ``v`` ``(B, Hk, n, d)`` at positions ``pos .. pos + n - 1`` to ``layer``.

        Returns ``(keys, values, k_offset)``: what the new queries may attend to (cached keys
        first, then the new ones) and the absolute position of ``keys[..., 0, :]``. With a window
        the first new query sees the ``max_len`` positions up to itself; later queries of a
        multi-step chunk see back to that same start (feed one step at a time for an exact
        window per step). The stored copy keeps the newest ``max_len`` keys. The returned
        tensors are views into the cache, valid until the layer's next append.
        """
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be (B, Hk, n, d), got {tuple(k.shape)} and {tuple(v.shape)}")
        kv, k_offset = self.append_kv(layer, torch.stack((k, v)))
        return kv[0], kv[1], k_offset

    def append_kv(self, layer: int, kv: torch.Tensor):
        """:meth:`append` with keys and values stacked as ``kv`` ``(2, B, Hk, n, d)`` (one copy);
        returns ``(kv_visible, k_offset)`` with the visible keys and values stacked the same way."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.num_layers} layers")
        if kv.dim() != 5 or kv.shape[0] != 2:
            raise ValueError(f"kv must be keys and values stacked as (2, B, Hk, n, d), got {tuple(kv.shape)}")
        buffer = self._kv[layer]
        if buffer.length:
            held = buffer.storage
            if held.shape[:3] != kv.shape[:3] or held.shape[-1] != kv.shape[-1]:
                raise ValueError(f"layer {layer}: new keys {tuple(kv.shape[1:])} do not match the cached "
                                 f"{tuple(buffer.held().shape[1:])} in batch, heads or head size")
        new = kv.shape[3]
        kv = buffer.append(kv, None if self.max_len is None else self.max_len - 1 + new)
        return kv, self.pos + new - kv.shape[3]

    def allocated(self) -> bool:
        """Whether every layer has storage (after its first append)."""
        return all(b.storage is not None for b in self._kv)

    def reserve_kv(self, n: int = 1) -> tuple[list[torch.Tensor], list[int]]:
        """For a kernel that writes the new keys and values itself: make room for ``n`` positions in
        every layer and return the storages ``(2, B, Hk, capacity, d)`` with, per layer,
        ``write_at, first, visible`` (the indices :meth:`append_kv` would use). None while some
        layer has no storage yet (append to it first)."""
        if any(b.storage is None for b in self._kv):
            return None
        visible = None if self.max_len is None else self.max_len - 1 + n
        index: list[int] = []
        for b in self._kv:
            index.extend(b.reserve(n, visible))
        return [b.storage for b in self._kv], index

    def advance(self, n: int = 1) -> None:
        self.pos = self.pos + n

    def reset(self, start_pos: int | torch.Tensor = 0) -> None:
        self.__init__(self.num_layers, self.max_len, start_pos)

    def __repr__(self) -> str:
        pos = self.pos.tolist() if isinstance(self.pos, torch.Tensor) else self.pos
        return f"KVCache(layers={self.num_layers}, max_len={self.max_len}, pos={pos}, cached={len(self)})"
