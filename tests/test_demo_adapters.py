"""The demo adapters visibly change the default model's answers, on prompts they never saw.

The model-dependent tests train the three adapters on the embedded SmolLM2-135M-Instruct (or reuse
them from the cache) and compare greedy PEFT `generate` replies with and without each adapter.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorax_mlflow.default_model import DEFAULT_MODEL_NAME
from lorax_mlflow.demo_adapters import (
    DEMO_ADAPTERS,
    LORA_TARGETS,
    ensure_demo_adapters,
    generate_replies,
    held_out_prompts,
    load_with_adapters,
    marker_rate,
)
from lorax_mlflow.demo_tasks import training_conversations, training_pairs

NAMES = sorted(DEMO_ADAPTERS)

# Measured on the 2-core CPU with the default recipe, 16 held-out prompts, 40 new tokens:
# adapter rate / base rate: pirate 1.00 / 0.00, json 1.00 / 0.00, french 1.00 / 0.00.
MIN_ADAPTER_RATE = 0.75
MIN_GAIN_OVER_BASE = 0.5
# The highest rate at which one adapter's replies showed another adapter's behaviour: 0.00.
MAX_FOREIGN_RATE = 0.25


@pytest.mark.parametrize("name", NAMES)
def test_each_marker_recognises_its_own_training_answers_and_no_other(name: str) -> None:
    for other in NAMES:
        answers = [answer for _, answer in training_conversations(DEMO_ADAPTERS[other])]
        assert marker_rate(name, answers) == (1.0 if other == name else 0.0), other


@pytest.mark.parametrize("name", NAMES)
def test_held_out_prompts_never_appear_in_training(name: str) -> None:
    trained_on = {question for question, _ in training_pairs()}
    assert len(trained_on) >= 200
    assert not trained_on & set(held_out_prompts(name))


def test_unknown_demo_adapter_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown demo adapter"):
        ensure_demo_adapters(["klingon"])


@pytest.mark.slow
def test_training_is_deterministic_and_cached_by_recipe(tmp_path: Path) -> None:
    def weights(folder: Path):
        return load_file(folder / "adapter_model.safetensors")

    first = ensure_demo_adapters(["json"], steps=2, root=tmp_path / "a")["json"]
    trained_at = (first / "adapter_model.safetensors").stat().st_mtime_ns
    assert ensure_demo_adapters(["json"], steps=2, root=tmp_path / "a")["json"] == first
    assert (first / "adapter_model.safetensors").stat().st_mtime_ns == trained_at

    twin = ensure_demo_adapters(["json"], steps=2, root=tmp_path / "b")["json"]
    for key, value in weights(first).items():
        assert weights(twin)[key].equal(value), key

    longer = ensure_demo_adapters(["json"], steps=3, root=tmp_path / "a")["json"]
    assert longer == first
    assert any(not weights(longer)[key].equal(value) for key, value in weights(twin).items())


@pytest.fixture(scope="module")
def demo_adapters() -> dict[str, Path]:
    return ensure_demo_adapters()


@pytest.fixture(scope="module")
def replies_to(demo_adapters: dict[str, Path]) -> Callable[[str | None, str], list[str]]:
    """replies_to(adapter or None for the base model, task) -> greedy replies to the task's held-out prompts."""
    model, tokenizer = load_with_adapters(demo_adapters)

    @functools.cache
    def generate(adapter: str | None, prompts: tuple[str, ...]) -> list[str]:
        if adapter is None:
            with model.disable_adapter():
                return generate_replies(model, tokenizer, prompts)
        model.set_adapter(adapter)
        return generate_replies(model, tokenizer, prompts)

    return lambda adapter, task: generate(adapter, tuple(held_out_prompts(task)))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_demo_adapter_is_a_standard_peft_folder_for_the_default_model(name: str, demo_adapters) -> None:
    folder = demo_adapters[name]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == DEFAULT_MODEL_NAME
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    keys = load_file(folder / "adapter_model.safetensors").keys()
    for target in LORA_TARGETS:
        assert any(f"{target}.lora_A" in key for key in keys), target


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_adapter_shows_its_behaviour_on_held_out_prompts_and_base_does_not(name: str, replies_to) -> None:
    adapter_rate = marker_rate(name, replies_to(name, name))
    base_rate = marker_rate(name, replies_to(None, name))
    assert adapter_rate >= MIN_ADAPTER_RATE, replies_to(name, name)
    assert adapter_rate >= base_rate + MIN_GAIN_OVER_BASE, (adapter_rate, base_rate)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_other_adapters_do_not_show_this_behaviour(name: str, replies_to) -> None:
    for other in NAMES:
        if other != name:
            assert marker_rate(name, replies_to(other, name)) <= MAX_FOREIGN_RATE, (other, replies_to(other, name))


@pytest.mark.slow
def test_the_engine_serves_each_demo_adapter_with_its_behaviour_in_one_mixed_batch(demo_adapters) -> None:
    """What the main job serves: all three adapters and the base model batched together in the engine."""
    from lorax_mlflow.adapters.cache import AdapterRequest
    from lorax_mlflow.default_model import default_model_path
    from lorax_mlflow.engine.config import EngineConfig
    from lorax_mlflow.client.engine_client import EngineClient
    from lorax_mlflow.engine.sampling_params import SamplingParams

    engine = EngineClient(default_model_path(), EngineConfig(max_loras=4, max_lora_rank=16, device="cpu"),
                          named_adapters=demo_adapters)
    try:
        params = SamplingParams(max_tokens=40, temperature=0.0)
        streams = {}
        for task in NAMES:
            for adapter in (task, None):
                for i, prompt in enumerate(held_out_prompts(task)):
                    ids = engine.tokenizer.apply_chat_template(
                        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                        return_dict=False)
                    streams[task, adapter, i] = engine.submit(ids, params, AdapterRequest(adapter or ""))
        replies = {key: stream.result().outputs[0].text for key, stream in streams.items()}
    finally:
        engine.shutdown()
    for task in NAMES:
        adapter_rate = marker_rate(task, [text for (t, a, _), text in replies.items() if t == task and a == task])
        base_rate = marker_rate(task, [text for (t, a, _), text in replies.items() if t == task and a is None])
        assert adapter_rate >= MIN_ADAPTER_RATE, (task, adapter_rate)
        assert adapter_rate >= base_rate + MIN_GAIN_OVER_BASE, (task, adapter_rate, base_rate)
