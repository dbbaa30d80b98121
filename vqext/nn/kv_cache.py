"""Key/value cache for step-by-step causal decoding, with an optional sliding window."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer of a model, plus the absolute position ``pos``.

    ``pos`` is the position of the next step to be fed; it only counts up. Keys are stored as the
    attention layer hands them over (already rotated for RoPE, so they never need rotating again).
    With ``max_len`` the cache keeps only the newest ``max_len`` keys per layer (a sliding window):
    the oldest are dropped while positions keep counting, so a step at position ``p`` sees keys
    ``p - max_len + 1 .. p``. ``pos`` may be an int or a ``(B,)`` int tensor (per-row offsets).

    Protocol, per step of ``n`` new positions: each layer calls ``append(layer, k, v)`` and
    attends to what it returns; the model then calls ``advance(n)`` once.
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
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        """Number of cached positions (in layer 0; every layer holds the same count)."""
        k = self.keys[0] if self.num_layers else None
        return 0 if k is None else k.shape[-2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Add ``k``, ``v`` ``(B, Hk, n, d)`` at positions ``pos .. pos + n - 1`` to ``layer``.

        Returns ``(keys, values, k_offset)``: what the new queries may attend to (cached keys
        first, then the new ones) and the absolute position of ``keys[..., 0, :]``. With a window
        the first new query sees the ``max_len`` positions up to itself; later queries of a
        multi-step chunk see back to that same start (feed one step at a time for an exact
        window per step). The stored copy keeps the newest ``max_len`` keys.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.num_layers} layers")
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be (B, Hk, n, d), got {tuple(k.shape)} and {tuple(v.shape)}")
        new = k.shape[-2]
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None:
            if old_k.shape[:2] != k.shape[:2] or old_k.shape[-1] != k.shape[-1]:
                raise ValueError(f"layer {layer}: new keys {tuple(k.shape)} do not match the cached "
                                 f"{tuple(old_k.shape)} in batch, heads or head size")
            k = torch.cat((old_k, k), dim=-2)
            v = torch.cat((old_v, v), dim=-2)
        total = k.shape[-2]
        if self.max_len is not None:
            self.keys[layer] = k[..., max(0, total - self.max_len):, :]
            self.values[layer] = v[..., max(0, total - self.max_len):, :]
            visible = min(total, self.max_len - 1 + new)
            k, v = k[..., total - visible:, :], v[..., total - visible:, :]
        else:
            self.keys[layer], self.values[layer] = k, v
        k_offset = self.pos + new - k.shape[-2]
        return k, v, k_offset

    def advance(self, n: int = 1) -> None:
        self.pos = self.pos + n

    def reset(self, start_pos: int | torch.Tensor = 0) -> None:
        self.__init__(self.num_layers, self.max_len, start_pos)

    def __repr__(self) -> str:
        pos = self.pos.tolist() if isinstance(self.pos, torch.Tensor) else self.pos
        return f"KVCache(layers={self.num_layers}, max_len={self.max_len}, pos={pos}, cached={len(self)})"
