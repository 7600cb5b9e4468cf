"""Engine configuration: one dataclass, serialisable into the MLflow model config."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SMALL_CPU_CORES = 4
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 matrix instruction sets of this CPU that torch can use (empty when none)."""
    found = []
    if torch.cpu._is_amx_tile_supported():
        found.append("AMX")
    if torch.cpu._is_avx512_bf16_supported():
        found.append("AVX512-BF16")
    return found


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    """Most sequences decoding at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill tokens + one per decoding sequence)."""
    prefill_chunk_tokens: int | None = None
    """Prefill tokens a step may hold while other sequences decode (chunked prefill); None ->
    learned from measured step times so that the prefill share of such a step costs about
    `prefill_chunk_cost_ratio` decode steps."""
    prefill_chunk_cost_ratio: float = 2.0
    """Learned chunk target: with 2, a step carrying a chunk takes about 3 decode steps, and a long
    prompt arriving under load reaches its first token about 1.5x later than alone."""
    max_model_len: int | None = None
    """Context window; None -> the model's max_position_embeddings capped at 8192."""
    block_size: int = 16
    kv_cache_bytes: int | None = None
    """KV cache budget in bytes; None -> 512 MiB on CPU, 60% of free memory on CUDA."""
    max_loras: int | None = None
    """Device slots: adapters resident (and running) at once; None -> as many as
    `lora_slots_bytes` holds at `max_lora_rank`, at least 8 and at most `max_num_seqs`."""
    lora_slots_bytes: int | None = None
    """Memory for adapter slots when `max_loras` is None; None -> 1 GiB on CPU, 10% of free memory on CUDA."""
    max_lora_rank: int = 64
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    adapter_roots: list[str] = field(default_factory=list)
    host_cache_bytes: int = 2 << 30
    """Host-memory LRU budget for loaded adapters."""
    download_dir: str | None = None
    dtype: str = "auto"
    """auto -> bfloat16 on CUDA and on CPUs with native bf16 matrix instructions (AMX-BF16 or
    AVX512-BF16), float32 on other CPUs (bf16 there is emulated and slower than fp32)."""
    device: str = "auto"
    seed: int = 0
    num_threads: int | None = None
    """torch intra-op threads of the engine thread; None -> 1 on a CPU device with at most 4 cores,
    else torch's default. OpenMP regions started from a non-main thread pay a large per-region
    cost, which hurts the many small LoRA ops of a decode step; on a 2-core CPU one thread was
    measured 60% faster for mixed-adapter decoding and 6% slower base-only (benchmarks/RESULTS.md)."""
    s3_allow: list[str] = field(default_factory=list)
    """``s3://bucket/prefix`` entries that S3 adapter ids must lie under; empty = S3 adapters are off."""
    max_adapter_bytes: int = 4 << 30
    """Largest adapter (all its files) that one download (S3, MLflow) may fetch."""
    verified_token_ttl_s: float = 600.0
    """How long a token the hub accepted for a private adapter (or a repo found public) is trusted."""
    trust_request_chat_template: bool = False
    """Whether requests may carry their own `chat_template` (rendered sandboxed, with budgets)."""
    max_prompts_per_request: int = 128
    """Most prompts in one completions request."""
    max_sequences_per_request: int = 256
    """Most sequences one request may start: prompts x max(n, best_of)."""

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.adapter_roots = [str(r) for r in self.adapter_roots]
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be at least 1")
        if self.prefill_chunk_cost_ratio <= 0:
            raise ValueError("prefill_chunk_cost_ratio must be positive")
        self.s3_allow = [str(entry) for entry in self.s3_allow]

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_num_threads(self) -> int | None:
        """Threads for the engine thread, or None to leave torch's setting alone."""
        if self.num_threads is not None:
            return self.num_threads
        small_cpu = self.resolved_device().type == "cpu" and (os.cpu_count() or 1) <= _SMALL_CPU_CORES
        return 1 if small_cpu else None

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        device = self.resolved_device()
        if device.type == "cuda":
            logger.info("dtype auto: bfloat16 (CUDA)")
            return torch.bfloat16
        if device.type == "cpu":
            native = cpu_bf16_instructions()
            if native:
                logger.info("dtype auto: bfloat16 (this CPU has native bf16 matrix instructions: %s)", ", ".join(native))
                return torch.bfloat16
            logger.info("dtype auto: float32 (this CPU (%s) has no AMX-BF16 / AVX512-BF16 instructions; bf16 "
                        "would be emulated, slower than fp32)", torch.backends.cpu.get_cpu_capability())
        return torch.float32

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown engine config keys: {sorted(unknown)}")
        return cls(**data)

    def with_env_overrides(self) -> "EngineConfig":
        """Apply LORAX_<FIELD> environment variables (e.g. LORAX_MAX_LORAS=16)."""
        updates: dict[str, Any] = {}
        for f in fields(self):
            raw = os.environ.get(f"LORAX_{f.name.upper()}")
            if raw is None:
                continue
            current = getattr(self, f.name)
            if isinstance(current, (list, tuple)):
                updates[f.name] = [part for part in raw.split(os.pathsep if f.name == "adapter_roots" else ",") if part]
            elif isinstance(current, bool):
                updates[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(current, float):
                updates[f.name] = float(raw)
            elif f.name in ("max_model_len", "kv_cache_bytes", "num_threads", "prefill_chunk_tokens", "max_loras",
                            "lora_slots_bytes") or isinstance(current, int):
                updates[f.name] = int(raw)
            else:
                updates[f.name] = raw
        return EngineConfig(**{**asdict(self), **updates}) if updates else self
