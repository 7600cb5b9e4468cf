"""Read a PEFT LoRA adapter folder into `LoraWeights`, validated against the base model.

Everything that makes an adapter unusable with this base model or this LoRA-only engine is an
`AdapterValidationError` naming the adapter and the cause, so a bad adapter fails its own request
and never the engine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from lorax_mlflow.adapters.weights import LoraWeights
from lorax_mlflow.errors import AdapterValidationError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# `<module path>.lora_A.weight` or, with an adapter name segment, `<module path>.lora_B.default.weight`.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."

# Adapter-config features whose forward pass is more than `x @ A.T @ B.T`: serving them with a
# LoRA-only engine would silently give different outputs, so they are refused.
_UNSERVABLE_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


def load_peft_adapter(
    folder: Path,
    name: str,
    base_modules: Mapping[str, tuple[int, int]],
    *,
    max_rank: int,
    target_modules: Collection[str],
    dtype: torch.dtype = torch.float32,
    other_reader_keys: Callable[[str], bool] | None = None,
) -> LoraWeights:
    """Load the PEFT adapter in `folder` with its scaling folded into B.

    `base_modules` maps each LoRA-able Linear of the base model (e.g.
    ``model.layers.0.self_attn.q_proj``) to its ``(in_features, out_features)``;
    `target_modules` are the short module names the engine can serve. Tensors for which
    `other_reader_keys` is true belong to another reader (Medusa heads saved beside the factors).
    """
    folder = Path(folder)
    config = _read_config(folder, name)
    tensors = _read_tensors(folder, name)
    if other_reader_keys is not None:
        tensors = {key: tensor for key, tensor in tensors.items() if not other_reader_keys(key)}
    factors = _group_factors(tensors, name)

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))

    a_by_module: dict[str, torch.Tensor] = {}
    b_by_module: dict[str, torch.Tensor] = {}
    for module, (lora_a, lora_b) in sorted(factors.items()):
        _check_module(name, module, lora_a, lora_b, base_modules, target_modules, max_rank)
        rank = int(rank_pattern.get(_pattern_key(rank_pattern, module), r_default))
        alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, module), alpha_default))
        if lora_a.shape[0] != rank:
            raise AdapterValidationError(
                f"adapter {name!r}: {module} has rank {lora_a.shape[0]} but adapter_config.json says r={rank}"
            )
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        a_by_module[module] = lora_a.to(torch.float32).to(dtype).contiguous()
        # In place: the tensors were just read from the file and are ours (no extra copy per module).
        b_by_module[module] = lora_b.to(torch.float32).mul_(scaling).to(dtype).contiguous()

    return LoraWeights(
        name=name,
        rank=max(a.shape[0] for a in a_by_module.values()),
        a=a_by_module,
        b=b_by_module,
        base_model_name=config.get("base_model_name_or_path"),
        source_dir=folder,
    )


def _read_config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError(f"adapter {name!r}: no {CONFIG_FILE} in {folder}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterValidationError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterValidationError(
            f"adapter {name!r}: peft_type is {peft_type!r}; only LORA adapters can be served"
        )
    for field, feature in _UNSERVABLE_FEATURES.items():
        if config.get(field):
            raise AdapterValidationError(
                f"adapter {name!r} uses {feature}, which a LoRA-only engine cannot serve"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterValidationError(
            f"adapter {name!r} trains biases (bias={bias!r}), which a LoRA-only engine cannot serve"
        )
    return config


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    safetensors_path = folder / SAFETENSORS_FILE
    pickle_path = folder / PICKLE_FILE
    try:
        if safetensors_path.is_file():
            from safetensors.torch import load_file

            tensors = load_file(safetensors_path, device="cpu")
        elif pickle_path.is_file():
            tensors = torch.load(pickle_path, weights_only=True, map_location="cpu")
        else:
            raise AdapterValidationError(f"adapter {name!r}: no {SAFETENSORS_FILE} or {PICKLE_FILE} in {folder}")
    except AdapterValidationError:
        raise
    except Exception as exc:  # safetensors, pickle and zip readers each raise their own types
        raise AdapterValidationError(
            f"adapter {name!r}: could not read its weights in {folder} (corrupt or truncated file?): {exc}"
        ) from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterValidationError(f"adapter {name!r}: weights file does not hold a name -> tensor mapping")
    return tensors


def _group_factors(
    tensors: Mapping[str, torch.Tensor], name: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pair each module's lora_A and lora_B, keyed by the module's path in the base model."""
    a_by_module: dict[str, torch.Tensor] = {}
    b_by_module: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise AdapterValidationError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA factor (lora_A/lora_B weight); "
                "a LoRA-only engine cannot serve it"
            )
        module = match["module"].removeprefix(_PEFT_PREFIX)
        (a_by_module if match["factor"] == "A" else b_by_module)[module] = tensor

    if not a_by_module and not b_by_module:
        raise AdapterValidationError(f"adapter {name!r}: weights file holds no LoRA tensors")
    for module in a_by_module.keys() ^ b_by_module.keys():
        present, missing = ("lora_A", "lora_B") if module in a_by_module else ("lora_B", "lora_A")
        raise AdapterValidationError(f"adapter {name!r}: {module} has {present} but no {missing}")
    return {module: (a_by_module[module], b_by_module[module]) for module in a_by_module}


def _check_module(
    name: str,
    module: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base_modules: Mapping[str, tuple[int, int]],
    target_modules: Collection[str],
    max_rank: int,
) -> None:
    short_name = module.rsplit(".", 1)[-1]
    if short_name not in target_modules:
        raise AdapterValidationError(
            f"adapter {name!r} targets {module}, but only {sorted(target_modules)} are supported"
        )
    if module not in base_modules:
        raise AdapterValidationError(
            f"adapter {name!r} targets {module}, which the base model does not have "
            "(was it trained for a different base model?)"
        )
    if lora_a.ndim != 2 or lora_b.ndim != 2:
        raise AdapterValidationError(
            f"adapter {name!r}: {module} factors must be matrices, got lora_A {list(lora_a.shape)} "
            f"and lora_B {list(lora_b.shape)}"
        )
    in_features, out_features = base_modules[module]
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_features or lora_b.shape != (out_features, rank):
        raise AdapterValidationError(
            f"adapter {name!r} was trained for a different base model: {module} has lora_A "
            f"{list(lora_a.shape)} and lora_B {list(lora_b.shape)}, but the base module is "
            f"in_features={in_features}, out_features={out_features} (expected lora_A [{rank}, {in_features}] "
            f"and lora_B [{out_features}, {rank}])"
        )
    if rank > max_rank:
        raise AdapterValidationError(
            f"adapter {name!r} has rank {rank} at {module}, above the engine's max rank {max_rank}"
        )


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The rank_pattern/alpha_pattern key that applies to `module`, matched the way PEFT does."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None
