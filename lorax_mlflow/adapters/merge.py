"""Per-request adapter merging with LoRAX's semantics.

Each strategy works per module on the adapters' factors, lora_A and lora_B merged separately:

- ``linear``: weighted sum.
- ``ties``: keep the top ``density`` fraction of each tensor by magnitude, elect a sign per entry
  (``total``: sign of the summed values; ``frequency``: the sign most tensors have; ties go to +),
  then average the weighted entries that agree with the elected sign (disjoint merge).
- ``dare_linear`` / ``dare_ties``: keep each entry with probability ``density`` and rescale the
  kept ones by ``1/density``, then merge as ``linear`` / ``ties``. The random masks come from a
  seeded generator, so the same recipe always gives the same adapter and can be cached by its key.

Each adapter's scaling already lives in its B, so adapters with different alphas merge with
their own scaling rather than the first adapter's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lorax_mlflow.lora.weights import LoraWeights
from lorax_mlflow.errors import AdapterValidationError, InvalidRequestError

MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")
_FIELDS = ("ids", "weights", "merge_strategy", "density", "majority_sign_method")


@dataclass(frozen=True)
class MergeSpec:
    """A merge recipe as requests give it (LoRAX's ``merged_adapters``)."""

    ids: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    merge_strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    @classmethod
    def from_dict(cls, d: Mapping) -> MergeSpec:
        """Validate a request's ``merged_adapters`` object; errors name ``merged_adapters.<field>``."""
        if not isinstance(d, Mapping):
            raise InvalidRequestError("merged_adapters must be an object", param="merged_adapters")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise InvalidRequestError(
                f"merged_adapters has unknown fields {unknown}; allowed: {list(_FIELDS)}",
                param=f"merged_adapters.{unknown[0]}",
            )
        ids = d.get("ids")
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise InvalidRequestError(
                "merged_adapters.ids must be a non-empty list of adapter ids", param="merged_adapters.ids"
            )
        weights = d.get("weights")
        if weights is not None:
            if not isinstance(weights, (list, tuple)) or not all(_is_finite_number(w) for w in weights):
                raise InvalidRequestError(
                    "merged_adapters.weights must be a list of numbers", param="merged_adapters.weights"
                )
            if len(weights) != len(ids):
                raise InvalidRequestError(
                    f"merged_adapters.weights has {len(weights)} entries for {len(ids)} ids",
                    param="merged_adapters.weights",
                )
            weights = tuple(float(w) for w in weights)
        strategy = d.get("merge_strategy", "linear")
        if strategy not in MERGE_STRATEGIES:
            raise InvalidRequestError(
                f"merged_adapters.merge_strategy must be one of {list(MERGE_STRATEGIES)}, got {strategy!r}",
                param="merged_adapters.merge_strategy",
            )
        density = d.get("density", 1.0)
        if not _is_finite_number(density) or not 0.0 < density <= 1.0:
            raise InvalidRequestError(
                f"merged_adapters.density must be a number in (0, 1], got {density!r}",
                param="merged_adapters.density",
            )
        sign_method = d.get("majority_sign_method", "total")
        if sign_method not in MAJORITY_SIGN_METHODS:
            raise InvalidRequestError(
                f"merged_adapters.majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)}, "
                f"got {sign_method!r}",
                param="merged_adapters.majority_sign_method",
            )
        return cls(tuple(ids), weights, strategy, float(density), sign_method)

    def effective_weights(self) -> tuple[float, ...]:
        """The weights applied: all 1.0 when none were given, as in LoRAX."""
        return self.weights if self.weights is not None else (1.0,) * len(self.ids)

    def recipe_key(self) -> str:
        """A stable key for the merged result; recipes that merge identically share it."""
        digest = hashlib.sha256(json.dumps(self.recipe(list(self.ids)), sort_keys=True).encode()).hexdigest()
        return f"merge-{digest[:16]}"

    def recipe(self, parts: list[str]) -> dict:
        """The recipe as data, naming its adapters by `parts` (ids, or content digests)."""
        recipe: dict = {"ids": parts, "weights": list(self.effective_weights()), "strategy": self.merge_strategy}
        if self.merge_strategy != "linear":
            recipe["density"] = self.density
        if self.merge_strategy.endswith("ties"):
            recipe["majority_sign_method"] = self.majority_sign_method
        return recipe


def merge_adapters(adapters: Sequence[LoraWeights], spec: MergeSpec, *, seed: int = 0) -> LoraWeights:
    """Merge `adapters` (in the order of ``spec.ids``) into one adapter named by the recipe key."""
    if len(adapters) != len(spec.ids):
        raise ValueError(f"merge of {len(spec.ids)} ids got {len(adapters)} adapters")
    _check_mergeable(adapters)
    weights = torch.tensor(spec.effective_weights(), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    merged_a: dict[str, torch.Tensor] = {}
    merged_b: dict[str, torch.Tensor] = {}
    for module in sorted(adapters[0].a):
        merged_a[module] = _merge_tensors([adapter.a[module] for adapter in adapters], weights, spec, generator)
        merged_b[module] = _merge_tensors([adapter.b[module] for adapter in adapters], weights, spec, generator)
    return LoraWeights(
        name=spec.recipe_key(),
        rank=adapters[0].rank,
        a=merged_a,
        b=merged_b,
        base_model_name=adapters[0].base_model_name,
        digest=_merged_digest(adapters, spec, seed),
    )


def _merged_digest(adapters: Sequence[LoraWeights], spec: MergeSpec, seed: int) -> str:
    """A merge is deterministic, so its recipe over its parts' content digests identifies the result."""
    recipe = {**spec.recipe([adapter.digest for adapter in adapters]), "seed": seed}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _merge_tensors(
    tensors: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec, generator: torch.Generator
) -> torch.Tensor:
    task = torch.stack([t.float() for t in tensors])
    weights = weights.to(task.device).view(-1, *([1] * (task.ndim - 1)))
    if spec.merge_strategy == "ties":
        task = torch.stack([_keep_largest(t, spec.density) for t in task])
    elif spec.merge_strategy.startswith("dare"):
        task = _drop_and_rescale(task, spec.density, generator)
    if spec.merge_strategy.endswith("linear"):
        return (task * weights).sum(dim=0).to(tensors[0].dtype)
    agrees = _majority_sign_mask(task, spec.majority_sign_method)
    kept = (task * weights * agrees).sum(dim=0)
    return (kept / agrees.sum(dim=0).clamp(min=1)).to(tensors[0].dtype)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries."""
    if density >= 1.0:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = True
    return tensor * mask.view_as(tensor)


def _drop_and_rescale(task: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density`, scaled by 1/density to preserve the expectation."""
    if density >= 1.0:
        return task
    keep = torch.rand(task.shape, generator=generator) < density
    return task * keep.to(task.device) / density


def _majority_sign_mask(task: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry: does this task tensor's sign agree with the elected sign (+ on a tie)?"""
    signs = task.sign()
    votes = task.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return signs == elected


def _check_mergeable(adapters: Sequence[LoraWeights]) -> None:
    first = adapters[0]
    for other in adapters[1:]:
        if other.a.keys() != first.a.keys():
            only_first = sorted(first.a.keys() - other.a.keys())
            only_other = sorted(other.a.keys() - first.a.keys())
            raise AdapterValidationError(
                f"cannot merge adapters {first.name!r} and {other.name!r}: they cover different modules "
                f"(only in {first.name!r}: {only_first[:3]}, only in {other.name!r}: {only_other[:3]})",
                param="merged_adapters.ids",
            )
        for module in first.a:
            if other.a[module].shape != first.a[module].shape or other.b[module].shape != first.b[module].shape:
                raise AdapterValidationError(
                    f"cannot merge adapters {first.name!r} and {other.name!r}: different ranks at {module} "
                    f"({first.a[module].shape[0]} vs {other.a[module].shape[0]}); merged adapters need the same rank",
                    param="merged_adapters.ids",
                )


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
