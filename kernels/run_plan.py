"""Which runs of a step's rows the torch (CPU) path gives their own GEMM pair, and which it batches.

A step's rows with an adapter form runs: consecutive rows of one slot (`LoraBatchMeta.runs`). A
decode step packed by slot is many short runs (an adapter's sequences, one row each); a prefill
chunk is one long run. On a CPU each small torch op costs about as much as a couple of million
multiply-adds, so short runs pay for being batched together (one bmm pair over a zero-padded
``[runs, width, in]`` block), while a long run batched with short ones would pad every short run to
its length. The plan minimises ops x `MACS_PER_OP` + wasted multiply-adds: the longest runs go
alone (slices of x and y, three ops each), the rest share one batched pair. When the batched runs
tile one block of rows with one length each (decodes with equally many sequences per adapter),
the block is a view and nothing is padded or gathered.

Before runs, the path batched by slot: a prefill chunk of adapter A next to decodes of adapter A
made one non-contiguous segment, so a 76-row mixed step padded 8 segments to the chunk's length
(496 rows) in every LoRA layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .meta import LoraBatchMeta

# Multiply-adds a CPU core does in the time of one small torch op (dispatch + launch), roughly.
MACS_PER_OP = 2_000_000
_SINGLE_OPS = 3  # x @ A.T, @ B.T, add into y
_VIEW_BATCH_OPS = 2  # bmm, baddbmm_ on views
_PADDED_BATCH_OPS = 5  # gather, zero padding, bmm, bmm, index_add


@dataclass(frozen=True)
class BatchedRuns:
    """Runs applied together: run i is batch entry i, `width` rows, padded with zero rows if shorter.

    slots        the slot of each run, in row order (a slot may repeat)
    rows         when the runs tile rows [start, stop) with one length each: that slice (no padding)
    token_index  otherwise int64 [runs * width]: run i's rows at i * width + j, padding pointing at row 0
    valid        float32 [runs * width, 1]: 1 for real rows, 0 for padding (zeroes the padding's input)
    """

    slots: tuple[int, ...]
    slot_index: torch.Tensor
    width: int
    rows: slice | None
    token_index: torch.Tensor | None
    valid: torch.Tensor | None


@dataclass(frozen=True)
class RunPlan:
    singles: tuple[tuple[int, int, int], ...]  # (first row, stop row, slot)
    batched: BatchedRuns | None


def plan_runs(meta: LoraBatchMeta, rank: int, in_features: int, out_features: int) -> RunPlan:
    """The cheapest plan for one layer shape; computed once per step and shape (cached on the meta)."""
    key = (rank, in_features, out_features)
    plan = meta.cpu_plans.get(key)
    if plan is None:
        plan = meta.cpu_plans[key] = _cheapest_plan(meta, rank * (in_features + out_features))
    return plan


def _cheapest_plan(meta: LoraBatchMeta, macs_per_row: int) -> RunPlan:
    runs = meta.runs
    if meta.device.type != "cpu" or len(runs) < 2:
        return _plan(runs, alone=set(range(len(runs))), device=meta.device)
    longest_first = sorted(range(len(runs)), key=lambda i: -runs[i][1])
    counts = [runs[i][1] for i in longest_first]
    suffix_rows = [0] * (len(counts) + 1)
    for i in range(len(counts) - 1, -1, -1):
        suffix_rows[i] = suffix_rows[i + 1] + counts[i]
    best_cost, best_k = len(runs) * _SINGLE_OPS * MACS_PER_OP, len(runs)  # every run alone
    for k in range(len(runs) - 1):  # the k longest alone, the other >= 2 runs batched
        rest, width = len(runs) - k, counts[k]
        waste = rest * width - suffix_rows[k]
        batch_ops = _VIEW_BATCH_OPS if waste == 0 and _tile_one_block(runs, longest_first[k:]) else _PADDED_BATCH_OPS
        cost = (k * _SINGLE_OPS + batch_ops) * MACS_PER_OP + waste * macs_per_row
        if cost < best_cost:
            best_cost, best_k = cost, k
        if waste == 0:  # no padding left to save: taking more runs out only adds ops
            break
    return _plan(runs, alone=set(longest_first[:best_k]), device=meta.device)


def _plan(runs: tuple[tuple[int, int, int], ...], alone: set[int], device: torch.device) -> RunPlan:
    singles = tuple((runs[i][0], runs[i][0] + runs[i][1], runs[i][2]) for i in sorted(alone))
    grouped = [run for i, run in enumerate(runs) if i not in alone]
    return RunPlan(singles=singles, batched=_batched(grouped, device) if grouped else None)


def _tile_one_block(runs: tuple[tuple[int, int, int], ...], members: list[int]) -> bool:
    ordered = sorted(members)
    return all(runs[a][0] + runs[a][1] == runs[b][0] for a, b in zip(ordered, ordered[1:]))


def _batched(grouped: list[tuple[int, int, int]], device: torch.device) -> BatchedRuns:
    width = max(count for _, count, _ in grouped)
    slots = tuple(slot for _, _, slot in grouped)
    slot_index = torch.tensor(slots, dtype=torch.int64, device=device)
    first, stop = grouped[0][0], grouped[-1][0] + grouped[-1][1]
    if all(count == width for _, count, _ in grouped) and stop - first == width * len(grouped):
        return BatchedRuns(slots, slot_index, width, slice(first, stop), None, None)
    token_index = torch.zeros(len(grouped), width, dtype=torch.int64)
    valid = torch.zeros(len(grouped), width, 1, dtype=torch.float32)
    for i, (start, count, _) in enumerate(grouped):
        token_index[i, :count] = torch.arange(start, start + count)
        valid[i, :count] = 1.0
    return BatchedRuns(slots, slot_index, width, None, token_index.view(-1).to(device), valid.view(-1, 1).to(device))
