"""Tensors only: loads the transformers model with multi-LoRA layers and the paged KV cache, and
runs one packed forward per step over the sequences the scheduler picked (engine/scheduled.py).
It reads their tokens, block tables, adapter slots and prompt-logprob wish; it never sees the
scheduler's queues, the block manager or requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorax_kernels import make_lora_meta
from lorax_kernels.skinny_linear import use_skinny_linears
from lorax_mlflow.engine.attention import register_paged_attention
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.context import attention_context, build_attention_context
from lorax_mlflow.engine.scheduled import ScheduledSequence
from lorax_mlflow.lora.inject import inject_multi_lora, lora_slot_bytes
from lorax_mlflow.lora.routing import LoraRouting, lora_routing

logger = logging.getLogger(__name__)

_CPU_KV_BYTES = 512 << 20
_CUDA_KV_FRACTION = 0.6
_CPU_LORA_BYTES = 1 << 30
_CUDA_LORA_FRACTION = 0.1
_MIN_LORA_SLOTS = 8


@dataclass
class StepLogits:
    last: torch.Tensor
    """[number of sampling items, V] logits of the last token of each scheduled item that samples
    (`ScheduledSequence.samples`), in schedule order; siblings share their parent's values."""
    prompt: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    drafts: dict[int, torch.Tensor] = field(default_factory=dict)
    """seq_id -> [1 + drafts, V] logits after the last token and after each draft, for sequences that
    fed speculative tokens."""
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    """seq_id -> [kept positions, hidden] last hidden states (the lm_head's input) at the logits kept for
    the sequence, when asked for (Medusa heads draft from them); siblings get their parent's."""
    """seq_id -> (position of the first fed token, [num_new_tokens, V] logits at every fed position),
    for sequences that asked for prompt logprobs and fed prompt tokens this step."""


class ModelRunner:
    def __init__(self, model_path: str | Path, config: EngineConfig) -> None:
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        attn_name = register_paged_attention()
        hf_config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=attn_name
        ).to(self.device).eval()
        self.hf_config = self.model.config
        self.max_loras = self._num_lora_slots()
        self.lora_layers = inject_multi_lora(self.model, config.target_modules, self.max_loras, config.max_lora_rank)
        use_skinny_linears(self.model)  # decode-sized GEMMs that split well over threads (lorax_kernels)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        model_max = getattr(hf_config, "max_position_embeddings", None) or 8192
        self.max_model_len = config.max_model_len or min(model_max, 8192)
        self.block_size = config.block_size
        num_kv_heads = getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads
        self.query_group_size = self.hf_config.num_attention_heads // num_kv_heads
        self.kv_cache = self._allocate_kv_cache()
        self.num_blocks = self.kv_cache.shape[2] // self.block_size

    @property
    def base_modules(self) -> dict[str, tuple[int, int]]:
        return {name: (layer.in_features, layer.out_features) for name, layer in self.lora_layers.items()}

    def _num_lora_slots(self) -> int:
        """`max_loras`, or slots sized from memory: on a CPU the device memory is the host's, so many
        adapters can decode in one step instead of queueing for 8 slots (S-LoRA's point on GPUs)."""
        if self.config.max_loras is not None:
            return self.config.max_loras
        per_slot = lora_slot_bytes(self.model, self.config.target_modules, self.config.max_lora_rank)
        budget = self.config.lora_slots_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * _CUDA_LORA_FRACTION)
            else:
                budget = _CPU_LORA_BYTES
        slots = max(_MIN_LORA_SLOTS, min(self.config.max_num_seqs, budget // per_slot))
        logger.info("adapter slots: %d of %.1f MiB (max rank %d)", slots, per_slot / 2**20, self.config.max_lora_rank)
        return slots

    def _allocate_kv_cache(self) -> torch.Tensor:
        cfg = self.hf_config
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_block = cfg.num_hidden_layers * 2 * self.block_size * num_kv_heads * head_dim * self.dtype.itemsize
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * _CUDA_KV_FRACTION)
            else:
                budget = _CPU_KV_BYTES
        num_blocks = max(1, budget // per_block)
        logger.info("KV cache: %d blocks of %d tokens (%.0f MiB)", num_blocks, self.block_size, num_blocks * per_block / 2**20)
        return torch.zeros(
            cfg.num_hidden_layers, 2, num_blocks * self.block_size, num_kv_heads, head_dim,
            dtype=self.dtype, device=self.device,
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole KV blocks (src -> dst) in every layer."""
        if not copies:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + i for s, _ in copies for i in range(bs)], device=self.device)
        dst = torch.tensor([d * bs + i for _, d in copies for i in range(bs)], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSequence], slot_ranks: list[int], keep_hidden: bool = False
    ) -> StepLogits:
        """One packed forward over the new tokens of `scheduled`; `slot_ranks[slot]` = adapter rank per slot.

        One-token rows (decodes) are packed first, then the prefill chunks, as the attention expects;
        each part in order of adapter slot, so that an adapter's rows are one run of the batch (the
        CPU LoRA path batches a step's short runs as views and gives long ones their own GEMMs:
        see `lorax_kernels.run_plan`).
        A sequence with draft tokens feeds them after its last token and keeps the logits at each.
        """
        fed = sorted((item for item in scheduled if item.num_new_tokens > 0),
                     key=lambda item: (item.num_new_tokens > 1, item.seq.lora_slot))
        input_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        keep: list[int] = []
        last_row: dict[int, int] = {}
        prompt_rows: dict[int, tuple[int, range]] = {}
        kept_rows: dict[int, range] = {}
        for item in fed:
            seq, count, drafts = item.seq, item.num_new_tokens, item.draft_token_ids
            start = seq.num_cached_tokens
            offset = len(input_ids)
            first_kept = len(keep)
            input_ids.extend(seq.token_ids[start : start + count - len(drafts)] + drafts)
            positions.extend(range(start, start + count))
            token_slots.extend([seq.lora_slot] * count)
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows[seq.seq_id] = (start, range(len(keep), len(keep) + count))
                keep.extend(range(offset, offset + count))
            elif drafts:
                keep.extend(range(offset + count - len(drafts) - 1, offset + count))
            elif item.samples:
                keep.append(offset + count - 1)
            last_row[seq.seq_id] = len(keep) - 1
            kept_rows[seq.seq_id] = range(first_kept, len(keep))

        attn = build_attention_context(
            self.kv_cache,
            [item.seq.block_table for item in fed],
            [item.seq.num_cached_tokens + item.num_new_tokens for item in fed],
            [item.num_new_tokens for item in fed],
            self.block_size,
            self.query_group_size,
            self.device,
        )
        meta = make_lora_meta(token_slots, self.max_loras, device=self.device)  # host-built, one copy up
        routing = None
        if meta is not None:
            rank = max(slot_ranks[s] for s in set(token_slots) if s >= 0)
            routing = LoraRouting(meta=meta, rank=max(rank, 1))
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep_index = torch.tensor(keep, dtype=torch.long, device=self.device)
        captured: list[torch.Tensor] = []
        hook = None
        if keep_hidden:  # the lm_head's input is the last hidden state whatever the architecture
            hook = self.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            with attention_context(attn), lora_routing(routing):
                logits = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep_index).logits[0]
        finally:
            if hook is not None:
                hook.remove()
        logits = logits.float()
        for item in fed:
            item.seq.num_cached_tokens += item.num_new_tokens
        for item in scheduled:
            if item.logits_from is not None:
                item.seq.num_cached_tokens = item.seq.num_tokens
        rows = [last_row[(item.logits_from or item.seq).seq_id] for item in scheduled if item.samples]
        hidden = {}
        if captured:
            states = captured[0][0]
            hidden = {item.seq.seq_id: states[kept_rows[(item.logits_from or item.seq).seq_id]] for item in scheduled
                      if item.samples}
        return StepLogits(
            last=logits[torch.tensor(rows, dtype=torch.long, device=self.device)],
            prompt={seq_id: (first, logits[r.start : r.stop]) for seq_id, (first, r) in prompt_rows.items()},
            drafts={item.seq.seq_id: logits[kept_rows[item.seq.seq_id]] for item in fed if item.draft_token_ids},
            hidden=hidden,
        )
