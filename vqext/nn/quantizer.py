"""VectorQuantizer: hard vector quantisation (VQ-VAE style) on top of ``vqext.ops.nearest_code``."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..ops.vq import nearest_code


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor   # x's shape; forward = nearest codes, backward = identity (straight-through)
    indices: torch.Tensor     # x.shape[:-1] (heads == 1) or x.shape[:-1] + (heads,), int64
    loss: torch.Tensor        # codebook_weight * codebook_loss + commitment_weight * commitment_loss
    codebook_loss: torch.Tensor    # ||sg(x) - q||^2 (zero with EMA updates: the codebook is not trained by gradient)
    commitment_loss: torch.Tensor  # ||x - sg(q)||^2
    perplexity: torch.Tensor  # exp(entropy of the batch's code frequencies), mean over heads; in [1, K]
    usage: torch.Tensor       # fraction of codes used at least once in the batch, mean over heads


class VectorQuantizer(nn.Module):
    """Replace each vector by its nearest codebook entry.

    Args:
        num_codes: codebook size K.
        dim: size of the last dimension of the input.
        heads: split the last dimension into ``heads`` chunks of ``dim // heads``, each with its own
            codebook (the multi-head seed models quantise per head of size d/H).
        commitment_weight: weight of the commitment loss ||x - sg(q)||^2 (VQ-VAE's beta).
        codebook_weight: weight of the codebook loss ||sg(x) - q||^2 (ignored with ``ema``).
        ema: update codes as exponential moving averages of their assigned vectors instead of
            by gradient (the codebook is then a buffer).
        decay: EMA decay, for the codebook (``ema``) and for the usage statistics of dead-code reset.
        eps: Laplace smoothing of EMA cluster sizes.
        kmeans_init: on the first training batch, set the codebook by k-means++ seeding and
            ``kmeans_iters`` Lloyd rounds on that batch (random draws from torch's global RNG).
        dead_code_threshold: in training, a code whose running usage (EMA of its assignments per
            batch) falls below this is reset to a random vector of the current batch. 0 disables.

    ``forward(x)`` returns a :class:`QuantizerOutput`. The straight-through estimator passes the
    gradient of ``quantized`` to ``x`` unchanged; the codebook receives gradient through
    ``codebook_loss`` only.
    """

    def __init__(self, num_codes: int, dim: int, heads: int = 1, *, commitment_weight: float = 0.25,
                 codebook_weight: float = 1.0, ema: bool = False, decay: float = 0.99, eps: float = 1e-5,
                 kmeans_init: bool = False, kmeans_iters: int = 10, dead_code_threshold: float = 0.0):
        super().__init__()
        if num_codes < 1:
            raise ConfigError(f"VectorQuantizer: num_codes must be >= 1, got {num_codes}")
        if heads < 1 or dim < 1 or dim % heads:
            raise ConfigError(f"VectorQuantizer: dim ({dim}) must be a positive multiple of heads ({heads})")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"VectorQuantizer: decay must be in [0, 1), got {decay}")
        if commitment_weight < 0 or codebook_weight < 0:
            raise ConfigError("VectorQuantizer: commitment_weight and codebook_weight must be >= 0")
        if dead_code_threshold < 0:
            raise ConfigError(f"VectorQuantizer: dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.num_codes, self.dim, self.heads = num_codes, dim, heads
        self.head_dim = dim // heads
        self.commitment_weight, self.codebook_weight = float(commitment_weight), float(codebook_weight)
        self.ema, self.decay, self.eps = ema, float(decay), float(eps)
        self.kmeans_iters = int(kmeans_iters)
        self.dead_code_threshold = float(dead_code_threshold)

        init = torch.randn(heads, num_codes, self.head_dim) * self.head_dim ** -0.5
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(heads, num_codes))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage_ema", torch.ones(heads, num_codes))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, heads={self.heads}, ema={self.ema}, "
                f"commitment_weight={self.commitment_weight}, dead_code_threshold={self.dead_code_threshold}")

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: x has last dim {x.shape[-1]}, expected dim = {self.dim}")
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def _lookup(self, idx: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """codebook[h, idx[..., h]] -> (..., H, head_dim)."""
        heads = torch.arange(self.heads, device=idx.device)
        return codebook[heads, idx]

    @torch.no_grad()
    def kmeans_(self, x: torch.Tensor, iters: int | None = None) -> None:
        """Set the codebook by k-means (Lloyd) on ``x`` ``(..., dim)``, per head."""
        iters = self.kmeans_iters if iters is None else iters
        xs = self._split(x.detach()).reshape(-1, self.heads, self.head_dim).to(self.codebook.dtype)
        n = xs.shape[0]
        if n == 0:
            return
        cent = self._kmeanspp_seeds(xs)  # (H, K, hd)
        for _ in range(iters):
            idx, _ = nearest_code(xs, cent)  # (n, H)
            counts, sums = self._assign_stats(xs, idx)
            empty = counts == 0
            cent = torch.where(empty.unsqueeze(-1), cent, sums / counts.clamp_min(1).unsqueeze(-1))
        self.codebook.data.copy_(cent)
        if self.ema:
            idx, _ = nearest_code(xs, cent)
            counts, _ = self._assign_stats(xs, idx)
            self.ema_count.copy_(counts.clamp_min(1.0))
            self.ema_sum.copy_(cent * self.ema_count.unsqueeze(-1))
        self.initialized.fill_(True)

    def _kmeanspp_seeds(self, xs: torch.Tensor) -> torch.Tensor:
        """k-means++ seeding per head: each next seed is drawn with probability proportional to
        its squared distance from the seeds so far (uniform once every vector is covered)."""
        n, H = xs.shape[0], self.heads
        heads = torch.arange(H, device=xs.device)
        cent = xs.new_empty(H, self.num_codes, self.head_dim)
        pick = torch.randint(n, (H,), device=xs.device)
        cent[:, 0] = xs[pick, heads]
        dmin = (xs - cent[:, 0]).pow(2).sum(-1)  # (n, H)
        for k in range(1, self.num_codes):
            w = dmin.t().clamp_min(0)
            w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
            pick = torch.multinomial(w, 1).squeeze(-1)
            cent[:, k] = xs[pick, heads]
            dmin = torch.minimum(dmin, (xs - cent[:, k]).pow(2).sum(-1))
        return cent

    def _assign_stats(self, xs: torch.Tensor, idx: torch.Tensor):
        """Per head: number of vectors assigned to each code (H, K) and their sum (H, K, hd)."""
        H, K, hd = self.heads, self.num_codes, self.head_dim
        flat = (idx + torch.arange(H, device=idx.device) * K).reshape(-1)  # code id within all heads
        counts = torch.zeros(H * K, device=xs.device, dtype=xs.dtype).index_add_(
            0, flat, torch.ones_like(flat, dtype=xs.dtype))
        sums = torch.zeros(H * K, hd, device=xs.device, dtype=xs.dtype).index_add_(0, flat, xs.reshape(-1, hd))
        return counts.view(H, K), sums.view(H, K, hd)

    @torch.no_grad()
    def _train_updates(self, xs: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        d = self.decay
        if self.ema:
            _, sums = self._assign_stats(xs, idx)
            self.ema_count.mul_(d).add_(counts, alpha=1 - d)
            self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
            total = self.ema_count.sum(-1, keepdim=True)
            smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
            self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(-1))
        self.usage_ema.mul_(d).add_(counts, alpha=1 - d)
        if self.dead_code_threshold > 0:
            self.reset_dead_codes_(xs)

    @torch.no_grad()
    def reset_dead_codes_(self, xs: torch.Tensor) -> int:
        """Move codes whose running usage is below the threshold onto random vectors of ``xs``
        ``(N, H, hd)``. Returns the number of codes reset."""
        dead = self.usage_ema < self.dead_code_threshold  # (H, K)
        n_dead = int(dead.sum())
        if n_dead == 0 or xs.shape[0] == 0:
            return 0
        rows = torch.randint(xs.shape[0], (self.heads, self.num_codes), device=xs.device)
        fresh = xs[rows, torch.arange(self.heads, device=xs.device).unsqueeze(-1)]  # (H, K, hd)
        self.codebook.data.copy_(torch.where(dead.unsqueeze(-1), fresh.to(self.codebook.dtype), self.codebook.data))
        # A reset code starts as if just used, so it is not reset again before it can win vectors.
        self.usage_ema.masked_fill_(dead, 1.0)
        if self.ema:
            self.ema_count.masked_fill_(dead, 1.0)
            self.ema_sum.copy_(torch.where(dead.unsqueeze(-1), self.codebook, self.ema_sum))
        return n_dead

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        xs = self._split(x)
        if self.training and not bool(self.initialized):
            self.kmeans_(x)
        codebook = self.codebook.to(x.dtype) if self.codebook.dtype != x.dtype else self.codebook
        # A single head uses the (K, D) form of the op: same answer, simpler layout.
        idx, _ = nearest_code(xs.detach() if self.heads > 1 else xs.detach().squeeze(-2),
                              codebook if self.heads > 1 else codebook[0])
        if self.heads == 1:
            idx = idx.unsqueeze(-1)
        q = self._lookup(idx, codebook)  # (..., H, hd), differentiable w.r.t. the codebook
        commitment = F.mse_loss(xs, q.detach())
        if self.ema:
            codebook_loss = torch.zeros((), device=x.device, dtype=x.dtype)
        else:
            codebook_loss = F.mse_loss(q, xs.detach())
        loss = self.codebook_weight * codebook_loss + self.commitment_weight * commitment

        with torch.no_grad():
            flat_x = xs.detach().reshape(-1, self.heads, self.head_dim)
            flat_idx = idx.reshape(-1, self.heads)
            H, K = self.heads, self.num_codes
            ids = (flat_idx + torch.arange(H, device=idx.device) * K).reshape(-1)
            counts = torch.bincount(ids, minlength=H * K).view(H, K).to(flat_x.dtype)
            probs = counts / counts.sum(-1, keepdim=True).clamp_min(1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
            perplexity = entropy.exp().mean()
            usage = (counts > 0).to(flat_x.dtype).mean()
            if self.training:
                self._train_updates(flat_x.to(self.codebook.dtype), flat_idx, counts.to(self.codebook.dtype))

        quantized = (xs + (q - xs).detach()).reshape(x.shape)  # straight-through
        out_idx = idx.squeeze(-1) if self.heads == 1 else idx
        return QuantizerOutput(quantized, out_idx, loss, codebook_loss, commitment, perplexity, usage)
