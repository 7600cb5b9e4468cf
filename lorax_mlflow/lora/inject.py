"""Swap a transformers model's target nn.Linear modules for MultiLoraLinear, in place, fusing the
projections that read the same input (q/k/v, gate/up) into one GEMM each.

A fused group replaces each original module by a LoraSlice of one MultiLoraLinear, so the model's
own code (``self.k_proj(hidden_states)``) runs unchanged and adapters keep addressing the original
module paths. A group fuses only when all its members are target linears of one parent module
with the same input size; otherwise each member is wrapped on its own.
"""

from __future__ import annotations

import logging

from torch import nn

from lorax_mlflow.lora.layers import LoraSlice, MultiLoraLinear

logger = logging.getLogger(__name__)

FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def inject_multi_lora(
    model: nn.Module, target_modules: tuple[str, ...], max_loras: int, max_rank: int, *, fuse: bool = True
) -> dict[str, LoraSlice]:
    """Wrap every nn.Linear whose short name is in `target_modules`; return, by original module path,
    the handle through which an adapter's factors for that module are written."""
    handles: dict[str, LoraSlice] = {}
    num_fused = 0
    for parent_name, group in _target_groups(model, target_modules, fuse):
        parent = model.get_submodule(parent_name)
        layer = MultiLoraLinear([linear for _, linear in group], max_loras, max_rank)
        for index, (child, _) in enumerate(group):
            handle = LoraSlice(layer, index)
            setattr(parent, child, handle if len(group) > 1 else layer)
            handles[f"{parent_name}.{child}"] = handle
        num_fused += len(group) > 1
    logger.info("multi-LoRA on %d modules, %d fused groups (%d slots, max rank %d)",
                len(handles), num_fused, max_loras, max_rank)
    return handles


def lora_slot_bytes(model: nn.Module, target_modules: tuple[str, ...], max_rank: int, *, fuse: bool = True) -> int:
    """Bytes one adapter slot takes in the layers `inject_multi_lora` would make (for sizing slots from memory)."""
    total = 0
    for _, group in _target_groups(model, target_modules, fuse):
        weight = group[0][1].weight
        total += MultiLoraLinear.slot_elements([linear for _, linear in group], max_rank, weight.device) * weight.element_size()
    return total


def _target_groups(
    model: nn.Module, target_modules: tuple[str, ...], fuse: bool
) -> list[tuple[str, list[tuple[str, nn.Linear]]]]:
    """(parent module path, [(child name, linear), ...]) for every fused group and every lone target."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    ]
    if not targets:
        raise ValueError(f"the model has no linear modules named {list(target_modules)}")
    by_parent: dict[str, dict[str, nn.Linear]] = {}
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, {})[child] = linear
    result = []
    for parent_name, children in by_parent.items():
        groups = [list(g) for g in FUSED_GROUPS if fuse and _fusable(children, g)]
        grouped = {child for g in groups for child in g}
        groups += [[child] for child in children if child not in grouped]
        result.extend((parent_name, [(child, children[child]) for child in group]) for group in groups)
    return result


def _fusable(children: dict[str, nn.Linear], group: tuple[str, ...]) -> bool:
    if not all(name in children for name in group):
        return False
    first = children[group[0]]
    return all(
        children[name].in_features == first.in_features
        and children[name].weight.dtype == first.weight.dtype
        and children[name].weight.device == first.weight.device
        for name in group
    )
