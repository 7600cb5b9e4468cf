"""Read LoRAX's Medusa adapter format into `MedusaHeads`, validated against the base model.

A Medusa adapter folder holds a ``config.json`` with ``medusa_num_heads`` and
``medusa_num_layers`` (plus ``base_model_name_or_path`` and an optional ``version``), and the
heads' tensors named ``<head>.<layer>.linear.weight`` / ``.bias`` for the residual blocks and,
for heads with their own output projection, ``<head>.<num_layers>.weight``. Like LoRAX, the
tensors may sit in their own file (``medusa_lm_head.safetensors``, or the original Medusa's
``medusa_lm_head.pt``, read with ``weights_only``) or beside LoRA factors in
``adapter_model.safetensors``: a folder with both an ``adapter_config.json`` and a Medusa
``config.json`` is a LoRA+Medusa adapter. Checkpoints that carry more heads than the config
names serve the first ``medusa_num_heads``, as LoRAX does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lorax_mlflow.lora.weights import MedusaHeads
from lorax_mlflow.errors import AdapterValidationError

MEDUSA_CONFIG_FILE = "config.json"
MEDUSA_SAFETENSORS_FILE = "medusa_lm_head.safetensors"
MEDUSA_PICKLE_FILE = "medusa_lm_head.pt"
_SHARED_SAFETENSORS_FILE = "adapter_model.safetensors"
MAX_MEDUSA_HEADS = 16
MAX_MEDUSA_LAYERS = 8

# `<head>.<layer>.linear.weight`, `<head>.<layer>.linear.bias`, `<head>.<num_layers>.weight`;
# checkpoints saved from a whole Medusa model prefix them with `medusa_head.`.
_MEDUSA_KEY = re.compile(r"^(?:medusa_head\.)?(?P<head>\d+)\.(?P<layer>\d+)\.(?P<kind>linear\.weight|linear\.bias|weight)$")


def is_medusa_key(key: str) -> bool:
    """Whether a tensor name belongs to Medusa heads (so a LoRA reader leaves it alone)."""
    return _MEDUSA_KEY.match(key) is not None


def read_medusa_config(folder: Path, name: str) -> dict[str, Any] | None:
    """The folder's Medusa config, or None when it has none (no config.json with medusa_num_heads)."""
    path = Path(folder) / MEDUSA_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError(f"adapter {name!r}: {MEDUSA_CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or "medusa_num_heads" not in config:
        return None
    for field, upper in (("medusa_num_heads", MAX_MEDUSA_HEADS), ("medusa_num_layers", MAX_MEDUSA_LAYERS)):
        value = config.get(field)
        lower = 1 if field == "medusa_num_heads" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not lower <= value <= upper:
            raise AdapterValidationError(
                f"adapter {name!r}: {MEDUSA_CONFIG_FILE} field {field} must be an integer in [{lower}, {upper}], "
                f"got {value!r}"
            )
    return config


def load_medusa_heads(
    folder: Path,
    name: str,
    config: dict[str, Any],
    *,
    hidden_size: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> MedusaHeads:
    """The Medusa heads in `folder` (whose `config` came from `read_medusa_config`), checked against the base."""
    num_heads, num_layers = config["medusa_num_heads"], config["medusa_num_layers"]
    tensors = _read_medusa_tensors(Path(folder), name)
    by_head: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _MEDUSA_KEY.match(key)
        head = int(match["head"])
        if head < num_heads:
            by_head.setdefault(head, {})[f"{match['layer']}.{match['kind']}"] = tensor

    weights, biases, outs = [], [], []
    for head in range(num_heads):
        found = by_head.get(head, {})
        layer_w, layer_b = [], []
        for layer in range(num_layers):
            w = _take(found, f"{layer}.linear.weight", name, head, (hidden_size, hidden_size))
            b = _take(found, f"{layer}.linear.bias", name, head, (hidden_size,))
            layer_w.append(w)
            layer_b.append(b)
        weights.append(torch.stack(layer_w) if layer_w else torch.empty(0, hidden_size, hidden_size))
        biases.append(torch.stack(layer_b) if layer_b else torch.empty(0, hidden_size))
        out_key = f"{num_layers}.weight"
        outs.append(_take(found, out_key, name, head, (vocab_size, hidden_size)) if out_key in found else None)
    if any(out is None for out in outs) and not all(out is None for out in outs):
        raise AdapterValidationError(
            f"adapter {name!r}: some Medusa heads have an output projection ({num_layers}.weight) and others do not"
        )

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).to(dtype).contiguous()

    return MedusaHeads(
        num_layers=num_layers,
        linear_w=cast(torch.stack(weights)),
        linear_b=cast(torch.stack(biases)),
        out_w=None if outs[0] is None else cast(torch.stack(outs)),
    )


def _take(
    found: dict[str, torch.Tensor], key: str, name: str, head: int, shape: tuple[int, ...]
) -> torch.Tensor:
    tensor = found.get(key)
    if tensor is None:
        raise AdapterValidationError(f"adapter {name!r}: Medusa head {head} has no tensor {head}.{key}")
    if tuple(tensor.shape) != shape:
        raise AdapterValidationError(
            f"adapter {name!r} was trained for a different base model: Medusa tensor {head}.{key} has shape "
            f"{list(tensor.shape)}, but this base model needs {list(shape)} (hidden size {shape[-1]}"
            + (f", vocabulary {shape[0]})" if len(shape) == 2 and shape[0] != shape[1] else ")")
        )
    if not tensor.is_floating_point():
        raise AdapterValidationError(f"adapter {name!r}: Medusa tensor {head}.{key} is not a float tensor")
    return tensor


def _read_medusa_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Every Medusa tensor of the folder: from its safetensors files, else from the pickle (weights only)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    try:
        for file_name in (MEDUSA_SAFETENSORS_FILE, _SHARED_SAFETENSORS_FILE):
            path = folder / file_name
            if path.is_file():
                tensors.update((k, v) for k, v in load_file(path, device="cpu").items() if is_medusa_key(k))
        pickle_path = folder / MEDUSA_PICKLE_FILE
        if not tensors and pickle_path.is_file():
            loaded = torch.load(pickle_path, weights_only=True, map_location="cpu")
            if not isinstance(loaded, dict):
                raise AdapterValidationError(f"adapter {name!r}: {MEDUSA_PICKLE_FILE} does not hold a name -> tensor mapping")
            tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and is_medusa_key(k)}
    except AdapterValidationError:
        raise
    except Exception as exc:  # safetensors, pickle and zip readers each raise their own types
        raise AdapterValidationError(
            f"adapter {name!r}: could not read its Medusa weights in {folder} (corrupt or truncated file?): {exc}"
        ) from exc
    if not tensors:
        raise AdapterValidationError(
            f"adapter {name!r}: {MEDUSA_CONFIG_FILE} declares Medusa heads but no Medusa tensors were found in "
            f"{MEDUSA_SAFETENSORS_FILE}, {_SHARED_SAFETENSORS_FILE} or {MEDUSA_PICKLE_FILE}"
        )
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterValidationError(f"adapter {name!r}: Medusa weights hold something other than tensors")
    return tensors
