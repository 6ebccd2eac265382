"""The optimizers plrm's methods build: torch's Adam and AdamW, with the fused kernel for CPU parameters.

For CPU tensors torch's Adam defaults to its per-tensor ("for-loop") implementation: a step is a sequence of
elementwise ops (decay, two moment updates, the square root, the division, the update), each a full pass over
parameter-sized memory. The per-user tables of the baselines are exactly where that dominates (MPU's heads on the
PersonalLLM-sized world: 2,000 users x 4,096 x 16 = 131 M numbers, every one stepped on every batch). torch's
fused kernel (``fused=True``, on CPU since torch 2.4) does the same arithmetic in one pass;
``benchmarks/bench_optim.py`` measures it against the default in one run (``benchmarks/results/optim_cpu.md``).

CUDA parameters keep torch's own default (the multi-tensor ``foreach`` path). Fused is also off under mixed
precision: Lightning refuses gradient clipping with an optimizer that unscales gradients in its own step, which
the fused optimizers declare (``_step_supports_amp_scaling``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _tensors(params: Iterable) -> list[Tensor]:
    out = []
    for p in params:
        out.extend(p["params"] if isinstance(p, dict) else [p])
    return out


def fused_on_cpu(params: Iterable, mixed_precision: bool = False) -> bool:
    """Whether the fused kernel applies: every parameter a dense floating CPU tensor and no mixed precision."""
    tensors = _tensors(params)
    return (not mixed_precision and bool(tensors)
            and all(t.device.type == "cpu" and t.dtype in FUSED_CPU_DTYPES and not t.is_sparse for t in tensors))


def adam(params: Iterable, lr: float, weight_decay: float | None = None,
         mixed_precision: bool = False) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (``weight_decay`` None) or ``torch.optim.AdamW`` (decoupled decay, a float) over
    ``params`` (tensors or parameter groups), fused where :func:`fused_on_cpu` says so."""
    params = [{**p, "params": list(p["params"])} if isinstance(p, dict) else p for p in params]
    kwargs = {"fused": True} if fused_on_cpu(params, mixed_precision) else {}
    if weight_decay is None:
        return torch.optim.Adam(params, lr=lr, **kwargs)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
