"""PEFT adapter folders -> LoraWeights: the loaded factors reproduce PEFT's own LoRA output, and
every adapter a LoRA-only engine cannot serve on this base model is refused with a clear reason."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from lorax_mlflow.adapters.peft_format import load_peft_adapter
from lorax_mlflow.errors import AdapterValidationError
from tests.helpers import ALL_TARGETS, build_peft_adapter, build_tiny_model


def base_modules_of(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        path: (module.in_features, module.out_features)
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in ALL_TARGETS
    }


@pytest.fixture(scope="module")
def base_model(tiny_model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def base_modules(base_model: LlamaForCausalLM) -> dict[str, tuple[int, int]]:
    return base_modules_of(base_model)


def load(folder: Path, base_modules, *, max_rank: int = 64, targets=ALL_TARGETS, name: str = "test"):
    return load_peft_adapter(folder, name, base_modules, max_rank=max_rank, target_modules=targets)


def peft_lora_contributions(base_folder: Path, adapter_folder: Path, x_by_in: dict[int, torch.Tensor]):
    """For every LoRA layer of the PEFT model: its output minus its base layer's output."""
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_folder), adapter_folder).eval()
    contributions = {}
    with torch.no_grad():
        for path, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                x = x_by_in[module.base_layer.in_features]
                contributions[path] = module(x) - module.base_layer(x)
    return contributions


def assert_matches_peft(weights, base_folder: Path, adapter_folder: Path) -> None:
    torch.manual_seed(0)
    x_by_in = {n: torch.randn(5, n) for n in (64, 128)}
    expected = peft_lora_contributions(base_folder, adapter_folder, x_by_in)
    assert set(weights.a) == set(expected)
    for path, contribution in expected.items():
        x = x_by_in[weights.a[path].shape[1]]
        torch.testing.assert_close(x @ weights.a[path].T @ weights.b[path].T, contribution, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adapter", ["a", "b", "c"], ids=["safetensors", "rslora", "bin"])
def test_loaded_factors_reproduce_peft_lora_output(adapter, tiny_adapters, tiny_model_dir, base_modules):
    weights = load(tiny_adapters[adapter], base_modules, name=adapter)

    assert_matches_peft(weights, tiny_model_dir, tiny_adapters[adapter])
    assert weights.name == adapter
    assert weights.rank == {"a": 4, "b": 8, "c": 16}[adapter]
    assert weights.target_modules == set(ALL_TARGETS)
    assert weights.source_dir == tiny_adapters[adapter]
    assert weights.base_model_name == str(tiny_model_dir)


def test_rslora_folds_alpha_over_sqrt_rank_into_b(tiny_adapters, base_modules):
    raw = load_file(tiny_adapters["b"] / "adapter_model.safetensors")  # r=8, alpha=32, rsLoRA
    weights = load(tiny_adapters["b"], base_modules)

    key = "model.layers.1.mlp.up_proj"
    torch.testing.assert_close(weights.a[key], raw[f"base_model.model.{key}.lora_A.weight"])
    torch.testing.assert_close(weights.b[key], raw[f"base_model.model.{key}.lora_B.weight"] * (32 / math.sqrt(8)))


def test_rank_and_alpha_patterns_apply_per_module(tiny_model_dir, tmp_path, base_modules):
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL_TARGETS, init_lora_weights=False,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3},
    )
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(tmp_path)

    weights = load(tmp_path, base_modules)

    assert weights.a["model.layers.0.self_attn.q_proj"].shape[0] == 2
    assert weights.a["model.layers.1.mlp.down_proj"].shape[0] == 6
    assert weights.a["model.layers.0.mlp.down_proj"].shape[0] == 4
    assert weights.rank == 6
    assert_matches_peft(weights, tiny_model_dir, tmp_path)


def test_keys_with_adapter_name_segment_are_understood(tiny_adapters, tmp_path, base_modules):
    raw = load_file(tiny_adapters["a"] / "adapter_model.safetensors")
    renamed = {key.replace(".weight", ".default.weight"): t for key, t in raw.items()}
    shutil.copy(tiny_adapters["a"] / "adapter_config.json", tmp_path)
    save_file(renamed, tmp_path / "adapter_model.safetensors")

    named, plain = load(tmp_path, base_modules), load(tiny_adapters["a"], base_modules)

    assert named.a.keys() == plain.a.keys()
    for key in plain.a:
        torch.testing.assert_close(named.b[key], plain.b[key])


def test_safetensors_preferred_and_dtype_applied(tiny_adapters, tmp_path, base_modules):
    weights = load_peft_adapter(
        tiny_adapters["a"], "a", base_modules, max_rank=8, target_modules=ALL_TARGETS, dtype=torch.bfloat16
    )
    reference = load(tiny_adapters["a"], base_modules)

    assert all(t.dtype == torch.bfloat16 for t in [*weights.a.values(), *weights.b.values()])
    key = "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(weights.b[key].float(), reference.b[key], rtol=1e-2, atol=1e-3)


# --- refusals -------------------------------------------------------------------------------------


def copy_adapter(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "adapter"))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def refusal(folder: Path, base_modules, **kwargs) -> str:
    with pytest.raises(AdapterValidationError) as info:
        load(folder, base_modules, name="bad-adapter", **kwargs)
    assert "bad-adapter" in info.value.message
    assert info.value.status == 400
    return info.value.message


def test_missing_config(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    (folder / "adapter_config.json").unlink()
    assert "no adapter_config.json" in refusal(folder, base_modules)


def test_missing_weights(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors or adapter_model.bin in" in refusal(folder, base_modules)


@pytest.mark.parametrize("adapter,file", [("a", "adapter_model.safetensors"), ("c", "adapter_model.bin")])
def test_truncated_weights(adapter, file, tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters[adapter], tmp_path)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in refusal(folder, base_modules)


@pytest.mark.parametrize("adapter,file", [("a", "adapter_model.safetensors"), ("c", "adapter_model.bin")])
def test_garbage_weights(adapter, file, tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters[adapter], tmp_path)
    (folder / file).write_bytes(b"\x00not a weights file" * 10)
    assert "corrupt or truncated" in refusal(folder, base_modules)


def test_invalid_config_json(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in refusal(folder, base_modules)


def test_non_lora_peft_type(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    edit_config(folder, peft_type="IA3")
    assert "peft_type is 'IA3'" in refusal(folder, base_modules)


@pytest.mark.parametrize(
    "changes,cause",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
    ],
)
def test_features_a_lora_only_engine_cannot_serve(changes, cause, tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    edit_config(folder, **changes)
    message = refusal(folder, base_modules)
    assert cause in message and "cannot serve" in message


def test_real_dora_adapter_is_refused(tiny_model_dir, tmp_path, base_modules):
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(tmp_path)
    assert "DoRA" in refusal(tmp_path, base_modules)


def test_module_the_base_model_does_not_have(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    raw = load_file(folder / "adapter_model.safetensors")
    moved = {key.replace("layers.1.", "layers.7."): t for key, t in raw.items()}
    save_file(moved, folder / "adapter_model.safetensors")
    message = refusal(folder, base_modules)
    assert "model.layers.7." in message and "does not have" in message


def test_module_not_among_supported_targets(tiny_adapters, base_modules):
    message = refusal(tiny_adapters["a"], base_modules, targets=["q_proj", "v_proj"])
    assert "only ['q_proj', 'v_proj'] are supported" in message


def test_adapter_for_a_different_hidden_size(tmp_path, base_modules):
    other_base = build_tiny_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    adapter = build_peft_adapter(other_base, tmp_path / "adapter", rank=4, targets=["q_proj"])

    message = refusal(adapter, base_modules)

    assert "trained for a different base model" in message
    assert "lora_A [4, 32]" in message and "in_features=64" in message


def test_rank_above_engine_max(tiny_adapters, base_modules):
    message = refusal(tiny_adapters["c"], base_modules, max_rank=8)
    assert "rank 16" in message and "above the engine's max rank 8" in message


def test_config_rank_disagrees_with_tensors(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    edit_config(folder, r=128)
    assert "says r=128" in refusal(folder, base_modules)


@pytest.mark.parametrize("dropped,missing", [("lora_B", "no lora_B"), ("lora_A", "no lora_A")])
def test_factor_without_its_partner(dropped, missing, tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    raw = load_file(folder / "adapter_model.safetensors")
    del raw[f"base_model.model.model.layers.0.self_attn.k_proj.{dropped}.weight"]
    save_file(raw, folder / "adapter_model.safetensors")
    message = refusal(folder, base_modules)
    assert "model.layers.0.self_attn.k_proj" in message and missing in message


def test_non_lora_tensor_is_refused(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    raw = load_file(folder / "adapter_model.safetensors")
    raw["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
    save_file(raw, folder / "adapter_model.safetensors")
    assert "'base_model.model.lm_head.weight' is not a LoRA factor" in refusal(folder, base_modules)


# --- hostile adapters --------------------------------------------------------------------------------


def test_non_finite_weights_are_refused(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    assert "NaN or infinite" in refusal(folder, base_modules)


def test_the_issues_backtracking_rank_pattern_no_longer_stalls(tiny_adapters, tmp_path, base_modules):
    """`(.+)+Q` froze the server for seconds per module under `re`; it matches nothing, so the adapter loads."""
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    edit_config(folder, rank_pattern={"(.+)+Q": 16})
    assert load(folder, base_modules).rank == 4


def test_catastrophic_rank_pattern_fails_its_adapter_within_the_budget(tiny_adapters, tmp_path, base_modules):
    """A pattern that backtracks exponentially even in the `regex` engine hits the match budget: a 400."""
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    edit_config(folder, rank_pattern={r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)\10\d": 16})
    started = time.monotonic()
    assert "took longer than" in refusal(folder, base_modules)
    assert time.monotonic() - started < 60  # a hang guard, not a timing assertion: the budget is 1 s of matching


def test_invalid_pattern_regex_is_refused(tiny_adapters, tmp_path, base_modules):
    folder = copy_adapter(tiny_adapters["a"], tmp_path)
    edit_config(folder, alpha_pattern={"q_proj(": 4})
    assert "not a valid regex" in refusal(folder, base_modules)


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapter_config.json"])
def test_file_symlinked_outside_the_root_is_never_opened(file, tiny_adapters, tmp_path, base_modules, audit_opens):
    root = tmp_path / "root"
    folder = copy_adapter(tiny_adapters["a"], root)
    outside = tmp_path / "outside" / file
    outside.parent.mkdir()
    (folder / file).rename(outside)
    (folder / file).symlink_to(outside)

    with audit_opens() as opened:
        with pytest.raises(AdapterValidationError, match="points outside the adapter root"):
            load_peft_adapter(folder, "evil", base_modules, max_rank=64, target_modules=ALL_TARGETS, root=root)
    assert not [path for path in opened if Path(path).name == file and "outside" in str(path)]
