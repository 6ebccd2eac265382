"""Distributed helpers: which process holds which part of a global batch, and putting the parts back together.

Used by the datamodule (each rank keeps its shard of every global batch), the methods' distributed steps and the
evaluation protocol (each rank scores a shard of the rows, the logits are gathered back in row order). In one
process (no ``torch.distributed`` process group) every helper is the identity.
"""

from __future__ import annotations

import torch


def to_device(x, device):
    """A tensor, a backbone's token dict or a whole batch dict, moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return {k: to_device(v, device) for k, v in x.items()}


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of the initialized ``torch.distributed`` process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of n positions: the first n % world ranks hold one position more."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def concat_shards(padded: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Reassemble what :func:`gather_shards` collected: rank r's first sizes[r] entries, in rank order."""
    return torch.cat([p[:n] for p, n in zip(padded, sizes)])


def gather_shards(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``local`` (N_r, ...) in rank order, on every rank (N_r may differ); ``local``
    itself without a process group. Collective: every rank must call it. No gradient flows through it."""
    world = rank_and_world()[1]
    if world == 1:
        return local
    dist = torch.distributed
    # gloo reduces CPU tensors, nccl CUDA tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:
        return local
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return concat_shards(parts, sizes).to(local.device)
