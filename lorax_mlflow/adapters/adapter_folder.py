"""What an adapter folder holds: PEFT LoRA factors, LoRAX Medusa heads, or both (LoRAX's Medusa-LoRA)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lorax_mlflow.adapters.confined import ConfinedFolder
from lorax_mlflow.errors import LoraxError
from lorax_mlflow.adapters.medusa_format import is_medusa_key, load_medusa_heads, read_medusa_config
from lorax_mlflow.adapters.peft_format import CONFIG_FILE, load_peft_adapter
from lorax_mlflow.lora.weights import LoraWeights
from lorax_mlflow.errors import AdapterValidationError


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: the LoRA-able modules, and the hidden size and vocabulary Medusa heads read."""

    modules: Mapping[str, tuple[int, int]]
    """module path -> (in_features, out_features) of each LoRA-able Linear."""
    hidden_size: int | None = None
    vocab_size: int | None = None
    """None when the engine serves no Medusa heads."""


def load_adapter_folder(
    folder: Path,
    name: str,
    base: BaseModelShape,
    *,
    max_rank: int,
    target_modules: Collection[str],
    dtype: torch.dtype = torch.float32,
    root: Path | None = None,
) -> LoraWeights:
    """The adapter in `folder`: its LoRA factors (none for a Medusa-only adapter) and Medusa heads (if any).

    Nothing is opened unless every entry of the folder resolves under `root` (default: the folder).
    """
    folder = Path(folder)
    try:
        ConfinedFolder(folder, root).check_entries()
    except LoraxError as error:
        raise AdapterValidationError(f"adapter {name!r}: {error.message}", param=error.param) from error
    medusa_config = read_medusa_config(folder, name)
    has_lora = (folder / CONFIG_FILE).is_file()
    if medusa_config is None and not has_lora:
        raise AdapterValidationError(
            f"adapter {name!r}: no {CONFIG_FILE} (LoRA) or config.json with medusa_num_heads (Medusa) in {folder}"
        )
    if medusa_config is None:
        return load_peft_adapter(
            folder, name, base.modules, max_rank=max_rank, target_modules=target_modules, dtype=dtype, root=root
        )
    if base.hidden_size is None or base.vocab_size is None:
        raise AdapterValidationError(f"adapter {name!r} carries Medusa heads, which this engine does not serve")
    medusa = load_medusa_heads(
        folder, name, medusa_config, hidden_size=base.hidden_size, vocab_size=base.vocab_size, dtype=dtype
    )
    if not has_lora:
        return LoraWeights(
            name=name, rank=0, a={}, b={}, base_model_name=medusa_config.get("base_model_name_or_path"),
            source_dir=folder, medusa=medusa,
        )
    weights = load_peft_adapter(
        folder, name, base.modules, max_rank=max_rank, target_modules=target_modules, dtype=dtype,
        other_reader_keys=is_medusa_key, root=root,
    )
    weights.medusa = medusa
    return weights

