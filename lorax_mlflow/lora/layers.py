"""MultiLoraLinear: one base GEMM over one or more fused projections plus stacked per-slot LoRA
factors, routed per token; LoraSlice: the face one original projection keeps inside the model."""

from __future__ import annotations

import torch
from torch import nn

from lorax_kernels import add_lora, lora_expand, lora_shrink
from lorax_kernels.skinny_linear import linear
from lorax_mlflow.lora.routing import current_routing


def uses_cpu_layout(device: torch.device) -> bool:
    """Whether LoRA factors on `device` use the CPU layout (block-diagonal rank-major B, one add_lora)."""
    return device.type == "cpu"


class MultiLoraLinear(nn.Module):
    """``y = x @ W.T + b`` over the concatenated weights of its slices (q/k/v, gate/up, or one
    projection), plus, for each token, each slice's ``(x @ A_s[slot].T) @ B_s[slot].T`` in that
    slice's columns, the slot read from the step routing.

    Factors are stacked per slot and zero-padded to ``max_rank``; scaling is folded into B.
    ``lora_a`` is ``[max_loras, max_rank, slices, in]``: a rank prefix of all slices is one dense
    ``[rank * slices, in]`` matrix per slot, so ONE shrink GEMM serves every slice.

    B depends on the device. On the CPU, ``lora_b_storage`` is ``[max_loras, max_rank, slices,
    out]``, block-diagonal (slice s's rows are zero outside its own columns): one expand GEMM then
    writes every slice, and the whole LoRA update is one `add_lora` (one GEMM pair per adapter, or
    five ops for the padded decode path), which is what CPU per-op costs reward; the zero blocks
    cost ``slices`` x the (small) expand FLOPs. Elsewhere it is ``[max_loras, out, max_rank]``
    with the rank dense, and the update is one multi-slice `lora_shrink` + one `lora_expand`, as
    the Triton kernels take them.
    """

    def __init__(self, bases: list[nn.Linear], max_loras: int, max_rank: int) -> None:
        super().__init__()
        first = bases[0]
        if any(b.in_features != first.in_features for b in bases):
            raise ValueError("fused projections must share their input")
        weight = torch.cat([b.weight.detach() for b in bases]) if len(bases) > 1 else first.weight.detach()
        self.weight = nn.Parameter(weight, requires_grad=False)
        if any(b.bias is not None for b in bases):
            bias = torch.cat([b.bias.detach() if b.bias is not None else weight.new_zeros(b.out_features) for b in bases])
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.bias = None
        self.in_features = first.in_features
        self.slice_widths = tuple(b.out_features for b in bases)
        self.slice_offsets = tuple(sum(self.slice_widths[:i]) for i in range(len(bases)))
        self.out_features = sum(self.slice_widths)
        num_slices = len(bases)
        self.register_buffer(
            "lora_a",
            torch.zeros(max_loras, max_rank, num_slices, self.in_features, dtype=weight.dtype, device=weight.device),
            persistent=False,
        )
        self._b_rank_major = uses_cpu_layout(weight.device)
        b_shape = (max_rank, num_slices, self.out_features) if self._b_rank_major else (self.out_features, max_rank)
        self.register_buffer(
            "lora_b_storage", torch.zeros(max_loras, *b_shape, dtype=weight.dtype, device=weight.device),
            persistent=False,
        )
        self._pending: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None

    @staticmethod
    def slot_elements(bases: list[nn.Linear], max_rank: int, device: torch.device) -> int:
        """Elements of A and B that one slot takes for these fused projections."""
        in_features, out_features = bases[0].in_features, sum(b.out_features for b in bases)
        b_rows = len(bases) if uses_cpu_layout(device) else 1  # the CPU layout's B is block-diagonal
        return max_rank * len(bases) * in_features + max_rank * b_rows * out_features

    @property
    def num_slices(self) -> int:
        return len(self.slice_widths)

    def write_slot(self, slot: int, index: int, a: torch.Tensor | None, b: torch.Tensor | None, previous_rank: int) -> None:
        """Write slice `index`'s factors (a ``[r, in]``, b ``[out_s, r]``) into `slot`, zeroing only what
        the previous occupant (of rank `previous_rank`) left beyond them; None clears the slice (the
        adapter does not target this projection). Invariant: ranks past the slot's rank are zero."""
        rank = 0 if a is None or b is None else a.shape[0]
        columns = slice(self.slice_offsets[index], self.slice_offsets[index] + self.slice_widths[index])
        if self._b_rank_major:
            b_view = self.lora_b_storage[slot, :, index, columns]  # [max_rank, out_s]
        else:
            b_view = self.lora_b_storage[slot, columns].T  # [max_rank, out_s]
        if rank:
            self.lora_a[slot, :rank, index].copy_(a)
            b_view[:rank].copy_(b.T)
        if previous_rank > rank:
            self.lora_a[slot, rank:previous_rank, index].zero_()
            b_view[rank:previous_rank].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        routing = current_routing()
        if routing is None:
            return y
        rank = routing.rank
        flat_x = x.reshape(-1, self.in_features)
        flat_y = y.view(-1, self.out_features)
        slots = self.lora_a.shape[0]
        a = self.lora_a[:, :rank]
        if self._b_rank_major:
            b = self.lora_b_storage[:, :rank].reshape(slots, rank * self.num_slices, self.out_features)
            add_lora(flat_y, flat_x, a.reshape(slots, rank * self.num_slices, self.in_features), b.transpose(1, 2),
                     routing.meta)
        elif self.num_slices == 1:
            add_lora(flat_y, flat_x, a[:, :, 0], self.lora_b_storage[:, :, :rank], routing.meta)
        else:
            v = lora_shrink(flat_x, [a[:, :, s] for s in range(self.num_slices)], routing.meta)
            b_slices = [self.lora_b_storage[:, off : off + width, :rank]
                        for off, width in zip(self.slice_offsets, self.slice_widths)]
            lora_expand(v, b_slices, routing.meta, flat_y)
        return y

    def slice_forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Slice `index` of ``forward(x)``. The fused GEMM runs once per input: transformers calls
        q_proj, k_proj and v_proj (gate_proj, up_proj) on the same tensor one after the other, so
        the first call computes every slice and the others take theirs from it."""
        if self._pending is None or self._pending[0] is not x or self._pending[1][index] is None:
            y = self.forward(x)
            self._pending = (x, list(y.split(self.slice_widths, dim=-1)))
        piece = self._pending[1][index]
        self._pending[1][index] = None
        if all(p is None for p in self._pending[1]):
            self._pending = None
        return piece


class LoraSlice(nn.Module):
    """Stands in for one original projection of a fused MultiLoraLinear (e.g. ``k_proj`` of qkv)."""

    def __init__(self, fused: MultiLoraLinear, index: int) -> None:
        super().__init__()
        self.fused = fused
        self.index = index
        self.in_features = fused.in_features
        self.out_features = fused.slice_widths[index]

    @property
    def device(self) -> torch.device:
        return self.fused.weight.device

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, previous_rank: int) -> None:
        self.fused.write_slot(slot, self.index, a, b, previous_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.slice_forward(x, self.index)
