"""Training on several processes: which process this is, the samples each one trains on, and
the trainer that runs in each process started by torch's launcher (``ghlc train
--nproc-per-node N`` or ``torchrun``).

Semantics (README, "Training on several processes"): ``batch_size`` is the global batch of a
step. Each epoch has one permutation of the training set, seeded by ``seed`` and the epoch
alone (the same on every process, and the one a single process uses); :class:`EpochSampler`
deals it out to the processes as ``torch.utils.data.DistributedSampler`` does (padded with
the permutation's first samples to a multiple of the process count, then every N-th sample),
and each process takes ``batch_size / N`` of its share per step. So the samples of step ``s``
over all processes are the samples of step ``s`` of one process, the number of steps per
epoch and the cosine schedule do not depend on N, and with the exact GHL step of
``ghlc.distributed.ddp`` a run continues with any N after ``--resume``. What changes with N:
the last step of an epoch repeats up to N - 1 samples (the padding), BatchNorm statistics
are per process, each process draws its own dropout and augmentation (seeded from ``seed``,
the epoch and the rank), and float sums run in another order.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from .errors import GHLError
from .train import Trainer, _EpochStats, _logits
from .trainconfig import TrainConfig

__all__ = ["EpochSampler", "RankTrainer", "Ranks", "join", "launched"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by torch's launcher (RANK, WORLD_SIZE and LOCAL_RANK
    set)."""
    return all(k in os.environ for k in _ENV)


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (the same on every machine)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one)."""
        if self.world > 1:
            dist.barrier()

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every process (a picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, config: TrainConfig) -> None:
        """Raise ``GHLError`` for settings that these processes cannot train with: a batch
        size that is not a multiple of their number, ``cuda_graph`` with several."""
        n = self.world
        if config.batch_size % n:
            raise GHLError(
                f"batch size {config.batch_size} is not a multiple of the {n} processes (it "
                "is the global batch of a step, split evenly across the processes)"
            )
        if config.cuda_graph and n > 1:
            raise GHLError("cuda_graph works with one process only")

    def trainer(self, model: nn.Module, config: TrainConfig) -> Trainer:
        """A :class:`~ghlc.train.Trainer` for this process: the plain one for one process,
        :class:`RankTrainer` for several."""
        return Trainer(model, config) if self.world == 1 else RankTrainer(model, config, self)


def join(backend: str | None, device: torch.device) -> Ranks:
    """This process's :class:`Ranks`. Under torch's launcher with several processes, joins
    the process group (``backend``: nccl on CUDA, gloo on CPU by default) and places the
    process on ``cuda:LOCAL_RANK`` when ``device`` is CUDA."""
    if backend == "nccl" and device.type != "cuda":
        raise GHLError(f"--backend nccl needs CUDA devices (training runs on {device})")
    if not launched():
        if backend is not None:
            raise GHLError(
                f"--backend {backend}: only for several processes "
                "(--nproc-per-node N, or start with torchrun)"
            )
        return Ranks(device=device)
    try:
        rank, world, local = (int(os.environ[k]) for k in _ENV)
    except ValueError:
        got = ", ".join(f"{k}={os.environ[k]!r}" for k in _ENV)
        raise GHLError(f"the launcher's environment is not integers: {got}") from None
    if world == 1:
        return Ranks(device=device)
    if device.type == "cuda":
        if device.index is not None:
            raise GHLError(
                f"--device {device}: with several processes each process takes "
                "cuda:LOCAL_RANK; use --device cuda or auto"
            )
        if local >= torch.cuda.device_count():
            raise GHLError(
                f"local rank {local} has no CUDA device: {torch.cuda.device_count()} on this "
                "machine (start at most that many processes per node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Ranks(rank, world, local, device, backend)


class EpochSampler(Sampler[int]):
    """The samples one process trains on in an epoch, as ``DistributedSampler`` deals them.

    Epoch ``e`` shuffles all ``size`` samples with a generator seeded ``seed * 1000 + e``
    (the order of one-process training); the permutation is padded with its first samples
    to a multiple of ``num_replicas`` (or, with ``drop_last``, cut to one), and process
    ``rank`` takes every ``num_replicas``-th sample from position ``rank``. Every process
    computes the same permutation; the shares are disjoint except for the padding, equal in
    size, and together cover the epoch."""

    def __init__(
        self,
        size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if size < 0 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise GHLError(f"EpochSampler: bad size {size}, rank {rank} of {num_replicas}")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.seed, self.drop_last = seed, drop_last
        self.epoch = 0
        if drop_last:
            self.num_samples = size // num_replicas
        else:
            self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose samples :meth:`indices` and iteration give."""
        self.epoch = epoch

    def permutation(self) -> torch.Tensor:
        """The epoch's order of the whole set (before padding or cutting)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(self.size, generator=g)

    def indices(self) -> torch.Tensor:
        """This process's samples of the epoch, in order (``num_samples`` of them)."""
        perm = self.permutation()
        if self.total_size > self.size:
            reps = math.ceil((self.total_size - self.size) / max(self.size, 1))
            perm = torch.cat([perm, perm.repeat(reps)])
        return perm[: self.total_size][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


class RankTrainer(Trainer):
    """The :class:`~ghlc.train.Trainer` of one of several processes (see the module's
    docstring for the data each one trains on).

    The training forward runs the model wrapped by :func:`ghlc.distributed.ddp` (the exact
    GHL step over all processes; torch's DDP for a plain model); the epoch's loss and
    accuracy and the NaN/Inf checks are reduced over the processes, evaluation is sharded and
    reduced (sums of loss, correct and counts), and only rank 0 prints the progress bar and
    writes checkpoints, metrics and curves. Checkpoints hold nothing per process."""

    def __init__(self, model: nn.Module, config: TrainConfig, ranks: Ranks) -> None:
        super().__init__(model, config)
        self.ranks = ranks
        self._wrapped: nn.Module | None = None

    def setup(self, x_train, y_train, x_test=None, y_test=None) -> None:
        cfg, n = self.config, self.ranks.world
        self.ranks.check(cfg)
        super().setup(x_train, y_train, x_test, y_test)
        self.sampler = EpochSampler(
            self.y_train.shape[0], n, self.ranks.rank, cfg.seed, drop_last=False
        )

    def start(self) -> None:
        if self.ranks.main:  # (writes the epoch-0 checkpoint; the RNG is seeded per epoch)
            super().start()

    def epoch_order(self, epoch: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
        self.sampler.set_epoch(epoch)
        g.manual_seed(seed_of(self.config.seed, epoch, self.ranks.rank, 1))  # augmentation
        return self.sampler.indices(), self.config.batch_size // self.ranks.world

    def train_module(self) -> nn.Module:
        if self._wrapped is None:  # (wrapped at the first step: after start or resume)
            from torch.nn.parallel import DistributedDataParallel

            from .distributed import ddp
            from .runtime.mode import is_prepared

            dev = self.device
            ids = [dev] if dev.type == "cuda" else None
            if any(is_prepared(m) for m in self.model.modules()):
                self._wrapped = ddp(self.model, device_ids=ids)
            else:  # a plain model (--method bp): torch's DDP as it is
                self._wrapped = DistributedDataParallel(self.model, device_ids=ids)
        return self._wrapped

    def train_epoch(self, epoch: int) -> _EpochStats:
        torch.manual_seed(seed_of(self.config.seed, epoch, self.ranks.rank, 0))  # dropout
        stats = super().train_epoch(epoch)
        seen = torch.tensor(float(stats.seen), dtype=torch.float64, device=self.device)
        t = _all_reduce(torch.stack([stats.loss_sum.double(), stats.correct.double(), seen]))
        stats.loss_sum, stats.correct, stats.seen = t[0], t[1].round().long(), int(t[2])
        return stats

    def check_loss(self, nonfinite: torch.Tensor, epoch: int, step: int, every: int) -> None:
        flag = _all_reduce(nonfinite.to(torch.int32).reshape(1), dist.ReduceOp.MAX)
        super().check_loss(flag[0].bool(), epoch, step, every)

    def evaluate(self) -> dict[str, Any]:
        """Test-set loss and accuracy over all processes: each scores a contiguous shard,
        and the sums of loss, correct answers and counts per class are reduced."""
        x, y, dev = self.x_test, self.y_test, self.device
        n, r, w = y.shape[0], self.ranks.rank, self.ranks.world
        classes = self.config.classes
        k = max(len(classes) if classes is not None else 0, int(y.max()) + 1 if n else 0)
        loss = torch.zeros(1, dtype=torch.float64, device=dev)
        correct = torch.zeros(k, dtype=torch.float64, device=dev)
        count = torch.zeros(k, dtype=torch.float64, device=dev)
        self.model.eval()
        try:
            with torch.no_grad():
                for i in range(n * r // w, n * (r + 1) // w, 256):
                    yb = y[i : min(i + 256, n * (r + 1) // w)].to(dev)
                    out = _logits(self.model(x[i : i + yb.shape[0]].to(dev)))
                    loss += F.cross_entropy(out.float(), yb, reduction="sum").double()
                    right = yb[out.argmax(1) == yb]
                    correct += torch.bincount(right, minlength=k)[:k].double()
                    count += torch.bincount(yb, minlength=k)[:k].double()
        finally:
            self.model.train()
        t = _all_reduce(torch.cat([loss, correct, count])).cpu()
        correct, count = t[1 : 1 + k], t[1 + k :]
        if n == 0:
            return {"loss": float("nan"), "acc": float("nan"), "per_class": {}}
        # (the accuracy as ghlc.train.evaluate computes it: a float32 mean)
        acc = float(correct.sum().float() / n)
        labels = range(len(classes)) if classes is not None else sorted(set(y.tolist()))
        per_class = {
            (classes[j] if classes is not None else int(j)): (
                float(correct[j].float() / count[j].float()) if count[j] else float("nan")
            )
            for j in labels
        }
        return {"loss": float(t[0]) / n, "acc": acc, "per_class": per_class}

    def checkpoint(self, best: bool) -> None:
        if self.ranks.main:
            super().checkpoint(best)

    def write_metrics(self, curves: bool = True) -> None:
        if self.ranks.main:
            super().write_metrics(curves)
