"""In-memory form of one LoRA adapter, independent of where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LoraWeights:
    """One adapter's low-rank factors, keyed by the base model's module path.

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
    target_modules: set[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.a.keys() != self.b.keys():
            raise ValueError(f"adapter {self.name!r}: lora_A and lora_B cover different modules")
        self.target_modules = {key.rsplit(".", 1)[-1] for key in self.a}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])
