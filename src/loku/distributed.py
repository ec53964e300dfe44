"""Work split across the processes of `accelerate launch` (or torchrun) and gathered back in order.

Everything here is a no-op in one process, so library code calls it unconditionally. Two kinds of work:
sums (Fisher statistics: each process takes every world-th batch, then the sums and token counts are
all-reduced) and per-item evaluation (each process scores every world-th item; the per-item results are
gathered and put back in item order on every process). Per-item evaluation is only split when every
process holds the whole model (DDP, multi-CPU): under FSDP or DeepSpeed a forward pass is collective, so
processes with different numbers of batches would wait on each other forever; there each process
evaluates everything, in step with the others.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sharded_engine() -> bool:
    """True under FSDP or DeepSpeed, where the weights are split and every forward pass is collective."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return True
    try:
        from accelerate.state import DistributedType, PartialState
    except ImportError:
        return False
    kind = PartialState._shared_state.get("distributed_type")
    return kind in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def split_evaluation() -> bool:
    """Whether per-item evaluation is divided among processes (several processes, each with all weights)."""
    return rank_world()[1] > 1 and not sharded_engine()


def sum_over_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """In-place sum of each tensor over all processes (NCCL only reduces GPU tensors: CPU ones go through
    the current GPU and back)."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return
    gpu_only = dist.get_backend() == "nccl"
    for t in tensors:
        if gpu_only and t.device.type == "cpu":
            tmp = t.cuda()
            dist.all_reduce(tmp)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t)


def map_items(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """fn(items) -> one result per item, with the items divided among processes when `split_evaluation()`
    (process r takes items r, r + world, ...) and every process getting all results in item order.
    Results must be picklable (floats, strings, dicts of them)."""
    items = list(items)
    if not split_evaluation():
        return fn(items)
    import torch.distributed as dist

    rank, world = rank_world()
    mine = fn(items[rank::world])
    if len(mine) != len(items[rank::world]):
        raise RuntimeError(f"map_items: {fn!r} returned {len(mine)} results for {len(items[rank::world])} items")
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    out: list = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def launched() -> bool:
    """Started by `accelerate launch` / torchrun with more than one process (their WORLD_SIZE variable)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join_launch() -> None:
    """Join the process group that `accelerate launch` prepared, before any model runs: then evaluation
    before unlearning is split across processes too (`unlearn` would start it only later)."""
    if launched():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait until every process gets here (no-op in one process)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()
