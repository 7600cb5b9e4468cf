"""Swap a transformers model's target nn.Linear modules for MultiLoraLinear, in place."""

from __future__ import annotations

import logging

from torch import nn

from lorax_mlflow.lora.layers import MultiLoraLinear

logger = logging.getLogger(__name__)


def inject_multi_lora(
    model: nn.Module, target_modules: tuple[str, ...], max_loras: int, max_rank: int
) -> dict[str, MultiLoraLinear]:
    """Replace every nn.Linear whose short name is in `target_modules`; return them by module path."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    ]
    if not targets:
        raise ValueError(f"the model has no linear modules named {list(target_modules)}")
    layers: dict[str, MultiLoraLinear] = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        wrapped = MultiLoraLinear(linear, max_loras, max_rank)
        setattr(model.get_submodule(parent_name), child, wrapped)
        layers[name] = wrapped
    logger.info("multi-LoRA on %d modules (%d slots, max rank %d)", len(layers), max_loras, max_rank)
    return layers
