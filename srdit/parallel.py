"""Data-parallel training without changing the trajectory: this process's slice of every global batch.

The launcher (torchrun, a Ray Train worker of `srdit.runtime.data_parallel`) initialises `torch.distributed`; the trainer then
asks `DataParallel.current()` where it stands. Every rank draws the randomness of the *global* batch from the same
seeded generators (noise, times, label dropout, SPRINT routing) and keeps its slice, so the random streams stay in
lockstep across ranks and a run on W workers follows the single-process run with the same global batch, up to the
order of floating-point sums in the gradient all-reduce.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from srdit.config import ConfigError


def rendezvous_store(host: str, world_size: int | None, timeout: datetime.timedelta) -> dist.TCPStore:
    """The server side of a process group's rendezvous: torch's TCPStore listening on a port that the operating
    system assigns when it listens (port 0), held until the store is closed; `.host` / `.port` say where the ranks
    connect (`dist.TCPStore(host, port, world_size, False)`). Never a port that was merely free a moment ago
    (bind port 0, read it, close, listen later): in between another group on the machine may be handed the same
    number, and its ranks would meet this group's store. `timeout`: how long a rank waits for a key."""
    return dist.TCPStore(host, 0, world_size, True, timeout=timeout, wait_for_workers=False)


def join_group(
    port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    host: str = "127.0.0.1",
    timeout: datetime.timedelta = datetime.timedelta(minutes=5),
) -> None:
    """Join, as `rank` of `world_size`, the process group whose rendezvous store (`rendezvous_store`, held by
    another process) listens at host:port."""
    store = dist.TCPStore(host, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> DataParallel:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        "Rank 0 reports, evaluates and writes checkpoints."
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def local_batch(self, global_batch: int) -> int:
        if global_batch % self.world:
            raise ValueError(
                f"train.batch_size {global_batch} is not divisible by the {self.world} data-parallel "
                f"workers; choose a multiple of {self.world}"
            )
        return global_batch // self.world

    def part(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's contiguous slice of a global-batch tensor (dim 0)."""
        if x is None or not self.active:
            return x
        n = self.local_batch(x.shape[0])
        return x[self.rank * n : (self.rank + 1) * n]

    def rolled(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the global batch rolled by one (x_{j-1} for every global index j), so that
        in-batch negatives (contrastive flow matching) pair exactly as in one process."""
        out = x.roll(1, dims=0)
        if self.active:
            lasts = [torch.empty_like(x[-1:]) for _ in range(self.world)]
            dist.all_gather(lasts, x[-1:].contiguous())
            out[0] = lasts[(self.rank - 1) % self.world][0]
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch [world * B, ...] (rank order, the one-process order) from every rank's x [B, ...],
        differentiable: each rank's loss on the global batch sends its gradient to every rank's rows, and each rank
        receives the sum over ranks for its own rows. With the gradient mean over ranks that data parallel applies,
        a loss that couples samples across ranks (a plugin's `LossContext.gather`) gets the one-process gradient.
        One process: x itself."""
        if not self.active:
            return x
        return _AllGather.apply(x, self.world, self.rank)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a copy; `values` itself is left alone)."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (equal local batches make it the global-batch mean)."""
        if self.active:
            values = self.sum(values)
            values /= self.world
        return values

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` on rank 0, in rank order (a list of CPU tensors); None on the other ranks.

        The ranks' tensors may differ in length (dim 0, e.g. one rank's share of the samples, possibly empty) but
        not in their other dims or dtype. Two collectives: the lengths (all-gather), then the tensors padded to the
        longest (gather to rank 0, which alone holds world x longest rows). Under NCCL the tensors travel through
        this rank's current CUDA device. One process: [x]."""
        if not self.active:
            return [x.cpu()]
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        length = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
        lengths = [torch.empty_like(length) for _ in range(self.world)]
        dist.all_gather(lengths, length)
        sizes = [int(n) for n in lengths]
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.main else None
        dist.gather(padded, parts, dst=0)
        return [part[:n].cpu() for part, n in zip(parts, sizes)] if self.main else None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


class _AllGather(torch.autograd.Function):
    """all_gather forward; backward: all-reduce (sum) of the incoming gradient, this rank's rows kept."""

    @staticmethod
    def forward(ctx, x, world, rank):
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None, None


def check_device(name: str, key: str = "train.device", any_index: bool = False) -> None:
    """ConfigError (one line naming `key`) when this machine cannot use the device `name` (cpu, cuda, cuda:N): no
    CUDA at all, or cuda:N beyond its device count (not checked with `any_index`: the launcher picks the GPU of a
    data-parallel rank). Checked before anything is built, not at the first tensor moved there."""
    if not name.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{key}={name}: no CUDA device here (torch.cuda.is_available() is False); use cpu or auto")
    index = int(name.partition(":")[2] or 0)
    if index >= count and not any_index:
        raise ConfigError(
            f"{key}={name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
            f"use one of them, cuda or auto"
        )


def init_from_env(device_type: str) -> DataParallel:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...) when present:
    NCCL on CUDA, gloo on CPU. A single process is left alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = None
        if device_type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        # A long timeout: the other ranks wait while rank 0 scores a 50K-sample evaluation. `device_id` binds the
        # NCCL communicator to this rank's GPU up front (no lazy, guessed device on the first collective).
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2), device_id=device
        )
    return DataParallel.current()


def check_same_code(dp: DataParallel, ext: dict) -> None:
    """Refuse a data-parallel run (torchrun) whose ranks run different code: srdit's code version and the code
    version of every plugin technique that is on (`srdit.provenance`) are gathered from every rank; ConfigError,
    one line on every rank, naming the first rank and code that differ from rank 0's. A collective: every rank
    calls it (a single process returns at once)."""
    if not dp.active:
        return
    from srdit.provenance import plugin_versions, srdit_code_version

    mine = {"srdit": srdit_code_version()}
    mine |= {f"plugin {name}": version for name, version in plugin_versions(ext).items()}
    every: list = [None] * dp.world
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        for what in sorted(set(theirs) | set(every[0])):
            if theirs.get(what) != every[0].get(what):
                raise ConfigError(
                    f"rank {rank} runs {what} code version {theirs.get(what)}, rank 0 {every[0].get(what)}: every "
                    f"rank must run the same code (the same srdit and plugin files on every node)"
                )
