"""The demo Medusa adapter of the embedded default model: the "json" demo LoRA plus Medusa heads trained for it.

`lorax-mlflow serve` with no model serves it as ``json-medusa``: the same answers as ``json``, drafted
several tokens at a time. It is a LoRAX Medusa-LoRA folder (the LoRA's ``adapter_config.json`` and
``adapter_model.safetensors`` beside a Medusa ``config.json`` and ``medusa_lm_head.safetensors``), so
it also shows that one adapter id can carry both.

The heads are trained by self-distillation, on the CPU in about a minute: one forward of the model
with the json LoRA merged over its training conversations gives the last hidden state at each answer
position and the model's own greedy next token everywhere; head ``k`` at position ``t`` learns the
token the model itself predicts ``k + 2`` places ahead. Heads start as the identity (zero residual
block, LoRAX's v2 layout that shares the base lm_head) and train only their residual block. The
softmax runs over the tokens the domain uses plus each position's strongest rivals, instead of the
49152-token vocabulary: 20x cheaper, and the heads are checked against the full vocabulary afterwards.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from lorax_mlflow.default_model import DEFAULT_MODEL_NAME, default_model_path
from lorax_mlflow.demo_adapters import (
    TrainingRecipe,
    _collate,
    _tokenize_conversation,
    demo_adapters_dir,
    ensure_demo_adapters,
)
from lorax_mlflow.demo_tasks import DEMO_TASKS, training_conversations

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEMO_MEDUSA_NAME = "json-medusa"
DEMO_MEDUSA_TASK = "json"
_DONE_MARKER = ".lorax-demo-medusa-recipe.json"
_LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class MedusaRecipe:
    """Everything that decides the heads' weights; a cached adapter is reused only if it matches."""

    num_heads: int = 3
    conversations: int = 160
    """Training conversations distilled (a seeded sample of the json task's 294): the forward passes
    over them are most of the training time."""
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 3e-3
    rivals_per_position: int = 8
    """Each position's top tokens under the lm_head join the softmax's candidate tokens."""
    seed: int = 0
    revision: int = 1


@dataclass
class Distillation:
    """What the heads learn from: hidden states at answer positions and the model's tokens ahead of them."""

    hidden: torch.Tensor
    """float32 [N, hidden]: the model's last hidden state (after the final norm) at each answer position."""
    targets: torch.Tensor
    """int64 [N, num_heads]: the model's own greedy token k + 2 places ahead; -1 past the conversation."""


def ensure_demo_medusa(root: Path | None = None, *, recipe: MedusaRecipe | None = None, force: bool = False) -> dict[str, Path]:
    """Return {"json-medusa": folder}, training the heads (and the json LoRA) if not cached with these recipes."""
    recipe = recipe or MedusaRecipe()
    root = demo_adapters_dir() if root is None else Path(root)
    lora_folder = ensure_demo_adapters([DEMO_MEDUSA_TASK], root=root)[DEMO_MEDUSA_TASK]
    folder = root / DEMO_MEDUSA_NAME
    with FileLock(str(root / f".{DEMO_MEDUSA_NAME}.lock")):
        if force or not _is_trained_with(folder, recipe):
            train_demo_medusa(folder, lora_folder, recipe)
    return {DEMO_MEDUSA_NAME: folder}


def train_demo_medusa(folder: Path, lora_folder: Path, recipe: MedusaRecipe = MedusaRecipe()) -> Path:
    """Train Medusa heads for the default model with the LoRA in `lora_folder`; save both at `folder`."""
    started = time.perf_counter()
    model, tokenizer = load_merged(lora_folder)
    conversations = training_conversations(DEMO_TASKS[DEMO_MEDUSA_TASK])
    conversations = random.Random(recipe.seed).sample(conversations, min(recipe.conversations, len(conversations)))
    data = distill(model, [_tokenize_conversation(tokenizer, q, a) for q, a in conversations],
                   recipe.num_heads, tokenizer.pad_token_id)
    lm_head = model.get_output_embeddings().weight.detach()
    weight, bias = train_heads(data, lm_head, recipe)
    quality = head_quality(data, weight, bias, lm_head)
    logger.info("Medusa heads trained in %.1f s; on the training positions: top-1 accuracy per head %s, "
                "%.2f tokens per step", time.perf_counter() - started, [round(a, 3) for a in quality.accuracy],
                quality.tokens_per_step)
    _save(folder, lora_folder, weight, bias, recipe)
    return folder


@torch.inference_mode()
def distill(model: torch.nn.Module, examples: list[tuple[list[int], int]], num_heads: int, pad_id: int,
            batch_size: int = 16) -> Distillation:
    """Hidden states at every answer position and the model's greedy tokens 2 .. num_heads + 1 places ahead."""
    hidden_parts, target_parts = [], []
    examples = sorted(examples, key=lambda example: len(example[0]))  # little padding per batch
    for start in tqdm(range(0, len(examples), batch_size), desc="medusa distillation", unit="batch"):
        batch = examples[start : start + batch_size]
        input_ids, attention_mask, predicts_answer = _collate(batch, pad_id)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # greedy[t]: the model's token t + 1, needed at answer positions only (the lm_head is costly)
        greedy = torch.zeros(input_ids.shape, dtype=torch.long)
        greedy[predicts_answer] = model.lm_head(hidden[predicts_answer]).argmax(dim=-1)
        for row, (ids, _) in enumerate(batch):
            positions = predicts_answer[row].nonzero()[:, 0]  # t = prompt_len - 1 .. len - 2
            last = len(ids) - 2  # the last position whose next token is still part of the conversation
            ahead = positions[:, None] + torch.arange(1, num_heads + 1)[None, :]  # head k: greedy[t + k + 1]
            targets = torch.where(ahead <= last, greedy[row, ahead.clamp(max=last)], -1)
            hidden_parts.append(hidden[row, positions])
            target_parts.append(targets)
    return Distillation(torch.cat(hidden_parts), torch.cat(target_parts))


def _candidates(data: Distillation, lm_head: torch.Tensor, rivals: int) -> torch.Tensor:
    """Sorted token ids the training softmax runs over: every target, plus each position's top rivals."""
    with torch.inference_mode():
        top = torch.cat([(chunk @ lm_head.T).topk(rivals, dim=-1).indices.flatten()
                         for chunk in data.hidden.split(1024)])
    targets = data.targets[data.targets >= 0]
    return torch.unique(torch.cat([targets, top]))


def train_heads(data: Distillation, lm_head: torch.Tensor, recipe: MedusaRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual-block weights [heads, hidden, hidden] and biases [heads, hidden] of the trained heads."""
    torch.manual_seed(recipe.seed)
    num_heads, hidden_size = data.targets.shape[1], data.hidden.shape[1]
    candidates = _candidates(data, lm_head, recipe.rivals_per_position)
    head_rows = lm_head[candidates]  # [C, hidden]
    position_of = torch.full((lm_head.shape[0],), -100, dtype=torch.long)
    position_of[candidates] = torch.arange(len(candidates))
    labels = torch.where(data.targets >= 0, position_of[data.targets.clamp(min=0)], -100)  # ignore_index

    weight = torch.zeros(num_heads, hidden_size, hidden_size, requires_grad=True)
    bias = torch.zeros(num_heads, hidden_size, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=recipe.learning_rate, weight_decay=0.0)
    steps_per_epoch = (len(data.hidden) + recipe.batch_size - 1) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    rng = random.Random(recipe.seed)
    logger.info("Training %d Medusa heads on %d positions, softmax over %d candidate tokens",
                num_heads, len(data.hidden), len(candidates))
    progress = tqdm(range(recipe.epochs), desc="medusa heads", unit="epoch")
    for _ in progress:
        order = list(range(len(data.hidden)))
        rng.shuffle(order)
        for start in range(0, len(order), recipe.batch_size):
            index = torch.tensor(order[start : start + recipe.batch_size])
            x = data.hidden[index]
            out = residual_heads(x, weight, bias)  # [B, heads, hidden]
            logits = out @ head_rows.T
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[index].flatten(), ignore_index=-100)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return weight.detach(), bias.detach()


def residual_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[N, hidden] -> [N, heads, hidden]: each head's one residual block, ``x + silu(x W_k^T + b_k)``."""
    return x[:, None, :] + torch.nn.functional.silu(torch.einsum("nh,kdh->nkd", x, weight) + bias)


@dataclass
class HeadQuality:
    accuracy: list[float]
    """Per head: how often its full-vocabulary argmax is the model's own token (positions where it has one)."""
    tokens_per_step: float
    """Mean tokens a greedy top-1 chain would emit per step: 1 + the heads right in a row from the first."""


@torch.inference_mode()
def head_quality(data: Distillation, weight: torch.Tensor, bias: torch.Tensor, lm_head: torch.Tensor) -> HeadQuality:
    """How well the heads predict the model's own tokens on `data` (teacher forced)."""
    hits = torch.zeros(weight.shape[0])
    counts = torch.zeros(weight.shape[0])
    chain_total = 0.0
    for x, targets in zip(data.hidden.split(512), data.targets.split(512)):
        predicted = (residual_heads(x, weight, bias) @ lm_head.T).argmax(dim=-1)
        valid = targets >= 0
        right = (predicted == targets) & valid
        hits += right.sum(dim=0)
        counts += valid.sum(dim=0)
        chain_total += float(right.long().cumprod(dim=1).sum())
    return HeadQuality((hits / counts.clamp(min=1)).tolist(), 1.0 + chain_total / max(len(data.hidden), 1))


def load_merged(lora_folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The default model with the LoRA in `lora_folder` merged in, and its tokenizer: what the heads draft for."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = default_model_path()
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, lora_folder).merge_and_unload().eval(), AutoTokenizer.from_pretrained(model_path)


def _recipes(recipe: MedusaRecipe) -> dict:
    return {"medusa": asdict(recipe), "lora": asdict(TrainingRecipe())}


def _is_trained_with(folder: Path, recipe: MedusaRecipe) -> bool:
    marker = folder / _DONE_MARKER
    return marker.exists() and json.loads(marker.read_text()) == _recipes(recipe)


def _save(folder: Path, lora_folder: Path, weight: torch.Tensor, bias: torch.Tensor, recipe: MedusaRecipe) -> None:
    """Write the Medusa-LoRA folder next to `folder` and move it into place only once complete."""
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in _LORA_FILES:
        shutil.copy(lora_folder / name, partial / name)
    tensors = {}
    for head in range(weight.shape[0]):
        tensors[f"{head}.0.linear.weight"] = weight[head].contiguous()
        tensors[f"{head}.0.linear.bias"] = bias[head].contiguous()
    save_file(tensors, partial / "medusa_lm_head.safetensors")
    (partial / "config.json").write_text(json.dumps({
        "medusa_num_heads": weight.shape[0], "medusa_num_layers": 1,
        "base_model_name_or_path": DEFAULT_MODEL_NAME, "version": 2,
    }))
    (partial / _DONE_MARKER).write_text(json.dumps(_recipes(recipe)))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
