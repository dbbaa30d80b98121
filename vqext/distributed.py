"""Data-parallel training on ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m vqext run ...`` starts N copies of the CLI with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`setup` sees them,
joins the process group (``gloo`` on the CPU, ``nccl`` on CUDA, one GPU per local rank) and
returns a :class:`Context`; without them it returns the single-process context, whose methods
are no-ops, so the training loop has one code path.

How a step is split: every rank draws the same shuffled order (same seed), cuts the same global
batch, and takes its own contiguous part of it (:meth:`Context.split_batch`). Each rank's loss is
weighted by ``len(part) / len(batch) * world_size`` so that DistributedDataParallel's gradient
average equals the gradient of the mean over the whole global batch: the run computes what one
process with ``--batch-size`` would, up to floating-point summation order. Validation windows are
split the same way and the per-rank means are combined by window count.

Rank 0 alone creates the run directory, writes files and prints progress; the others train
quietly. Data-dependent buffers (the hard quantiser's EMA codebook, k-means init, usage
statistics) follow rank 0's part of each batch (DDP broadcasts rank 0's buffers every step).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------------------------- model
    def wrap(self, model: torch.nn.Module, device) -> torch.nn.Module:
        """The module to call in training: ``model`` itself, or a DDP wrapper sharing its parameters."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = torch.device(device)
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        # Some architectures leave parameters out of a step (e.g. a frozen or unused branch).
        return DDP(model, device_ids=ids, find_unused_parameters=True)

    # -------------------------------------------------------------------------------- data
    def split_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous part of a global batch and the weight of its mean loss.

        A rank whose part would be empty (global batch smaller than the world) still runs one
        window with weight 0, so every rank joins the gradient all-reduce.
        """
        if not self.enabled:
            return batch, 1.0
        n = len(batch)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        if hi == lo:
            return batch[:1], 0.0
        return batch[lo:hi], (hi - lo) / n * self.world_size

    def shard(self, indices) -> torch.Tensor:
        """This rank's contiguous slice of an index list (may be empty)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if not self.enabled:
            return idx
        n = len(idx)
        return idx[n * self.rank // self.world_size: n * (self.rank + 1) // self.world_size]

    # --------------------------------------------------------------------------- reductions
    def sum(self, *values: float) -> list[float]:
        """Sums over all ranks of each value (float64, one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(t)
        return t.cpu().tolist()

    def weighted_mean(self, value: float, weight: float) -> float:
        """Mean over ranks of ``value`` weighted by ``weight`` (e.g. a per-rank mean and its count)."""
        if not self.enabled:
            return float(value)  # bit-identical to a run without this context
        total, count = self.sum(value * weight if weight else 0.0, weight)
        return total / count if count else float("nan")

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_call(self, fn):
        """``fn()`` evaluated on rank 0 and sent to every rank; a VqextError it raises is raised on
        every rank (so a corrupted checkpoint stops all of them with the same message)."""
        if not self.enabled:
            return fn()
        from .errors import VqextError

        result = ("ok", None)
        if self.is_main:
            try:
                result = ("ok", fn())
            except VqextError as exc:
                result = ("error", exc)
        kind, value = self.broadcast(result)
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _reduce_device(self):
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


_CONTEXT: Context | None = None


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup(device: str) -> Context:
    """Join the process group once per process (no-op for a single process); ``device`` is the
    resolved training device ("cpu", "cuda" or "cuda:N"): it picks the backend and, on CUDA, the
    GPU (``LOCAL_RANK``)."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if not launched():
        _CONTEXT = Context()
        return _CONTEXT
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"WORLD_SIZE is set but the launcher's {exc} is missing or not a number; "
                          "start with torchrun") from None
    cuda = str(device).startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; "
                              "use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
        # Leaving the group at exit joins the backend's threads; a process that exits with them
        # still running can abort ("terminate called without an active exception").
        atexit.register(_leave_group)
    _CONTEXT = Context(rank=rank, world_size=world, local_rank=local)
    return _CONTEXT


def _leave_group() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()  # DDP reducers that still hold the group go first
        try:
            # Leave together: a rank that tears its backend down while rank 0 is still forecasting
            # and plotting aborted now and then ("terminate called without an active exception").
            dist.barrier()
        except Exception:  # noqa: BLE001 - another rank already failed; leave anyway
            pass
        dist.destroy_process_group()


def current() -> Context:
    return _CONTEXT or Context()


def training_device(device: str) -> str:
    """The device this rank trains on: under torchrun any CUDA device means this rank's GPU
    (``LOCAL_RANK``), as two ranks on one GPU would stall NCCL."""
    if launched() and str(device).startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device
