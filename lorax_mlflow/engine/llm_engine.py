"""The engine: one loop thread that schedules, runs the model, samples and emits outputs.

Callers on any thread :meth:`submit` requests and read their :class:`RequestStream`; all
scheduler and cache state is touched only by the loop thread, which receives new requests and
aborts through an inbox. A failure inside a step fails the requests of that step, never the loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from lorax_mlflow.adapters.cache import AdapterCache, AdapterRequest, ResolvedAdapter
from lorax_mlflow.adapters.sources import AdapterSources
from lorax_mlflow.default_model import cache_root
from lorax_mlflow.engine.block_manager import BlockManager, blocks_needed
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.detokenizer import IncrementalDetokenizer
from lorax_mlflow.engine.model_runner import ModelRunner
from lorax_mlflow.engine.outputs import TokenLogprob
from lorax_mlflow.engine.request import Request, SequenceOutputState
from lorax_mlflow.engine.sampler import Sampler
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.engine.scheduler import Scheduler
from lorax_mlflow.engine.sequence import Sequence
from lorax_mlflow.engine.stream import RequestStream
from lorax_mlflow.errors import ContextLengthError, InvalidRequestError, LoraxError
from lorax_mlflow.lora.slots import DeviceSlots

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    adapters_in_slots: int


class LLMEngine:
    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig | None = None,
        *,
        named_adapters: dict[str, str | Path] | None = None,
        base_model_name: str | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model_path = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.runner = ModelRunner(model_path, self.config)
        self.base_model_name = base_model_name or self.runner.hf_config.name_or_path or self.model_path.name
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = min(len(self.tokenizer), self.runner.vocab_size)
        """Token ids requests may use and sampling may pick: the tokenizer's, never the padded rows a model's
        output layer may have beyond it (rounded up for GPU tiles)."""
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size)
        self.slots = DeviceSlots(self.runner.lora_layers, self.runner.max_loras)
        download_dir = self.config.download_dir or str(cache_root() / "adapters")
        self.adapters = AdapterCache(
            self.slots,
            self.runner.base_modules,
            base_model_name=self.base_model_name,
            named_adapters=named_adapters or {},
            sources=AdapterSources(
                self.config.adapter_roots, download_dir, s3_allow=self.config.s3_allow,
                max_adapter_bytes=self.config.max_adapter_bytes, verified_token_ttl_s=self.config.verified_token_ttl_s,
            ),
            max_rank=self.config.max_lora_rank,
            target_modules=self.config.target_modules,
            host_cache_bytes=self.config.host_cache_bytes,
            dtype=self.runner.dtype,
            hidden_size=self.runner.hf_config.hidden_size,
            vocab_size=self.runner.vocab_size,
        )
        self.scheduler = Scheduler(self.config, self.block_manager, self.adapters)
        self.eos_token_ids = self._eos_token_ids()
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, self.runner.device)
        self._grammars: Any = None
        self._grammar_lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        generation = getattr(self.runner.model, "generation_config", None)
        for source in (getattr(generation, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # ----- lifecycle --------------------------------------------------------------------------
    def start(self) -> "LLMEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorax-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.adapters.close()

    # ----- caller threads ---------------------------------------------------------------------
    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: ResolvedAdapter | AdapterRequest | None = None,
        *,
        request_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestStream:
        """Validate and enqueue a request; errors that can be known now are raised here."""
        params.validate(self.vocab_size)
        self._check_length(prompt_token_ids, params)
        self._check_engine_limits(params)
        if not isinstance(adapter, ResolvedAdapter):
            adapter = self.adapters.resolve(adapter or AdapterRequest())
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, self.abort, loop)
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            stream=stream,
            adapter_key=adapter.key,
            adapter_id=adapter.adapter_id or None,
        )
        grammar = self._grammar_for(params)
        for index in range(params.num_sequences):
            seq = Sequence(
                request=request,
                index=index,
                token_ids=list(prompt_token_ids),
                num_prompt_tokens=len(prompt_token_ids),
                params=params,
                generator=self._generator(params.seed, index),
                grammar=None if grammar is None else (grammar if index == 0 else grammar.fork()),
            )
            request.sequences.append(seq)
            request.states[seq.seq_id] = SequenceOutputState(
                IncrementalDetokenizer(self.tokenizer, params, prompt_token_ids)
            )
        self._inbox.put(("add", request))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _check_length(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.vocab_size
        bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:  # an id outside the vocabulary would make the step's embedding lookup raise
            raise InvalidRequestError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        total = len(prompt) + params.max_tokens
        if len(prompt) >= self.max_model_len or total > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt)} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens" if len(prompt) < self.max_model_len else "messages",
            )
        if blocks_needed(total, self.config.block_size) > self.block_manager.num_blocks:
            raise ContextLengthError(
                f"the request needs {total} tokens of KV cache but the engine holds "
                f"{self.block_manager.num_blocks * self.config.block_size}",
                param="max_tokens",
            )

    def _check_engine_limits(self, params: SamplingParams) -> None:
        """A request with more sequences than a batch holds would wait forever: reject it."""
        if params.num_sequences > self.config.max_num_seqs:
            param = "best_of" if params.best_of is not None else "n"
            raise InvalidRequestError(
                f"{param}: this engine runs at most {self.config.max_num_seqs} sequences at once", param=param
            )

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        """Sequence `index` of a seeded request draws from `seed + index`: choice i of an `n`/`best_of`
        request generates exactly what a single request with seed `seed + i` would. Seeds are taken
        modulo 2**64, the generator's seed range (torch reads a negative seed that way too)."""
        if seed is None:
            return None
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed((seed + index) % 2**64)
        return generator

    def _grammar_for(self, params: SamplingParams):
        fmt = params.structured_output
        if fmt is None:
            return None
        from lorax_mlflow.structured import GrammarCache

        if params.ignore_eos:  # the grammar then allows only EOS, which ignore_eos masks: nothing is left
            raise InvalidRequestError(
                f"ignore_eos cannot be combined with {fmt.param}: the constrained output ends with the EOS token",
                param="ignore_eos",
            )
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, self.vocab_size, stop_token_ids=sorted(self.eos_token_ids))
        return self._grammars.matcher(fmt)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks,
            adapters_in_slots=len(self.slots.resident),
        )

    # ----- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        threads = self.config.resolved_num_threads()
        if threads:
            torch.set_num_threads(threads)
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.scheduler.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                progressed = self.step()
            except Exception as error:  # a bug or an OOM in one step must not take the engine down
                logger.exception("engine step failed")
                self._fail_running(LoraxError(f"internal error during generation: {error}", code="internal_error"))
                continue
            if not progressed:
                self._wake.wait(0.002)  # only requests waiting for adapter loads
                self._wake.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._requests[payload.request_id] = payload
                self.scheduler.add(payload)
            elif kind == "abort" and payload in self._requests:
                request = self._requests.pop(payload)
                self.scheduler.abort(request)
                request.stream.put(request.take_output())

    def step(self) -> bool:
        """Run one scheduling + forward + sampling step; False when nothing could run."""
        started = time.perf_counter()
        out = self.scheduler.schedule()
        for request, error in out.failed:
            self._fail(request, error)
        if out.is_empty:
            return False
        self.runner.copy_blocks(out.block_copies)
        logits = self.runner.execute(out.scheduled, self.slots.ranks)
        for item in out.scheduled:
            if item.seq.seq_id in logits.prompt:
                self._add_prompt_logprobs(item.seq, *logits.prompt[item.seq.seq_id])
        seqs = [item.seq for item in out.sampling]  # a prefill chunk short of the prompt's end samples nothing
        if seqs:
            self._sample(seqs, logits.last)
        self.scheduler.record_step_time(out, time.perf_counter() - started)
        return True

    def _sample(self, seqs: list[Sequence], last_logits: torch.Tensor) -> None:
        sampled = self.sampler(last_logits, seqs)
        now = time.time()
        touched: dict[str, Request] = {}
        tokens = sampled.token_ids.tolist()
        chosen = sampled.logprobs.tolist()
        for row, seq in enumerate(seqs):
            request = seq.request
            touched[request.request_id] = request
            entry = None
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                top = []
                if k and sampled.top_ids is not None:
                    top = list(zip(sampled.top_ids[row, :k].tolist(), sampled.top_logprobs[row, :k].tolist()))
                entry = TokenLogprob(tokens[row], chosen[row], top)
            self._append_token(seq, tokens[row], chosen[row], entry)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
        for request in touched.values():
            self._emit(request)

    def _add_prompt_logprobs(self, seq: Sequence, first_position: int, logits: torch.Tensor) -> None:
        """Extend the request's prompt logprobs from the logits of one fed chunk (positions from `first_position`).

        Entry i is prompt token i's logprob given its prefix (entry 0 is None), read from the logits
        at position i - 1. Chunks arrive in order; entries already present (a sequence recomputed
        after preemption) are kept as they are.
        """
        request = seq.request
        have = request.prompt_logprobs or [None]
        prompt = seq.prompt_token_ids
        begin = max(first_position, len(have) - 1)
        end = min(first_position + logits.shape[0], len(prompt) - 1)
        if begin >= end:
            request.prompt_logprobs = have
            return
        logprobs = torch.log_softmax(logits[begin - first_position : end - first_position].float(), dim=-1)
        targets = torch.tensor(prompt[begin + 1 : end + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs or 0
        tops = logprobs.topk(k, dim=-1) if k else None
        for i, token in enumerate(prompt[begin + 1 : end + 1]):
            top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
            have.append(TokenLogprob(token, chosen[i], top))
        request.prompt_logprobs = have

    def _append_token(self, seq: Sequence, token: int, logprob: float, entry: TokenLogprob | None) -> None:
        params = seq.params
        state = seq.request.states[seq.seq_id]
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if entry is not None:
            state.logprobs.append(entry)
            state.pending_logprobs.append(entry)
        state.pending_token_ids.append(token)
        if seq.grammar is not None:
            seq.grammar.accept(token)
        reason = None
        is_stop_token = (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
        if is_stop_token:
            reason = "stop"
            if params.include_stop_str_in_output:
                state.pending_text += state.detokenizer.add(token)
        else:
            state.pending_text += state.detokenizer.add(token)
            if state.detokenizer.stop_string is not None or (seq.grammar is not None and seq.grammar.is_terminated()):
                reason = "stop"
        if reason is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            state.pending_text += state.detokenizer.flush()
            self.scheduler.finish(seq, reason)

    def _emit(self, request: Request) -> None:
        if request.finished:
            request.metrics.finished_time = time.time()
            self._requests.pop(request.request_id, None)
            request.stream.put(request.take_output())
        elif request.streams_deltas:
            request.stream.put(request.take_output())

    def _fail(self, request: Request, error: LoraxError) -> None:
        logger.info("request %s failed: %s", request.request_id, error.message)
        self.scheduler.abort(request, reason="error")
        self._requests.pop(request.request_id, None)
        request.stream.put(error)

    def _fail_running(self, error: LoraxError) -> None:
        for seq in list(self.scheduler.running):
            if not seq.request.finished:
                self._fail(seq.request, error)
