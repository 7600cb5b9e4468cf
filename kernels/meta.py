"""Per-step token grouping shared by every LoRA layer of one forward pass.

The engine builds one `LoraBatchMeta` per step from the token -> slot map; every layer then reads
the same grouping. All index work happens here, once, on the host: tokens with an adapter are
stably sorted by slot (so requests need not be contiguous in the batch), and each non-empty slot
becomes a *segment* (slot id, start into the sorted indices, token count). Every index tensor the
kernels read is packed into one host buffer and copied to the device in ONE transfer; nothing is
ever read back, so building the meta never waits for the device. The host tuples let the torch
path and the kernel launch grids run without reading a device tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraBatchMeta:
    """Tokens of one step grouped by adapter slot.

    Device tensors (on the device given to `make_lora_meta`), int64 views of one buffer:
      sorted_token_indices  [N]  indices of tokens that have an adapter, grouped by slot,
                                 ascending within a slot (stable sort)
      segment_slots         [G]  slot of each non-empty segment, ascending
      segment_starts        [G]  where each segment begins in sorted_token_indices
      segment_counts        [G]  number of tokens in each segment
      token_positions       [T]  each token's position in sorted_token_indices, -1 without adapter
    Host copies (python ints) of the same segment table, plus:
      segment_first_tokens  first token index of each segment when its tokens form one contiguous
                            run of the batch (the usual case: one request = one run), else -1;
                            lets the torch path use plain slices instead of gather/scatter.
    segment_tokens          per segment, its token indices (views of sorted_token_indices), made
                            once here so layers do not re-slice them.
    runs                    the batch's maximal runs of consecutive rows with one slot, in row order,
                            as (first row, row count, slot): the units of the CPU path, which
                            plans per layer shape which runs get their own GEMM pair and which
                            run together in one batched pair (`run_plan.plan_runs`, cached in
                            `cpu_plans`).
    """

    num_tokens: int
    num_slots: int
    sorted_token_indices: torch.Tensor
    segment_slots: torch.Tensor
    segment_starts: torch.Tensor
    segment_counts: torch.Tensor
    token_positions: torch.Tensor
    segment_slots_host: tuple[int, ...]
    segment_starts_host: tuple[int, ...]
    segment_counts_host: tuple[int, ...]
    segment_first_tokens: tuple[int, ...]
    segment_tokens: tuple[torch.Tensor, ...]
    runs: tuple[tuple[int, int, int], ...]
    cpu_plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_segments(self) -> int:
        return len(self.segment_slots_host)

    @property
    def max_segment_tokens(self) -> int:
        return max(self.segment_counts_host)

    @property
    def device(self) -> torch.device:
        return self.sorted_token_indices.device


def make_lora_meta(
    token_lora: torch.Tensor | Sequence[int], num_slots: int, *, device: torch.device | str | None = None
) -> LoraBatchMeta | None:
    """Group the tokens of one step by adapter slot.

    token_lora: the slot of each token in [0, num_slots), or -1 for "no adapter": a 1-D integer
      tensor or a list of ints. The engine passes the host-side list it built the step from, so
      the map is never copied to the device and back.
    device: where the index tensors live (default: token_lora's device, CPU for a list).
    Returns None when no token has an adapter, so layers can skip LoRA entirely.
    A token_lora already on an accelerator is read back once (a sync): fine for tests, not for steps.
    """
    if isinstance(token_lora, torch.Tensor):
        if token_lora.dim() != 1:
            raise ValueError(f"token_lora must be 1-D [num_tokens], got shape {tuple(token_lora.shape)}")
        if token_lora.dtype.is_floating_point or token_lora.dtype == torch.bool:
            raise ValueError(f"token_lora must be an integer tensor, got {token_lora.dtype}")
        target_device = torch.device(device) if device is not None else token_lora.device
        slots = token_lora.to("cpu", torch.int64)
    else:
        target_device = torch.device(device) if device is not None else torch.device("cpu")
        slots = torch.tensor(token_lora, dtype=torch.int64)
        if slots.dim() != 1:
            raise ValueError(f"token_lora must be a flat list of slots, got shape {tuple(slots.shape)}")
    if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= num_slots):
        raise ValueError(f"token_lora values must be in [-1, {num_slots}), got [{int(slots.min())}, {int(slots.max())}]")

    with_adapter = torch.nonzero(slots >= 0).flatten()
    if with_adapter.numel() == 0:
        return None
    adapter_slots = slots[with_adapter]
    sorted_tokens = with_adapter[torch.argsort(adapter_slots, stable=True)]
    counts_per_slot = torch.bincount(adapter_slots, minlength=num_slots)
    segment_slots = torch.nonzero(counts_per_slot).flatten()
    segment_counts = counts_per_slot[segment_slots]
    segment_starts = torch.cumsum(segment_counts, 0) - segment_counts
    token_positions = torch.full_like(slots, -1)
    token_positions[sorted_tokens] = torch.arange(sorted_tokens.numel())

    starts_host = tuple(segment_starts.tolist())
    counts_host = tuple(segment_counts.tolist())
    first_tokens = tuple(
        _first_token_if_contiguous(sorted_tokens[start : start + count]) for start, count in zip(starts_host, counts_host)
    )
    parts = [sorted_tokens, segment_slots, segment_starts, segment_counts, token_positions]
    views = _to_device_in_one_copy(parts, target_device)
    device_sorted_tokens = views[0]
    return LoraBatchMeta(
        num_tokens=slots.numel(),
        num_slots=num_slots,
        sorted_token_indices=device_sorted_tokens,
        segment_slots=views[1],
        segment_starts=views[2],
        segment_counts=views[3],
        token_positions=views[4],
        segment_slots_host=tuple(segment_slots.tolist()),
        segment_starts_host=starts_host,
        segment_counts_host=counts_host,
        segment_first_tokens=first_tokens,
        segment_tokens=tuple(
            device_sorted_tokens[start : start + count] for start, count in zip(starts_host, counts_host)
        ),
        runs=_runs(slots.tolist()),
    )


def _to_device_in_one_copy(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Concatenate the int64 host tensors, copy them with one (asynchronous, from pinned memory on
    CUDA) host-to-device transfer, and return device views of each part."""
    sizes = [part.numel() for part in parts]
    packed = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=device.type == "cuda")
    torch.cat(parts, out=packed)
    on_device = packed.to(device, non_blocking=True) if device.type != "cpu" else packed
    return list(torch.split(on_device, sizes))


def _runs(slots: list[int]) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs of consecutive rows with one adapter slot, rows without an adapter left out."""
    runs = []
    start = 0
    for row in range(1, len(slots) + 1):
        if row == len(slots) or slots[row] != slots[start]:
            if slots[start] >= 0:
                runs.append((start, row - start, slots[start]))
            start = row
    return tuple(runs)


def _first_token_if_contiguous(tokens: torch.Tensor) -> int:
    """Ascending token indices form one run iff last - first + 1 == count."""
    first, last = int(tokens[0]), int(tokens[-1])
    return first if last - first + 1 == tokens.numel() else -1
