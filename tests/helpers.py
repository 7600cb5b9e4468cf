"""Builders for the tiny models and real PEFT adapters the unit tests run on."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorax_mlflow.default_model import default_model_path

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build_tiny_model(folder: Path, seed: int = 0, **config_overrides) -> Path:
    """Save a random 2-layer Llama with the SmolLM2 tokenizer (and its chat template) to `folder`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()
    model.config.name_or_path = "tiny-llama"
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


def build_peft_adapter(
    base_folder: Path,
    folder: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 1,
    targets: list[str] | None = None,
    use_rslora: bool = False,
    safetensors: bool = True,
) -> Path:
    """Make a real PEFT LoRA adapter with random (non-zero) A and B for the model at `base_folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_folder)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets or ALL_TARGETS,
        init_lora_weights=False,
        use_rslora=use_rslora,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(folder, safe_serialization=safetensors)
    return folder


def build_medusa_adapter(
    base_folder: Path,
    folder: Path,
    *,
    num_heads: int = 3,
    num_layers: int = 1,
    out_proj: bool = False,
    seed: int = 0,
    lora_from: Path | None = None,
    layout: str = "own",
    hidden_size: int | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write a LoRAX Medusa adapter with random heads for the model at `base_folder`.

    `layout`: "own" = medusa_lm_head.safetensors; "shared" = the heads inside the LoRA adapter's
    adapter_model.safetensors (needs `lora_from`); "pickle" = the original Medusa's
    medusa_lm_head.pt with ``medusa_head.``-prefixed keys. `lora_from` copies that PEFT adapter in
    too (a LoRA+Medusa adapter). `hidden_size` / `vocab_size` override the base's (another base).
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    config = LlamaConfig.from_pretrained(base_folder)
    hidden = hidden_size or config.hidden_size
    vocab = vocab_size or config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for head in range(num_heads):
        for layer in range(num_layers):
            tensors[f"{head}.{layer}.linear.weight"] = torch.randn(hidden, hidden, generator=generator) * 0.05
            tensors[f"{head}.{layer}.linear.bias"] = torch.randn(hidden, generator=generator) * 0.05
        if out_proj:
            tensors[f"{head}.{num_layers}.weight"] = torch.randn(vocab, hidden, generator=generator) * 0.05
    folder.mkdir(parents=True, exist_ok=True)
    if lora_from is not None:
        for path in lora_from.iterdir():
            shutil.copy(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps({
        "medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
        "base_model_name_or_path": "tiny-llama", "version": 2,
    }))
    if layout == "own":
        save_file(tensors, folder / "medusa_lm_head.safetensors")
    elif layout == "shared":
        shared = folder / "adapter_model.safetensors"
        save_file({**load_file(shared), **tensors}, shared)
    elif layout == "pickle":
        torch.save({f"medusa_head.{key}": value for key, value in tensors.items()}, folder / "medusa_lm_head.pt")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return folder
