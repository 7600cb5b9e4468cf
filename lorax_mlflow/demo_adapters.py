"""Demo LoRA adapters for the embedded default model, trained on the CPU the first time they are needed.

`lorax-mlflow serve` with no model serves SmolLM2-135M-Instruct with these adapters, so a user
sees at once that the adapter id changes the answer: "pirate" talks like a pirate, "json" answers
with a JSON object, "french" answers in French. Training takes about a minute per adapter on a
small CPU; the result is a standard PEFT folder cached next to the converted default model.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from lorax_mlflow.default_model import DEFAULT_MODEL_NAME, cache_root, default_model_path
from lorax_mlflow.demo_tasks import DEMO_TASKS, HELD_OUT_PROMPTS, DemoTask, marker_rate_of, training_conversations

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEMO_ADAPTERS: dict[str, DemoTask] = DEMO_TASKS
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DONE_MARKER = ".lorax-demo-recipe.json"
Example = tuple[list[int], int]  # token ids of a conversation, number of prompt tokens


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that decides an adapter's weights; a cached adapter is reused only if it matches."""

    steps: int = 30
    batch_size: int = 4
    learning_rate: float = 2e-3
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    revision: int = 2  # bumped whenever the training code changes what is saved


def demo_adapters_dir() -> Path:
    """Where trained demo adapters are cached, one PEFT folder per name."""
    return cache_root() / "demo-adapters"


def held_out_prompts(name: str) -> list[str]:
    """User prompts that the adapter `name` never saw in training."""
    _task(name)
    return list(HELD_OUT_PROMPTS)


def marker_rate(name: str, texts: Sequence[str]) -> float:
    """Fraction of generated `texts` that show the behaviour of demo adapter `name`."""
    return marker_rate_of(_task(name), texts)


def ensure_demo_adapters(
    names: Iterable[str] | None = None,
    *,
    steps: int | None = None,
    root: Path | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Return name -> PEFT folder for the demo adapters, training those not cached yet (or all, if `force`).

    Safe to call from several processes at once: each adapter is trained under a file lock,
    into a temporary folder that is renamed into place when complete.
    """
    names = list(DEMO_ADAPTERS if names is None else names)
    for name in names:
        _task(name)
    recipe = TrainingRecipe() if steps is None else TrainingRecipe(steps=steps)
    root = demo_adapters_dir() if root is None else Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name in names:
        folder = root / name
        with FileLock(str(root / f".{name}.lock")):
            if force or not _is_trained_with(folder, recipe):
                train_demo_adapter(name, folder, recipe)
        folders[name] = folder
    return folders


def train_demo_adapter(name: str, folder: Path, recipe: TrainingRecipe = TrainingRecipe()) -> Path:
    """Train demo adapter `name` on the default model and save it as a PEFT folder at `folder`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = _task(name)
    started = time.perf_counter()
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(recipe.seed)
    lora = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.peft_config["default"].base_model_name_or_path = DEFAULT_MODEL_NAME  # not the local folder
    model.train()
    examples = [_tokenize_conversation(tokenizer, q, a) for q, a in training_conversations(task)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / recipe.steps)
    logger.info("Training demo adapter %r: %d examples, %s", name, len(examples), recipe)

    batches = _batches(examples, recipe.batch_size, random.Random(recipe.seed))
    progress = tqdm(range(recipe.steps), desc=f"demo adapter {name}", unit="step")
    for _ in progress:
        loss = _assistant_loss(base, *_collate(next(batches), tokenizer.pad_token_id))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")

    _save(model, folder, recipe)
    logger.info("Demo adapter %r trained in %.1f s -> %s", name, time.perf_counter() - started, folder)
    return folder


def load_with_adapters(adapters: dict[str, Path]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The default model with every adapter in `adapters` loaded under its name (PEFT), for evaluation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not adapters:
        raise ValueError("no adapters to load")
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    (first, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.eval(), tokenizer


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 40,
    batch_size: int = 16,
) -> list[str]:
    """Greedy chat replies to single-turn user `prompts`, batched with left padding."""
    replies = []
    for start in range(0, len(prompts), batch_size):
        texts = [_render_prompt(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies


def _task(name: str) -> DemoTask:
    try:
        return DEMO_ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown demo adapter {name!r}; known: {', '.join(DEMO_ADAPTERS)}") from None


def _is_trained_with(folder: Path, recipe: TrainingRecipe) -> bool:
    marker = folder / _DONE_MARKER
    return marker.exists() and json.loads(marker.read_text()) == asdict(recipe)


def _render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _tokenize_conversation(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> Example:
    """Token ids of the rendered conversation, and how many of them belong to the prompt."""
    prompt = _render_prompt(tokenizer, question)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def _batches(examples: list[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Endless batches: each epoch is a fresh seeded shuffle of `examples`."""
    while True:
        order = list(examples)
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of the positions whose next token is an answer token."""
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    predicts_answer = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, (ids, prompt_len) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        predicts_answer[row, prompt_len - 1 : len(ids) - 1] = True
    return input_ids, attention_mask, predicts_answer


def _assistant_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, predicts_answer: torch.Tensor
) -> torch.Tensor:
    """Next-token loss on the answer tokens only; the vocabulary projection runs only where it is needed."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.lm_head(hidden[predicts_answer])
    targets = input_ids[:, 1:][predicts_answer[:, :-1]]
    return torch.nn.functional.cross_entropy(logits, targets)


def _save(model: torch.nn.Module, folder: Path, recipe: TrainingRecipe) -> None:
    """Write the PEFT folder next to `folder` and move it into place only once complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    (partial / _DONE_MARKER).write_text(json.dumps(asdict(recipe)))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
