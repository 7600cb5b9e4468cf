"""Linear layers for decode-sized batches on multi-core CPUs: ``y = (W @ x.T).T``.

``F.linear(x, W)`` with a few rows of x (a decode step: one row per sequence) hands MKL a GEMM
whose M is those few rows; its threads then split a tiny M, and on a 2-core AVX2 EPYC the step's
GEMMs ran only 1.2x faster on 2 threads than on 1. The same product computed as ``W @ x.T`` gives
the GEMM the weight's many rows as M, which the threads split well: measured 1.5-1.6x from 1 to 2
threads, and 18-20% less GEMM time per SmolLM2 decode step at 2 threads (lm_head included). On one
thread the two orders cost the same (within 5%), and past about 64 rows plain ``F.linear`` is as
fast, so this path is taken only for CPU inputs of at most ``SKINNY_MAX_ROWS`` rows while torch
runs more than one thread. The result is made contiguous again (a [rows, out] copy, microseconds),
so callers see the layout ``F.linear`` returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKINNY_MAX_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``(weight @ x.T).T`` for skinny CPU inputs on several threads."""
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    if x.device.type != "cpu" or not 0 < rows <= SKINNY_MAX_ROWS or torch.get_num_threads() < 2:
        return F.linear(x, weight, bias)
    columns = x.reshape(rows, in_features).t()
    y = torch.mm(weight, columns) if bias is None else torch.addmm(bias.unsqueeze(1), weight, columns)
    return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class SkinnyLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear`; built around an existing layer's parameters
    (shared, not copied: tied embeddings stay tied)."""

    @classmethod
    def wrapping(cls, layer: nn.Linear) -> "SkinnyLinear":
        skinny = cls.__new__(cls)
        nn.Module.__init__(skinny)
        skinny.in_features, skinny.out_features = layer.in_features, layer.out_features
        skinny.weight = layer.weight
        skinny.bias = layer.bias
        return skinny

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_skinny_linears(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` of `model` (lm_head included) for a :class:`SkinnyLinear` sharing
    its parameters; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, SkinnyLinear.wrapping(child))
                swapped += 1
    return swapped
