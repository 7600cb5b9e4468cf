"""Per-step token grouping shared by every LoRA layer of one forward pass.

The engine builds one `LoraBatchMeta` per step from the token -> slot map; every layer then reads
the same grouping. All index work (and the only host/device synchronisation) happens here, once:
tokens with an adapter are stably sorted by slot (so requests need not be contiguous in the batch),
and each non-empty slot becomes a *segment* (slot id, start into the sorted indices, token count).
The device tensors feed the Triton kernels; the host tuples let the torch path and the kernel
launch grids run without ever reading a device tensor back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraBatchMeta:
    """Tokens of one step grouped by adapter slot.

    Device tensors (on the device given to `make_lora_meta`):
      sorted_token_indices  int64 [N]  indices of tokens that have an adapter, grouped by slot,
                                       ascending within a slot (stable sort)
      segment_slots         int32 [G]  slot of each non-empty segment, ascending
      segment_starts        int32 [G]  where each segment begins in sorted_token_indices
      segment_counts        int32 [G]  number of tokens in each segment
    Host copies (python ints) of the same segment table, plus:
      segment_first_tokens  first token index of each segment when its tokens form one contiguous
                            run of the batch (the usual case: one request = one run), else -1;
                            lets the torch path use plain slices instead of gather/scatter.
    segment_tokens          per segment, its token indices (views of sorted_token_indices), made
                            once here so layers do not re-slice them.
    padded_token_index      int64 [G * max_segment_tokens]: segment g's tokens at rows
                            g * max_segment_tokens + i, padding rows pointing at token 0
    padded_valid            float32 [G * max_segment_tokens, 1]: 1 for real rows, 0 for padding
                            (the padded CPU path zeroes padding rows with it, so adding their
                            all-zero results to token 0 changes nothing)
    """

    num_tokens: int
    num_slots: int
    sorted_token_indices: torch.Tensor
    segment_slots: torch.Tensor
    segment_starts: torch.Tensor
    segment_counts: torch.Tensor
    segment_slots_host: tuple[int, ...]
    segment_starts_host: tuple[int, ...]
    segment_counts_host: tuple[int, ...]
    segment_first_tokens: tuple[int, ...]
    segment_tokens: tuple[torch.Tensor, ...]
    padded_token_index: torch.Tensor
    padded_valid: torch.Tensor

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
    token_lora: torch.Tensor, num_slots: int, *, device: torch.device | str | None = None
) -> LoraBatchMeta | None:
    """Group the tokens of one step by adapter slot.

    token_lora: int [T], the slot of each token in [0, num_slots), or -1 for "no adapter".
    device: where the index tensors live (default: token_lora's device); pass the model's device
      when token_lora was built on the host.
    Returns None when no token has an adapter, so layers can skip LoRA entirely.
    Reads token_lora back to the host once (one sync per step, never per layer).
    """
    if token_lora.dim() != 1:
        raise ValueError(f"token_lora must be 1-D [num_tokens], got shape {tuple(token_lora.shape)}")
    if token_lora.dtype.is_floating_point or token_lora.dtype == torch.bool:
        raise ValueError(f"token_lora must be an integer tensor, got {token_lora.dtype}")
    target_device = torch.device(device) if device is not None else token_lora.device
    slots = token_lora.to("cpu", torch.int64)
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

    starts_host = tuple(segment_starts.tolist())
    counts_host = tuple(segment_counts.tolist())
    first_tokens = tuple(
        _first_token_if_contiguous(sorted_tokens[start : start + count]) for start, count in zip(starts_host, counts_host)
    )
    device_sorted_tokens = sorted_tokens.to(target_device)
    return LoraBatchMeta(
        num_tokens=slots.numel(),
        num_slots=num_slots,
        sorted_token_indices=device_sorted_tokens,
        segment_slots=segment_slots.to(target_device, torch.int32),
        segment_starts=segment_starts.to(target_device, torch.int32),
        segment_counts=segment_counts.to(target_device, torch.int32),
        segment_slots_host=tuple(segment_slots.tolist()),
        segment_starts_host=starts_host,
        segment_counts_host=counts_host,
        segment_first_tokens=first_tokens,
        segment_tokens=tuple(
            device_sorted_tokens[start : start + count] for start, count in zip(starts_host, counts_host)
        ),
        **_padded_layout(sorted_tokens, starts_host, counts_host, target_device),
    )


def _padded_layout(
    sorted_tokens: torch.Tensor, starts: tuple[int, ...], counts: tuple[int, ...], device: torch.device
) -> dict[str, torch.Tensor]:
    width = max(counts)
    index = torch.zeros(len(counts), width, dtype=torch.int64)
    valid = torch.zeros(len(counts), width, dtype=torch.float32)
    for segment, (start, count) in enumerate(zip(starts, counts)):
        index[segment, :count] = sorted_tokens[start : start + count]
        valid[segment, :count] = 1.0
    return {"padded_token_index": index.view(-1).to(device), "padded_valid": valid.view(-1, 1).to(device)}


def _first_token_if_contiguous(tokens: torch.Tensor) -> int:
    """Ascending token indices form one run iff last - first + 1 == count."""
    first, last = int(tokens[0]), int(tokens[-1])
    return first if last - first + 1 == tokens.numel() else -1
