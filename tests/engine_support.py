"""Helpers shared by the engine tests: an engine over the tiny model and reference generators."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.engine.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 4,",
    "Hello",
]


def make_engine(model_dir: Path, adapter_roots: list[Path] | None = None, **overrides) -> EngineClient:
    """An engine over `model_dir` with its core in-process (fast to start; the surfaces' tests use the process).
    device="cpu": the references (transformers, PEFT) run on the CPU in float32; tests/test_gpu_engine.py covers CUDA."""
    values = dict(max_loras=4, max_lora_rank=16, kv_cache_bytes=8 << 20, max_model_len=256, in_process=True,
                  adapter_roots=[str(r) for r in adapter_roots or []], device="cpu")
    values.update(overrides)
    return EngineClient(model_dir, EngineConfig(**values))


def encode(model_dir: Path, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(model_dir).encode(text)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Reference: transformers' own generate (greedy), new tokens only, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, len(prompt):].tolist()
    return out[: out.index(2) + 1] if 2 in out else out


def load_hf(model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(model_dir).eval()


def adapter(adapter_id: str, **kw) -> AdapterRequest:
    return AdapterRequest(adapter_id=adapter_id, **kw)
