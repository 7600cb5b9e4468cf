"""Batched LoRA for the runs a step's plan groups together (`run_plan.BatchedRuns`), on the CPU.

Two batched matmuls apply every grouped run's A and B at once, where a loop would pay a few small
ops per run per layer (on a CPU, at decode batch sizes, that per-op overhead dominates):

- runs that tile one block of rows with one length each (a decode step packed by slot whose
  adapters have equally many sequences) are viewed as ``[runs, width, in]`` as they lie: two ops,
  no copies;
- otherwise each run's rows are gathered into a zero-padded ``[runs, width, in]`` block and one
  index_add writes the results back. Padding rows are zero, so their (zero) results may safely be
  added to row 0.
"""

from __future__ import annotations

import torch

from .run_plan import BatchedRuns


def batched_add_lora(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, runs: BatchedRuns
) -> None:
    a = _slots_of(a_stack, runs)  # [R, r, in]
    b_t = _slots_of(b_stack.transpose(1, 2), runs)  # [R, r, out]: dense rows when B is stored rank-major
    count, width = len(runs.slots), runs.width
    if runs.rows is not None:
        v = torch.bmm(x[runs.rows].reshape(count, width, x.shape[1]).float(), a.float().transpose(1, 2))
        y_rows = y[runs.rows]
        if y.dtype == torch.float32 and y_rows.is_contiguous():  # updated in place through the view
            y_rows.view(count, width, y.shape[1]).baddbmm_(v, b_t.float())
        else:  # v and the update stay float32; y is rounded once
            y_rows.add_(torch.bmm(v, b_t.float()).view(count * width, -1).to(y.dtype))
        return
    rows = x.index_select(0, runs.token_index).float() * runs.valid
    v = torch.bmm(rows.view(count, width, -1), a.float().transpose(1, 2))
    update = torch.bmm(v, b_t.float()).view(count * width, -1)
    y.index_add_(0, runs.token_index, update.to(y.dtype))


def _slots_of(stack: torch.Tensor, runs: BatchedRuns) -> torch.Tensor:
    """The stack's entry for each run (a view when the runs hold slots 0..R-1 in order)."""
    if runs.slots == tuple(range(len(runs.slots))):
        return stack[: len(runs.slots)]
    return stack.index_select(0, runs.slot_index)
