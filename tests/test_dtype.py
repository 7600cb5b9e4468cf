"""dtype auto: bf16 where the CPU multiplies bf16 natively, fp32 elsewhere; bf16 generation stays
within a tolerance of fp32 that is tight enough to catch a wrong adapter or a wrong position."""

from __future__ import annotations

import logging

import pytest
import torch

from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.sampling_params import SamplingParams
from tests.engine_support import PROMPTS, adapter, encode, make_engine


@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (False, False, torch.float32),  # e.g. this machine: AVX2 only, bf16 would be emulated
    (True, False, torch.bfloat16),
    (False, True, torch.bfloat16),
])
def test_auto_dtype_follows_the_cpus_native_bf16_instructions(monkeypatch, caplog, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    with caplog.at_level(logging.INFO, logger="lorax_mlflow.engine.config"):
        assert EngineConfig(device="cpu").resolved_dtype() == expected
    assert "dtype auto: " + str(expected).removeprefix("torch.") in caplog.text  # the choice and why are logged
    assert EngineConfig(device="cpu", dtype="float32").resolved_dtype() == torch.float32  # --dtype overrides
    assert EngineConfig(device="cpu", dtype="bfloat16").resolved_dtype() == torch.bfloat16


def prompt_logprobs(engine, prompt, adapter_path=None) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    result = engine.submit(prompt, params, adapter(str(adapter_path)) if adapter_path else None).result()
    return torch.tensor([entry.logprob for entry in result.prompt_logprobs[1:]])


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """bf16 vs fp32 on the tiny model: measured max 0.004, mean 0.001; adapters differ by ~0.2 on average."""
    diff = (x - y).abs()
    return bool(diff.mean() < 0.02 and diff.max() < 0.06)


def test_bf16_engine_matches_fp32_within_a_tolerance_that_catches_wrong_adapters_and_positions(
    tiny_model_dir, adapter_root, tiny_adapters
):
    prompt = (encode(tiny_model_dir, " ".join(PROMPTS)) * 2)[:60]
    fp32 = make_engine(tiny_model_dir, adapter_roots=[adapter_root], dtype="float32")
    bf16 = make_engine(tiny_model_dir, adapter_roots=[adapter_root], dtype="bfloat16")
    try:
        assert bf16.core.runner.kv_cache.dtype == torch.bfloat16
        reference = prompt_logprobs(fp32, prompt, tiny_adapters["c"])
        got = prompt_logprobs(bf16, prompt, tiny_adapters["c"])
        assert close(got, reference)
        assert not close(prompt_logprobs(fp32, prompt, tiny_adapters["a"]), reference), "a wrong adapter is caught"
        assert not close(prompt_logprobs(fp32, prompt), reference), "a missing adapter is caught"
        shifted = prompt_logprobs(fp32, prompt[:1] + prompt, tiny_adapters["c"])[1:]  # every position + 1
        assert not close(shifted, reference), "a wrong position is caught"
    finally:
        fp32.shutdown()
        bf16.shutdown()
