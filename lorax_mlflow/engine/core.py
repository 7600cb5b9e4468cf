"""The engine core: schedule, execute, sample; nothing per request that is not tensors or tokens.

It owns the model runner, the paged KV cache's block manager, the scheduler, the adapter cache and
its device slots, the sampler and the grammar matchers. :meth:`step` runs one step and returns a
compact batch of what happened to each request in it (new token ids, their logprobs, finish
reasons, errors); turning tokens into text, stop strings and streams are the client's job
(lorax_mlflow/client). Every method except :meth:`utility` runs on the core's loop thread;
:meth:`utility` answers adapter resolution and stats from other threads (the adapter cache is
thread-safe, stats are a snapshot of counters).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from lorax_mlflow.adapters.cache import AdapterCache, AdapterRequest, ResolvedAdapter
from lorax_mlflow.adapters.merge import MergeSpec
from lorax_mlflow.adapters.sources import AdapterSources
from lorax_mlflow.default_model import cache_root
from lorax_mlflow.engine.beam import BeamSearch
from lorax_mlflow.engine.block_manager import BlockManager
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.messages import (
    AddRequest, EngineCoreOutputs, EngineInfo, RequestDelta, SequenceDelta, WireConstraint, WireError,
)
from lorax_mlflow.engine.model_runner import ModelRunner
from lorax_mlflow.engine.request import Request
from lorax_mlflow.engine.sampler import Sampler
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.engine.scheduled import ScheduledSequence
from lorax_mlflow.engine.scheduler import Scheduler
from lorax_mlflow.engine.sequence import Sequence
from lorax_mlflow.engine.speculative import Speculator, VerifiedRow
from lorax_mlflow.errors import EngineStepError, LoraxError
from lorax_mlflow.lora.slots import DeviceSlots

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    adapters_in_slots: int
    num_steps: int
    """Forward steps run since the core started."""
    speculative_draft_tokens: dict[str, int] = field(default_factory=dict)
    """Draft tokens verified, by adapter id ("" = base-model requests)."""
    speculative_accepted_tokens: dict[str, int] = field(default_factory=dict)


class EngineCore:
    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig | None = None,
        *,
        named_adapters: dict[str, str | Path] | None = None,
        base_model_name: str | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.runner = ModelRunner(model_path, self.config)
        self.base_model_name = base_model_name or self.runner.hf_config.name_or_path or Path(model_path).name
        self.vocab_size = min(len(self.tokenizer), self.runner.vocab_size)
        """Token ids requests may use and sampling may pick: the tokenizer's, never the padded rows a model's
        output layer may have beyond it (rounded up for GPU tiles)."""
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.config.block_size, enable_prefix_caching=self.config.enable_prefix_caching
        )
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
        self.speculator = self._speculator()
        self._grammars: Any = None
        self._grammar_lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self.num_steps = 0

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        generation = getattr(self.runner.model, "generation_config", None)
        for source in (getattr(generation, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def info(self) -> EngineInfo:
        return EngineInfo(
            base_model_name=self.base_model_name,
            vocab_size=self.vocab_size,
            max_model_len=self.runner.max_model_len,
            num_kv_blocks=self.block_manager.num_blocks,
            block_size=self.config.block_size,
            max_num_seqs=self.config.max_num_seqs,
            eos_token_ids=sorted(self.eos_token_ids),
        )

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def _speculator(self) -> Speculator:
        default_heads = None
        if self.config.speculative_adapter:
            weights = self.adapters.load_now(AdapterRequest(self.config.speculative_adapter))
            if weights.medusa is None:
                raise ValueError(f"speculative_adapter {self.config.speculative_adapter!r} has no Medusa heads")
            default_heads = weights.medusa.to(self.runner.device)
        return Speculator(
            self.config.speculative_tokens,
            self.config.speculative_max_batch_size,
            self.slots.medusa,
            default_heads,
            self.runner.model.get_output_embeddings().weight[: self.vocab_size],
            self.runner.max_model_len,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks,
            adapters_in_slots=len(self.slots.resident),
            num_steps=self.num_steps,
            speculative_draft_tokens=dict(self.speculator.counters.proposed),
            speculative_accepted_tokens=dict(self.speculator.counters.accepted),
        )

    def utility(self, method: str, args: list[Any]) -> Any:
        """The calls a client makes off the step loop, with plain data in and out."""
        if method == "resolve_adapter":
            (fields,) = args
            merged = fields.get("merged_adapters")
            spec = None if not merged else MergeSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})
            request = AdapterRequest(**{**fields, "merged_adapters": spec})
            resolved = self.adapters.resolve(request)
            return {"key": resolved.key, "adapter_id": resolved.adapter_id,
                    "folder": None if resolved.folder is None else str(resolved.folder)}
        if method == "wait_adapter_loaded":
            (fields,) = args
            self.adapters.wait_loaded(ResolvedAdapter(fields["key"], fields["adapter_id"]))
            return None
        if method == "add_adapter_name":
            self.adapters.add_name(*args)
            return None
        if method == "remove_adapter_name":
            self.adapters.remove_name(*args)
            return None
        if method == "compile_constraint":
            kind, fields = args
            self._grammar_cache().compiled(WireConstraint(kind, fields).to_constraint())
            return None
        if method == "adapter_host_capacity":
            return self.adapters.host_capacity()
        if method == "known_adapter_ids":
            return self.adapters.known_adapter_ids()
        if method == "adapter_stats":
            return {adapter_id: asdict(stats) for adapter_id, stats in self.adapters.adapter_stats().items()}
        if method == "stats":
            return asdict(self.stats())
        raise ValueError(f"unknown utility method {method!r}")

    # ----- loop thread ------------------------------------------------------------------------
    def add_request(self, message: AddRequest) -> RequestDelta | None:
        """Queue a request; a request that cannot start (its grammar fails to compile) fails here."""
        try:
            params = message.sampling_params()
            grammar = self._grammar_for(params)
        except LoraxError as error:
            return RequestDelta(message.request_id, error=WireError.of(error))
        request = Request(message.request_id, list(message.prompt_token_ids), params)
        if params.use_beam_search:
            head = Sequence(message.request_id, list(message.prompt_token_ids), len(message.prompt_token_ids), params,
                            adapter_key=message.adapter_key)
            request.sequences = BeamSearch.of(head, self.eos_token_ids, self.runner.max_model_len).live
        for index in range(0 if params.use_beam_search else params.num_sequences):
            request.sequences.append(Sequence(
                request_id=request.request_id,
                token_ids=list(message.prompt_token_ids),
                num_prompt_tokens=len(message.prompt_token_ids),
                params=params,
                adapter_key=message.adapter_key,
                generator=self._generator(params.seed, index),
                grammar=None if grammar is None else (grammar if index == 0 else grammar.fork()),
            ))
        self._requests[request.request_id] = request
        self.scheduler.add(request.sequences)
        return None

    def abort_request(self, request_id: str, indices: list[int] | None = None) -> None:
        """Stop a request (the caller left) or some of its sequences (a stop string matched); frees their
        KV blocks and adapter slots now. Unknown ids are ignored: the request may have just finished."""
        request = self._requests.get(request_id)
        if request is None:
            return
        sequences = request.sequences if indices is None else [request.sequences[i] for i in indices]
        self.scheduler.abort(sequences)
        if request.finished:
            del self._requests[request_id]

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
        return self._grammar_cache().matcher(fmt)

    def _grammar_cache(self):
        """Compiled grammars, shared by the loop and the utility calls that compile ahead of a request."""
        with self._grammar_lock:
            if self._grammars is None:
                from lorax_mlflow.structured import GrammarCache

                self._grammars = GrammarCache(self.tokenizer, self.vocab_size,
                                              stop_token_ids=sorted(self.eos_token_ids),
                                              compile_timeout_s=self.config.grammar_compile_timeout_s)
            return self._grammars

    def step(self) -> tuple[EngineCoreOutputs, bool]:
        """Run one schedule + forward + sample step.

        Returns what happened to each request touched (new tokens, finishes, failures) and whether
        a forward ran (False when nothing could: only requests waiting for adapter loads).
        """
        started = time.perf_counter()
        out = self.scheduler.schedule()
        now = time.time()
        deltas: dict[str, RequestDelta] = {}
        for request_id, error in out.failed:
            deltas[request_id] = self._fail(request_id, error)
        if out.is_empty:
            return EngineCoreOutputs(now, list(deltas.values())), False
        for item in out.scheduled:
            request = self._requests[item.seq.request_id]
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                delta = self._delta(deltas, request)
                delta.first_scheduled_time = now
                delta.num_cached_tokens = request.sequences[0].num_cached_prompt_tokens or 0
        self.num_steps += 1
        self.runner.copy_blocks(out.block_copies)
        try:
            self._forward_and_sample(out.scheduled, deltas)
        except Exception as error:  # noqa: BLE001 - isolated below: only the failing request(s) fail
            logger.warning("engine step failed (%s: %s); running its requests one at a time", type(error).__name__,
                           error)
            self.scheduler.step_failed()  # its prefix-cache blocks may hold no K/V: never reuse them
            self._run_isolated(out.scheduled, deltas)
        for request_id in deltas:
            request = self._requests.get(request_id)
            if request is not None and request.finished:
                del self._requests[request_id]
        if out.sampling:  # reading sampled tokens waits for the device: only such steps' times are real on CUDA
            self.scheduler.record_step_time(out, time.perf_counter() - started)
        return EngineCoreOutputs(now, list(deltas.values())), True

    def _forward_and_sample(self, scheduled: list[ScheduledSequence], deltas: dict[str, RequestDelta]) -> None:
        """One packed forward over `scheduled`, then sampling (and draft verification) for the items that sample.

        A sequence changes only when its tokens are emitted (and an error there fails only its own
        request, see `_emit_tokens`), and re-running a forward rewrites the same KV slots, so after a
        failure the requests that emitted nothing yet can be run again on their own."""
        seqs = [item.seq for item in scheduled if item.samples]  # a prefill chunk short of the prompt's end samples nothing
        sampled = [seq for seq in seqs if seq.beam is None]
        logits = self.runner.execute(scheduled, self.slots.ranks, self.speculator.needs_hidden(sampled))
        for item in scheduled:
            if item.seq.seq_id in logits.prompt:
                self._add_prompt_logprobs(item.seq, *logits.prompt[item.seq.seq_id])
        plain = [row for row, seq in enumerate(seqs) if seq.seq_id not in logits.drafts and seq.beam is None]
        if plain:
            rows = plain if len(plain) < len(seqs) else slice(None)
            self._sample([seqs[row] for row in plain], logits.last[rows], deltas)
        accepted = self._accept_drafts([seq for seq in seqs if seq.seq_id in logits.drafts], logits.drafts, deltas)
        if self.speculator.enabled:
            self.speculator.propose(sampled, logits.hidden, accepted, len(self.scheduler.running))
        if len(sampled) < len(seqs):  # last: a search that advanced cannot run this step again
            self._step_beams(seqs, logits.last, deltas)

    def _run_isolated(self, scheduled: list[ScheduledSequence], deltas: dict[str, RequestDelta]) -> None:
        """After a failed step: run each request's part of it alone; a request whose part fails again
        fails with a 500, every other request gets exactly the token it would have had."""
        by_request: dict[str, list[ScheduledSequence]] = {}
        for item in scheduled:
            by_request.setdefault(item.seq.request_id, []).append(item)
        for request_id, items in by_request.items():
            delta = deltas.get(request_id)
            if request_id not in self._requests or (delta is not None and delta.sequences):
                continue  # failed already, or its tokens were emitted before the failure
            try:
                self._forward_and_sample(items, deltas)
            except Exception as error:  # noqa: BLE001 - attributed to this request only
                logger.exception("request %s failed inside an engine step", request_id)
                deltas[request_id] = self._fail(request_id, EngineStepError(
                    f"internal error while generating this request: {type(error).__name__}: {error}"))

    def _sample(self, seqs: list[Sequence], last_logits: torch.Tensor, deltas: dict[str, RequestDelta]) -> None:
        sampled = self.sampler(last_logits, seqs)
        tokens = sampled.token_ids.tolist()
        chosen = sampled.logprobs.tolist()
        top_ids = top_logprobs = None
        if sampled.top_ids is not None:
            top_ids, top_logprobs = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
        for row, seq in enumerate(seqs):
            k = seq.params.logprobs or 0
            top = [list(zip(top_ids[row][:k], top_logprobs[row][:k]))] if k and top_ids is not None else None
            self._emit_tokens(seq, VerifiedRow([tokens[row]], [chosen[row]], top, 0, 0), deltas)

    def _step_beams(self, seqs: list[Sequence], last_logits: torch.Tensor, deltas: dict[str, RequestDelta]) -> None:
        """Advance each beam search whose beams ran (row i of `last_logits` is `seqs[i]`'s); a search that
        ends sends its n best beams whole."""
        row_of = {seq: row for row, seq in enumerate(seqs)}
        searches = list(dict.fromkeys(seq.beam for seq in seqs if seq.beam is not None))
        for search in searches:
            request = self._requests.get(search.head.request_id)
            if request is None:  # failed by an earlier row of this step
                continue
            try:
                rows = torch.tensor([row_of[seq] for seq in search.live], device=last_logits.device)
                chosen = search.select(last_logits[rows, : self.vocab_size])
                self.scheduler.advance_beams(search, chosen)
            except Exception as error:  # noqa: BLE001 - this request only
                logger.exception("request %s failed in a beam search step", request.request_id)
                deltas[request.request_id] = self._fail(request.request_id, EngineStepError(
                    f"internal error while generating this request: {type(error).__name__}: {error}"))
                continue
            if search.done:
                delta = self._delta(deltas, request)
                delta.sequences = [SequenceDelta(index, hypothesis.token_ids, hypothesis.logprobs, hypothesis.top,
                                                 hypothesis.finish_reason)
                                   for index, hypothesis in enumerate(search.best())]
                delta.prompt_logprobs = request.prompt_logprobs

    def _accept_drafts(
        self, seqs: list[Sequence], logits: dict[int, torch.Tensor], deltas: dict[str, RequestDelta]
    ) -> dict[int, int]:
        """Verify the drafts `seqs` fed, emit what each keeps, roll back the KV of the rejected drafts.

        Returns seq_id -> drafts accepted (the Medusa heads draft next from that position).
        """
        if not seqs:
            return {}
        accepted = {}
        for seq, verified in zip(seqs, self.speculator.verify(self.sampler, seqs, [logits[s.seq_id] for s in seqs])):
            self.speculator.counters.add(self.adapters.adapter_id_of(seq.adapter_key), verified.num_drafts,
                                         verified.num_accepted)
            accepted[seq.seq_id] = verified.num_accepted
            self._emit_tokens(seq, verified, deltas)
            if not seq.is_finished:
                seq.num_cached_tokens = seq.num_tokens - 1  # K/V of the emitted tokens but the last
                self.block_manager.release_draft_blocks(seq)
        return accepted

    def _emit_tokens(self, seq: Sequence, row: VerifiedRow, deltas: dict[str, RequestDelta]) -> None:
        """Append a step's tokens for `seq` (one, or several after speculation) until it finishes."""
        request = self._requests.get(seq.request_id)
        if request is None:  # failed by an earlier row of this step
            return
        delta = self._delta(deltas, request)
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            request.prompt_logprobs_sent = True  # complete: the prompt's last chunk ran
            delta.prompt_logprobs = request.prompt_logprobs
        reason, count = None, 0
        try:
            for token, logprob in zip(row.token_ids, row.logprobs):
                count += 1
                reason = self._append_token(seq, token, logprob)
                if reason is not None:
                    break
        except Exception as error:  # noqa: BLE001 - e.g. a grammar rejecting the token: this request only
            logger.exception("request %s failed appending a token", seq.request_id)
            deltas[seq.request_id] = self._fail(seq.request_id, EngineStepError(
                f"internal error while generating this request: {type(error).__name__}: {error}"))
            return
        delta.sequences.append(SequenceDelta(
            request.index_of(seq), row.token_ids[:count], row.logprobs[:count],
            row.top[:count] if row.top else None, reason, row.num_drafts, row.num_accepted,
        ))

    @staticmethod
    def _delta(deltas: dict[str, RequestDelta], request: Request) -> RequestDelta:
        delta = deltas.get(request.request_id)
        if delta is None:
            delta = deltas[request.request_id] = RequestDelta(request.request_id, [])
        return delta

    def _append_token(self, seq: Sequence, token: int, logprob: float) -> str | None:
        """Append a sampled token; finish the sequence (and return why) on a stop token, a complete
        grammar, max_tokens or the context window. Stop strings are the client's to find."""
        params = seq.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.grammar is not None:
            seq.grammar.accept(token)
        reason = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif seq.grammar is not None and seq.grammar.is_terminated():
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.runner.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return reason

    def _add_prompt_logprobs(self, seq: Sequence, first_position: int, logits: torch.Tensor) -> None:
        """Extend the request's prompt logprobs from the logits of one fed chunk (positions from `first_position`).

        Entry i is prompt token i's (token, logprob, top) given its prefix (entry 0 is None), read from
        the logits at position i - 1. Chunks arrive in order; entries already present (a sequence
        recomputed after preemption) are kept as they are.
        """
        request = self._requests[seq.request_id]
        have = request.prompt_logprobs or [None]
        prompt = seq.prompt_token_ids
        begin = max(first_position, len(have) - 1)
        end = min(first_position + logits.shape[0], len(prompt) - 1)
        if begin < end:
            logprobs = torch.log_softmax(logits[begin - first_position : end - first_position].float(), dim=-1)
            targets = torch.tensor(prompt[begin + 1 : end + 1], device=logprobs.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            k = seq.params.prompt_logprobs or 0
            tops = logprobs.topk(k, dim=-1) if k else None
            for i, token in enumerate(prompt[begin + 1 : end + 1]):
                top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
                have.append((token, chosen[i], top))
        request.prompt_logprobs = have

    def _fail(self, request_id: str, error: LoraxError) -> RequestDelta:
        logger.info("request %s failed: %s", request_id, error.message)
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request.sequences, reason="error")
        return RequestDelta(request_id, error=WireError.of(error))

    def fail_running(self, error: LoraxError) -> EngineCoreOutputs:
        """After a step raised: fail the requests that were running (they may hold half-updated state)
        and forget the prefix-cache blocks that step was to compute."""
        self.scheduler.step_failed()
        failed = {seq.request_id for seq in self.scheduler.running}
        return EngineCoreOutputs(time.time(), [self._fail(request_id, error) for request_id in failed])

    def shutdown(self) -> None:
        self.adapters.close()
