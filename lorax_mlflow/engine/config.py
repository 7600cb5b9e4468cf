"""Engine configuration: one dataclass, serialisable into the MLflow model config.

Each field is declared once with :func:`setting`: its default, its help text and how to read it
from text. From that declaration come the ``LORAX_<FIELD>`` environment variables
(:meth:`EngineConfig.with_env_overrides`) and the ``lorax-mlflow serve`` flags (lorax_mlflow/cli.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

logger = logging.getLogger(__name__)

_REMOVED_FIELDS = {"seed"}
"""Fields that models logged by older versions may still carry; ignored."""
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 matrix instruction sets of this CPU that torch can use (empty when none)."""
    found = []
    if torch.cpu._is_amx_tile_supported():
        found.append("AMX")
    if torch.cpu._is_avx512_bf16_supported():
        found.append("AVX512-BF16")
    return found


def _absolute_path(raw: str) -> str:
    return os.path.abspath(os.path.expanduser(raw))


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"not a boolean: {raw!r}")
    return value in ("1", "true", "yes", "on")


def setting(default: Any, help: str, *, kind: Callable[[str], Any] = str, separator: str | None = None,
            flag: str | None = None) -> Any:
    """Declare an EngineConfig field: `kind` parses one value from text; a list field (`separator`
    set) splits its environment variable there and takes its flag once per value."""
    meta = {"help": help, "kind": kind, "separator": separator, "flag": flag}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SettingSpec:
    """One EngineConfig field as the CLI and the environment see it."""

    name: str
    default: Any
    help: str
    kind: Callable[[str], Any]
    separator: str | None
    flag: str

    @property
    def env_var(self) -> str:
        return f"LORAX_{self.name.upper()}"

    def parse(self, raw: str) -> Any:
        if self.separator is not None:
            return [self.kind(part) for part in raw.split(self.separator) if part]
        return self.kind(raw)

    def to_env(self, value: Any) -> str:
        """`value` as this setting's environment variable reads it back."""
        if self.separator is not None:
            return self.separator.join(str(item) for item in value)
        if isinstance(value, bool):
            return "1" if value else "0"
        return str(value)


def engine_settings() -> Iterator[SettingSpec]:
    for f in fields(EngineConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default
        yield SettingSpec(f.name, default, f.metadata["help"], f.metadata["kind"], f.metadata["separator"],
                          f.metadata["flag"] or "--" + f.name.replace("_", "-"))


@dataclass
class EngineConfig:
    max_num_seqs: int = setting(64, "most sequences decoding at once", kind=int)
    max_num_batched_tokens: int = setting(
        2048, "token budget of one engine step (prefill tokens + one per decoding sequence)", kind=int)
    prefill_chunk_tokens: int | None = setting(
        None, "prefill tokens a step may hold while other sequences decode (chunked prefill; default: learned "
        "from measured step times)", kind=int)
    prefill_chunk_cost_ratio: float = setting(
        3.0, "learned chunk target: the prefill share of a step with decodes costs about this many decode steps",
        kind=float)
    """With ratio r, a step carrying a chunk costs about 1 + r decode steps (the decoding streams' worst gap)
    and a long prompt arriving under load reaches its first token about 1 + 1/r times later than alone, in
    the linear cost model; measured, small chunks cost more per token than one whole-prompt step (and the
    prompt waits for the step in flight), so the delay comes out larger. benchmarks/serving.py
    --long-prompt, 16 streams + a 1,500-token prompt, 2 cores: r=2 -> gap 1.97x, TTFT 1.97x; r=3 -> gap
    2.70x, TTFT 1.49x (targets 3x and 1.5x)."""
    max_model_len: int | None = setting(
        None, "context window in tokens (default: the model's max_position_embeddings, at most 8192)", kind=int)
    block_size: int = setting(16, "tokens per KV cache block", kind=int)
    enable_prefix_caching: bool = setting(
        True, "reuse the K/V of full blocks an earlier request computed for the same tokens under the same "
        "weights (base model or adapter content); --no-prefix-caching turns it off", kind=_boolean,
        flag="--prefix-caching")
    kv_cache_bytes: int | None = setting(
        None, "KV cache budget in bytes (default: 512 MiB on CPU, 60% of free memory on CUDA)", kind=int)
    max_loras: int | None = setting(
        None, "adapters resident (and running) at once, the device slots (default: as many as "
        "--lora-slots-bytes holds at --max-lora-rank, at least 8 and at most --max-num-seqs)", kind=int)
    lora_slots_bytes: int | None = setting(
        None, "memory for adapter slots when --max-loras is unset (default: 1 GiB on CPU, 10% of free memory "
        "on CUDA)", kind=int)
    max_lora_rank: int = setting(64, "largest adapter rank accepted", kind=int)
    target_modules: tuple[str, ...] = setting(
        DEFAULT_TARGET_MODULES, "projections that adapters may target", separator=",")
    adapter_roots: list[str] = setting(
        [], "folder that requests may name local adapters from; repeatable", kind=_absolute_path,
        separator=os.pathsep, flag="--adapter-root")
    host_cache_bytes: int = setting(2 << 30, "host-memory budget for loaded adapters, in bytes", kind=int)
    download_dir: str | None = setting(None, "where fetched adapters are stored (default: the cache folder)")
    dtype: str = setting("auto", "auto, float32, bfloat16 or float16 (auto: bfloat16 on CUDA and on CPUs with "
                         "AMX-BF16 or AVX512-BF16, else float32: bf16 is emulated and slower there)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    num_threads: int | None = setting(
        None, "torch threads of the engine core (default: every core this process may use)", kind=int)
    """The loop runs on the core process's main thread, where OpenMP parallel regions are cheap (on a
    background thread they cost so much that one thread was faster: benchmarks/RESULTS.md)."""
    s3_allow: list[str] = setting(
        [], "s3://bucket/prefix that S3 adapter ids must lie under; repeatable (none: S3 adapters are off)",
        separator=",")
    max_adapter_bytes: int = setting(4 << 30, "largest adapter (all its files) one download may fetch", kind=int)
    verified_token_ttl_s: float = setting(
        600.0, "seconds a token the hub accepted for a private adapter (or a repo found public) is trusted",
        kind=float)
    trust_request_chat_template: bool = setting(
        False, "let requests carry their own chat_template (rendered sandboxed, with budgets)", kind=_boolean)
    grammar_compile_timeout_s: float = setting(
        10.0, "longest a request waits for its guided/response_format grammar to compile; a slower one gets a 400 "
        "(the compile ends in the background, off the engine loop, and is cached)", kind=float)
    max_prompts_per_request: int = setting(128, "most prompts in one completions request", kind=int)
    max_sequences_per_request: int = setting(
        256, "most sequences one request may start: prompts x max(n, best_of)", kind=int)
    in_process: bool = setting(
        False, "run the engine core on a thread of this process instead of its own process "
        "(starts faster, for tests and debugging; shares this process's GIL and cores)", kind=_boolean)
    speculative_adapter: str | None = setting(
        None, "Medusa (or LoRA+Medusa) adapter id whose heads draft for requests that name no Medusa adapter "
        "(only its heads are used for them, never its LoRA)")
    speculative_tokens: int = setting(
        0, "draft tokens per step: with Medusa heads at most this many (0: one per head); without, prompt "
        "lookup (n-gram match in the prompt and output so far) drafts this many (0: off)", kind=int)
    speculative_max_batch_size: int = setting(
        4, "no speculation while more sequences than this decode: verifying drafts multiplies a step's tokens, "
        "which pays only while a step costs about the same for 1 or K + 1 tokens per sequence "
        "(benchmarks/speculative.py)", kind=int)
    """4 from that benchmark's sweep on a 2-core AVX2 CPU, where a decode step is bound by its GEMMs:
    Medusa paid 1.35x at 2 streams and 1.12x at 4, and lost (0.75x) at 8."""

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
        if self.speculative_tokens < 0 or self.speculative_max_batch_size < 0:
            raise ValueError("speculative_tokens and speculative_max_batch_size must not be negative")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_num_threads(self) -> int:
        """torch threads for the core's loop: `num_threads`, else the cores this process may use."""
        if self.num_threads is not None:
            return self.num_threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

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
        data = {k: v for k, v in data.items() if k not in _REMOVED_FIELDS}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown engine config keys: {sorted(unknown)}")
        return cls(**data)

    def with_env_overrides(self) -> "EngineConfig":
        """Apply LORAX_<FIELD> environment variables (e.g. LORAX_MAX_LORAS=16)."""
        updates = {spec.name: spec.parse(os.environ[spec.env_var])
                   for spec in engine_settings() if spec.env_var in os.environ}
        return self.with_overrides(updates)

    def with_overrides(self, updates: dict[str, Any]) -> "EngineConfig":
        """A copy with some fields replaced (unknown names are an error)."""
        unknown = set(updates) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown engine config keys: {sorted(unknown)}")
        return replace(self, **updates) if updates else self
