"""Shared pieces of the benchmark scripts: random adapters for a base model, machine description."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn.", "What is a hash map?",
    "Give me three tips for sleeping better.", "Summarize the plot of Hamlet.", "How do vaccines work?",
    "Describe a cat to someone who has never seen one.", "What is the capital of Australia?",
    "Translate 'good morning' into Spanish.", "Why do we have seasons?", "What is recursion?",
    "List some healthy breakfast ideas.", "How does a rainbow form?", "What is machine learning?",
    "Tell me a short joke.", "How do airplanes fly?",
]


def make_random_adapters(base_dir: Path, out_dir: Path, count: int, rank: int = 16) -> dict[str, Path]:
    """`count` PEFT adapters with random non-zero A and B on all 7 projections (speed, not quality)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    made = {}
    for i in range(count):
        folder = out_dir / f"adapter-{i}"
        made[f"adapter-{i}"] = folder
        if (folder / "adapter_config.json").exists():
            continue
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # keep outputs sane: small deltas
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.mul_(0.1)
        peft_model.save_pretrained(folder)
    return made


def machine_line() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def device_label(device: torch.device | str, dtype: torch.dtype) -> str:
    """What a run actually ran on: dtype, device type and, on a GPU, its model (print machine_line() for the CPU)."""
    device = torch.device(device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"{str(dtype).removeprefix('torch.')} on {device.type}{name}"
