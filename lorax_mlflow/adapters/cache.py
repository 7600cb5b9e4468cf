"""The tiered adapter cache: device slots <- host memory (LRU, byte budget) <- local disk.

Callers' threads resolve an adapter id to a local folder (downloading it if needed) and start
loading its weights on a worker thread; the engine thread then asks for a device slot with
:meth:`acquire`, which answers None while the weights are still loading, so a request waits for
its adapter without blocking anyone else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lorax_mlflow.adapters.merge import MergeSpec, merge_adapters
from lorax_mlflow.adapters.peft_format import load_peft_adapter
from lorax_mlflow.adapters.sources import AdapterLocation, AdapterSources, parse_adapter_id
from lorax_mlflow.adapters.weights import LoraWeights
from lorax_mlflow.errors import LoraxError
from lorax_mlflow.lora.slots import DeviceSlots

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRequest:
    """What a request says about its adapter (LoRAX fields)."""

    adapter_id: str = ""
    adapter_source: str | None = None
    api_token: str | None = None
    merged_adapters: MergeSpec | None = None


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter the caller may use: its cache key (None = base model) and local folder."""

    key: str | None
    adapter_id: str = ""
    folder: Path | None = None


@dataclass
class AdapterStats:
    loads: int = 0
    load_seconds: float = 0.0
    host_hits: int = 0
    slot_hits: int = 0


class AdapterCache:
    def __init__(
        self,
        slots: DeviceSlots,
        base_modules: Mapping[str, tuple[int, int]],
        *,
        base_model_name: str,
        named_adapters: Mapping[str, str | Path],
        sources: AdapterSources,
        max_rank: int,
        target_modules: tuple[str, ...],
        host_cache_bytes: int,
        dtype: torch.dtype,
    ) -> None:
        self.slots = slots
        self.base_modules = dict(base_modules)
        self.base_model_name = base_model_name
        self.named = {name: Path(path) for name, path in named_adapters.items()}
        self.sources = sources
        self.max_rank = max_rank
        self.target_modules = target_modules
        self.host_cache_bytes = host_cache_bytes
        self.dtype = dtype
        self.stats = AdapterStats()
        self._host: OrderedDict[str, LoraWeights] = OrderedDict()
        self._folders: dict[str, Path] = {}
        self._loading: dict[str, Future] = {}
        self._loaders: dict[str, Callable[[], LoraWeights]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")

    # ----- caller threads -------------------------------------------------------------------
    def is_base(self, adapter_id: str) -> bool:
        return adapter_id in ("", self.base_model_name)

    def resolve(self, request: AdapterRequest) -> ResolvedAdapter:
        """Check access, fetch to disk if needed and start loading the weights (off this thread)."""
        if request.merged_adapters is not None:
            spec = request.merged_adapters
            for adapter_id in spec.ids:
                self.resolve(AdapterRequest(adapter_id, request.adapter_source, request.api_token))
            key = f"merge:{spec.recipe_key()}"
            self._start_load(key, lambda: self._load_merged(spec, request))
            return ResolvedAdapter(key, adapter_id=key)
        if self.is_base(request.adapter_id):
            return ResolvedAdapter(None)
        key, folder = self._locate(request)
        self._start_load(key, lambda: self._load_folder(key, folder, request.adapter_id))
        return ResolvedAdapter(key, adapter_id=request.adapter_id, folder=folder)

    def wait_loaded(self, resolved: ResolvedAdapter, timeout: float | None = None) -> None:
        """Block until the adapter's weights are in host memory; raise its load error, if any."""
        if resolved.key is None:
            return
        with self._lock:
            future = self._loading.get(resolved.key)
        if future is not None:
            future.result(timeout=timeout)

    def known_adapter_ids(self) -> list[str]:
        with self._lock:
            fetched = [key.split(":", 1)[1] for key in self._folders if not key.startswith("name:")]
        return sorted({*self.named, *fetched})

    def _locate(self, request: AdapterRequest) -> tuple[str, Path]:
        if request.adapter_id in self.named and request.adapter_source in (None, "local"):
            key = f"name:{request.adapter_id}"
            folder = self.named[request.adapter_id]
        else:
            location = parse_adapter_id(request.adapter_id, request.adapter_source)
            key = self._key(location)
            self.sources.check_access(location, request.api_token)
            with self._lock:
                folder = self._folders.get(key)
            if folder is None:
                folder = self.sources.fetch(location, request.api_token)
        with self._lock:
            self._folders[key] = folder
        return key, folder

    @staticmethod
    def _key(location: AdapterLocation) -> str:
        suffix = f"@{location.revision}" if location.revision else ""
        return f"{location.source}:{location.path}{suffix}"

    def _start_load(self, key: str, load: Callable[[], LoraWeights]) -> None:
        with self._lock:
            self._loaders[key] = load
            if key in self._host or key in self._loading:
                return
            self._loading[key] = self._executor.submit(load)

    def _load_folder(self, key: str, folder: Path, name: str) -> LoraWeights:
        started = time.perf_counter()
        weights = load_peft_adapter(
            folder, name, self.base_modules, max_rank=self.max_rank, target_modules=self.target_modules,
            dtype=self.dtype,
        )
        self._record_load(time.perf_counter() - started)
        return weights

    def _load_merged(self, spec: MergeSpec, request: AdapterRequest) -> LoraWeights:
        parts = []
        for adapter_id in spec.ids:
            key, folder = self._locate(AdapterRequest(adapter_id, request.adapter_source, request.api_token))
            with self._lock:
                cached = self._host.get(key)
            parts.append(cached if cached is not None else self._load_folder(key, folder, adapter_id))
        return merge_adapters(parts, spec)

    def _record_load(self, seconds: float) -> None:
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += seconds

    # ----- engine thread --------------------------------------------------------------------
    def acquire(self, key: str | None) -> int | None:
        """Pin a device slot for `key`: -1 for the base model, None while loading or no slot is free."""
        if key is None:
            return -1
        slot = self.slots.lookup(key)
        if slot is None:
            weights = self._host_weights(key)
            if weights is None:
                return None
            slot = self.slots.place(key, weights)
            if slot is None:
                return None
        else:
            self.stats.slot_hits += 1
        self.slots.pin(slot)
        return slot

    def release(self, slot: int) -> None:
        self.slots.unpin(slot)

    def slot_rank(self, slot: int) -> int:
        return self.slots.ranks[slot]

    def _host_weights(self, key: str) -> LoraWeights | None:
        with self._lock:
            weights = self._host.get(key)
            if weights is not None:
                self._host.move_to_end(key)
                self.stats.host_hits += 1
                return weights
            future = self._loading.get(key)
        if future is None:  # evicted from host memory before it reached a slot: load it again
            self._start_load(key, self._loaders[key])
            return None
        if not future.done():
            return None
        with self._lock:
            self._loading.pop(key, None)
        error = future.exception()
        if error is not None:
            if isinstance(error, LoraxError):
                raise error
            raise LoraxError(f"adapter {key!r} failed to load: {error}") from error
        weights = future.result()
        self._insert_host(key, weights)
        return weights

    def _insert_host(self, key: str, weights: LoraWeights) -> None:
        with self._lock:
            self._host[key] = weights
            total = sum(w.nbytes for w in self._host.values())
            while total > self.host_cache_bytes and len(self._host) > 1:
                evicted_key, evicted = self._host.popitem(last=False)
                total -= evicted.nbytes
                logger.debug("host cache evicted %s", evicted_key)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
