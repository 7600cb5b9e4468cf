"""Read a PEFT LoRA adapter folder into `LoraWeights`, validated against the base model.

Everything that makes an adapter unusable with this base model or this LoRA-only engine is an
`AdapterValidationError` naming the adapter and the cause, so a bad adapter fails its own request
and never the engine. That includes hostile adapters: files that resolve outside the adapter's
root are never opened, non-finite weights are refused, and `rank_pattern` / `alpha_pattern`
regexes run with a time budget (and without holding the GIL), so a catastrophically
backtracking pattern fails its adapter instead of freezing the server.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import regex
import torch

from lorax_mlflow.adapters.confined import ConfinedFolder
from lorax_mlflow.errors import AdapterValidationError, LoraxError
from lorax_mlflow.lora.weights import LoraWeights

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# `<module path>.lora_A.weight` or, with an adapter name segment, `<module path>.lora_B.default.weight`.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
MAX_PATTERNS = 4096
MAX_PATTERN_CHARS = 1024
PATTERN_MATCH_BUDGET_S = 1.0
"""Total regex time one adapter's rank/alpha patterns may take; one match may take at most all of it."""

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
    root: Path | None = None,
) -> LoraWeights:
    """Load the PEFT adapter in `folder` with its scaling folded into B.

    `base_modules` maps each LoRA-able Linear of the base model (e.g.
    ``model.layers.0.self_attn.q_proj``) to its ``(in_features, out_features)``;
    `target_modules` are the short module names the engine can serve. Tensors for which
    `other_reader_keys` is true belong to another reader (Medusa heads saved beside the factors).
    Every file read must resolve under `root` (default: the folder itself).
    """
    folder = Path(folder)
    try:
        files = ConfinedFolder(folder, root)
        config = _read_config(files, name)
        tensors = _read_tensors(files, name)
    except AdapterValidationError:
        raise
    except LoraxError as error:  # a file outside the root, or too large
        raise AdapterValidationError(f"adapter {name!r}: {error.message}") from error
    if other_reader_keys is not None:
        tensors = {key: tensor for key, tensor in tensors.items() if not other_reader_keys(key)}
    factors = _group_factors(tensors, name)

    r_default = _config_number(config, "r", 8, int, name)
    alpha_default = _config_number(config, "lora_alpha", r_default, float, name)
    rank_pattern = _patterns(config, "rank_pattern", int, name)
    alpha_pattern = _patterns(config, "alpha_pattern", float, name)
    use_rslora = bool(config.get("use_rslora", False))
    matcher = _PatternMatcher(name)

    a_by_module: dict[str, torch.Tensor] = {}
    b_by_module: dict[str, torch.Tensor] = {}
    for module, (lora_a, lora_b) in sorted(factors.items()):
        _check_module(name, module, lora_a, lora_b, base_modules, target_modules, max_rank)
        rank_key = matcher.key(rank_pattern, module)
        alpha_key = matcher.key(alpha_pattern, module)
        rank = rank_pattern[rank_key] if rank_key is not None else r_default
        alpha = alpha_pattern[alpha_key] if alpha_key is not None else alpha_default
        if rank <= 0:
            raise AdapterValidationError(f"adapter {name!r}: {module} has rank {rank} in adapter_config.json")
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


def _config_number(config: Mapping[str, Any], field: str, default: Any, kind: type, name: str) -> Any:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterValidationError(f"adapter {name!r}: {field} in {CONFIG_FILE} must be a number, got {value!r}")
    return kind(value)


def _patterns(config: Mapping[str, Any], field: str, kind: type, name: str) -> dict[str, Any]:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise AdapterValidationError(f"adapter {name!r}: {field} in {CONFIG_FILE} must be an object")
    if len(patterns) > MAX_PATTERNS or any(len(key) > MAX_PATTERN_CHARS for key in patterns):
        raise AdapterValidationError(
            f"adapter {name!r}: {field} holds more than {MAX_PATTERNS} patterns or one over {MAX_PATTERN_CHARS} characters"
        )
    return {key: _config_number(patterns, key, None, kind, name) for key in patterns}


def _read_config(files: ConfinedFolder, name: str) -> dict[str, Any]:
    if not files.is_file(CONFIG_FILE):
        raise AdapterValidationError(f"adapter {name!r}: no {CONFIG_FILE} in {files.folder}")
    try:
        config = json.loads(files.read_bytes(CONFIG_FILE, MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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


def _read_tensors(files: ConfinedFolder, name: str) -> dict[str, torch.Tensor]:
    """The weights file's tensors, read from bytes opened inside the root; all must be finite."""
    try:
        if files.is_file(SAFETENSORS_FILE):
            from safetensors.torch import load

            tensors = load(files.read_bytes(SAFETENSORS_FILE))
        elif files.is_file(PICKLE_FILE):
            data = io.BytesIO(files.read_bytes(PICKLE_FILE))
            tensors = torch.load(data, weights_only=True, map_location="cpu")
        else:
            raise AdapterValidationError(
                f"adapter {name!r}: no {SAFETENSORS_FILE} or {PICKLE_FILE} in {files.folder}"
            )
    except LoraxError:
        raise
    except Exception as exc:  # safetensors, pickle and zip readers each raise their own types
        raise AdapterValidationError(
            f"adapter {name!r}: could not read its weights in {files.folder} (corrupt or truncated file?): {exc}"
        ) from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterValidationError(f"adapter {name!r}: weights file does not hold a name -> tensor mapping")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterValidationError(f"adapter {name!r}: tensor {key!r} holds NaN or infinite values")
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


class _PatternMatcher:
    """Matches rank_pattern/alpha_pattern keys against module paths the way PEFT does (the key
    matching a dotted suffix of the module path), with one time budget for the whole adapter.

    The `regex` engine runs each match with a timeout and releases the GIL while matching, so a
    pattern that backtracks catastrophically fails its adapter (400) within the budget and the
    server's other threads (the event loop, the engine) keep running meanwhile.
    """

    def __init__(self, name: str, budget_s: float = PATTERN_MATCH_BUDGET_S) -> None:
        self.name = name
        self.deadline = time.monotonic() + budget_s
        self._compiled: dict[str, Any] = {}

    def key(self, patterns: Mapping[str, Any], module: str) -> str | None:
        """The first key of `patterns` that matches `module` (an exact key wins without a regex)."""
        for pattern in patterns:
            if pattern == module:
                return pattern
        for pattern in patterns:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._too_slow(pattern)
            try:
                if self._compile(pattern).match(module, timeout=left, concurrent=True):
                    return pattern
            except TimeoutError as error:
                raise self._too_slow(pattern) from error
        return None

    def _compile(self, pattern: str) -> Any:
        if pattern not in self._compiled:
            try:
                self._compiled[pattern] = regex.compile(rf"(.*\.)?({pattern})$")
            except (regex.error, RecursionError, OverflowError) as error:
                raise AdapterValidationError(
                    f"adapter {self.name!r}: rank/alpha pattern {pattern!r} is not a valid regex: {error}"
                ) from error
        return self._compiled[pattern]

    def _too_slow(self, pattern: str) -> AdapterValidationError:
        return AdapterValidationError(
            f"adapter {self.name!r}: matching rank/alpha pattern {pattern[:80]!r} against the module names "
            f"took longer than {PATTERN_MATCH_BUDGET_S:g} s (a catastrophically backtracking regex?)"
        )
