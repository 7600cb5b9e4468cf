"""In-memory form of one adapter (LoRA factors and/or Medusa heads), independent of where it came from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class MedusaHeads:
    """Medusa speculative heads (LoRAX's format): head ``k`` drafts the token ``k + 2`` places ahead.

    Head ``k`` maps the base model's last hidden state ``x`` through ``num_layers`` residual
    blocks, ``x = x + silu(x @ linear_w[k, l].T + linear_b[k, l])``, then through its own output
    projection ``out_w[k]`` or, when `out_w` is None, the base model's lm_head (LoRAX's v2 heads).
    """

    num_layers: int
    linear_w: torch.Tensor
    """[num_heads, num_layers, hidden, hidden]"""
    linear_b: torch.Tensor
    """[num_heads, num_layers, hidden]"""
    out_w: torch.Tensor | None = None
    """[num_heads, vocab, hidden], or None to share the base model's lm_head."""

    @property
    def num_heads(self) -> int:
        return self.linear_w.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [self.linear_w, self.linear_b] + ([self.out_w] if self.out_w is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> "MedusaHeads":
        out_w = None if self.out_w is None else self.out_w.to(device)
        return MedusaHeads(self.num_layers, self.linear_w.to(device), self.linear_b.to(device), out_w)


@dataclass
class LoraWeights:
    """One adapter's low-rank factors, keyed by the base model's module path, and its Medusa heads if any.

    A Medusa-only adapter has no factors (rank 0); a LoRA+Medusa folder carries both.

    Keys are module paths of the base model, e.g. ``model.layers.0.self_attn.q_proj``.
    ``a[key]`` is ``[r, in_features]``; ``b[key]`` is ``[out_features, r]`` with the adapter's
    scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) already folded in, so every consumer computes
    ``y += x @ a.T @ b.T``.
    """

    name: str
    rank: int
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    base_model_name: str | None = None
    source_dir: Path | None = None
    """The adapter folder, when it has one (its tokenizer/chat template may be used)."""
    medusa: MedusaHeads | None = None
    digest: str = ""
    """What the adapter computes, for the KV prefix cache: by default a digest of its factors
    (scaling included, as it is folded into B), so the same weights under two names share cached
    K/V and new weights under an old name do not. Medusa heads only draft tokens and never change
    K/V, so they are not part of it. A merged adapter passes its recipe's digest."""
    target_modules: set[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.a.keys() != self.b.keys():
            raise ValueError(f"adapter {self.name!r}: lora_A and lora_B cover different modules")
        self.target_modules = {key.rsplit(".", 1)[-1] for key in self.a}
        if not self.digest:
            self.digest = content_digest(self.a, self.b)

    @property
    def nbytes(self) -> int:
        lora = sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])
        return lora + (self.medusa.nbytes if self.medusa is not None else 0)


def content_digest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """sha256 over every module's name, factor shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for module in sorted(a):
        for factor in (a[module], b[module]):
            tensor = factor.detach().contiguous().cpu()
            digest.update(f"{module}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
