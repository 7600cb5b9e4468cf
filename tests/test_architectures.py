"""Decoders other than Llama run through the engine's paged attention (and fused projections where
their modules allow) and generate exactly what transformers generates, also when their prompts are
prefilled in chunks beside running decodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from lorax_mlflow.default_model import default_model_path
from tests.engine_support import PROMPTS, encode, greedy, hf_greedy, make_engine

SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
             tie_word_embeddings=True)
ARCHITECTURES = {
    "qwen2": lambda: Qwen2Config(**SHAPE),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=16),  # q/k norms
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None),
    "gemma": lambda: GemmaConfig(**SHAPE, head_dim=32),  # head_dim != hidden / heads
    "phi3": lambda: Phi3Config(**SHAPE),  # already-fused qkv_proj / gate_up_proj
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model_dir(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[request.param]()).eval()
    with torch.no_grad():  # random biases and norms, so that a dropped one would show
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


def test_greedy_tokens_equal_hf_generate_with_chunked_prefill_beside_decodes(model_dir):
    engine = make_engine(model_dir, max_num_batched_tokens=24, prefill_chunk_tokens=7)
    try:
        hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        long_prompt = (encode(model_dir, " ".join(PROMPTS)) * 2)[:50]
        prompts = [encode(model_dir, p) for p in PROMPTS[:3]] + [long_prompt]
        streams = [engine.submit(p, greedy(10)) for p in prompts]
        for prompt, stream in zip(prompts, streams):
            assert stream.result().outputs[0].token_ids == hf_greedy(hf, prompt, 10)
    finally:
        engine.shutdown()
