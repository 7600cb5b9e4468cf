"""The engine client: the one way every surface (predict, the HTTP server, benchmarks) reaches the engine.

It holds the tokenizer, validates each request's values once (:meth:`EngineClient.validate`),
resolves its adapter (in the core), and owns the output processor that turns the core's per-step
token batches into text and per-request streams.
The core runs in its own process (lorax_mlflow/client/core_process.py) or, with
``EngineConfig.in_process``, on a thread of this one (lorax_mlflow/client/in_process.py).
Streams are sync (``for``) or asyncio (``async for``, pass ``loop``); leaving one early aborts the
request in the core.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from lorax_mlflow.adapters.cache import AdapterRequest, ResolvedAdapter
from lorax_mlflow.client.adapters import AdapterClient
from lorax_mlflow.client.in_process import InProcessCore
from lorax_mlflow.client.output_processor import OutputProcessor
from lorax_mlflow.client.stream import RequestStream
from lorax_mlflow.engine.block_manager import blocks_needed
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.core import EngineCore, EngineStats
from lorax_mlflow.engine.messages import AddRequest, EngineCoreOutputs, EngineInfo, WireConstraint
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import ContextLengthError, EngineUnavailableError, InvalidRequestError

logger = logging.getLogger(__name__)


class EngineClient:
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
        self._core_args = dict(named_adapters=named_adapters or {}, base_model_name=base_model_name)
        self._restart_lock = threading.Lock()
        self._connection = self._start_core()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)  # while the core loads
        self.info: EngineInfo = self._connection.wait_ready()
        self.eos_token_ids = set(self.info.eos_token_ids)
        self.output = OutputProcessor(self.tokenizer, self.eos_token_ids, self._abort_in_core)
        self.adapters = AdapterClient(self._call)

    def _start_core(self) -> InProcessCore | Any:
        if self.config.in_process:
            return InProcessCore(self.model_path, self.config, **self._core_args, on_outputs=self._on_outputs)
        from lorax_mlflow.client.core_process_handle import CoreProcess

        return CoreProcess(self.model_path, self.config, **self._core_args, on_outputs=self._on_outputs,
                           on_death=self._on_core_death)

    def _live_connection(self):
        """The core, restarted first if it died (its requests in flight have already failed)."""
        connection = self._connection
        if connection.alive:
            return connection
        with self._restart_lock:
            if self._connection is connection:
                logger.warning("the engine core is down; starting a new one")
                try:
                    connection = self._start_core()
                    connection.wait_ready()
                    self._connection = connection
                except Exception as error:
                    raise EngineUnavailableError(f"the engine core is down and could not be restarted: {error}") from error
            return self._connection

    @property
    def alive(self) -> bool:
        """Whether the core is running now (a dead one is restarted by the next request)."""
        return self._connection.alive

    @property
    def health(self) -> str | None:
        """None when the core is up, else why it is down."""
        if self._connection.alive:
            return None
        death = getattr(self._connection, "death", None)
        return death.message if death is not None else "the engine core stopped"

    def _call(self, method: str, *args: Any) -> Any:
        return self._live_connection().call(method, *args)

    def _abort_in_core(self, request_id: str, indices: list[int] | None) -> None:
        connection = self._connection
        if connection.alive:
            connection.abort(request_id, indices)

    def _on_core_death(self, error: EngineUnavailableError) -> None:
        self.output.fail_all(error)

    @property
    def core(self) -> EngineCore | None:
        """The core itself in the in-process mode (for tests that look inside), else None."""
        return getattr(self._connection, "core", None)

    @property
    def base_model_name(self) -> str:
        return self.info.base_model_name

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def _on_outputs(self, outputs: EngineCoreOutputs) -> None:
        self.output.process(outputs)

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: ResolvedAdapter | AdapterRequest | None = None,
        *,
        request_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestStream:
        """Validate and start a request; errors that can be known now are raised here, later ones
        (an adapter that fails to load, an unsupported grammar) end its stream."""
        self.validate(prompt_token_ids, params)
        if not isinstance(adapter, ResolvedAdapter):
            adapter = self.adapters.resolve(adapter or AdapterRequest())
        if params.structured_output is not None:  # compiled (and cached) by the core off its loop: a 400 now
            wire = WireConstraint.of(params.structured_output)
            self._call("compile_constraint", wire.kind, wire.fields)
        request_id = request_id or uuid.uuid4().hex
        connection = self._live_connection()
        stream = RequestStream(request_id, self.abort, loop)
        self.output.add(request_id, prompt_token_ids, params, stream, adapter.adapter_id or None)
        try:
            connection.add(AddRequest.of(request_id, prompt_token_ids, params, adapter.key))
        except EngineUnavailableError:
            self.output.forget(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self.output.abort(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(**self._call("stats"))

    def shutdown(self) -> None:
        self._connection.shutdown()

    # ----- validation: what the engine itself must be given -------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """The one check of a request's values, run by :meth:`submit`: SamplingParams ranges, token
        ids inside the vocabulary (prompt, stop_token_ids, logit_bias), the context window and KV
        capacity, batch limits. This client is a public API (benchmarks and tests submit
        SamplingParams directly), so these checks live here rather than in the request builders
        (lorax_mlflow/api/), which check only JSON types (their schemas) and how fields combine."""
        params.validate(self.info.vocab_size)
        self._check_length(prompt, params)
        self._check_engine_limits(params)
        self._check_structured_output(params)

    def _check_length(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.info.vocab_size
        bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:  # an id outside the vocabulary would make the step's embedding lookup raise
            raise InvalidRequestError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        max_model_len = self.info.max_model_len
        total = len(prompt) + params.max_tokens
        if len(prompt) >= max_model_len or total > max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt)} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens" if len(prompt) < max_model_len else "messages",
            )
        if blocks_needed(total, self.info.block_size) > self.info.num_kv_blocks:
            raise ContextLengthError(
                f"the request needs {total} tokens of KV cache but the engine holds "
                f"{self.info.num_kv_blocks * self.info.block_size}",
                param="max_tokens",
            )
        if params.use_beam_search:  # the beams share the prompt's blocks; each may need its own for the rest
            size = self.info.block_size
            needed = len(prompt) // size + params.num_sequences * (blocks_needed(params.max_tokens, size) + 1)
            if needed > self.info.num_kv_blocks:
                raise ContextLengthError(
                    f"a beam search of width {params.num_sequences} over {total} tokens may need {needed} KV blocks "
                    f"but the engine holds {self.info.num_kv_blocks}; lower best_of or max_tokens",
                    param="best_of",
                )

    def _check_engine_limits(self, params: SamplingParams) -> None:
        """A request with more sequences than a batch holds would wait forever: reject it."""
        if params.num_sequences > self.info.max_num_seqs:
            param = "best_of" if params.best_of is not None else "n"
            raise InvalidRequestError(
                f"{param}: this engine runs at most {self.info.max_num_seqs} sequences at once", param=param
            )

    @staticmethod
    def _check_structured_output(params: SamplingParams) -> None:
        fmt = params.structured_output
        if fmt is not None and params.ignore_eos:  # the grammar then allows only EOS, which ignore_eos masks
            raise InvalidRequestError(
                f"ignore_eos cannot be combined with {fmt.param}: the constrained output ends with the EOS token",
                param="ignore_eos",
            )
