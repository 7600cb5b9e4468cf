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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorax_mlflow.adapters.adapter_folder import BaseModelShape, load_adapter_folder
from lorax_mlflow.adapters.base_identity import check_base_model
from lorax_mlflow.adapters.merge import MergeSpec, merge_adapters
from lorax_mlflow.adapters.sources import AdapterLocation, AdapterSources, check_adapter_source, parse_adapter_id
from lorax_mlflow.errors import AdapterNotFoundError, AdapterValidationError, InvalidRequestError, LoraxError
from lorax_mlflow.lora.weights import LoraWeights
from lorax_mlflow.lora.slots import DeviceSlots

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRequest:
    """What a request says about its adapter (LoRAX fields)."""

    adapter_id: str = ""
    adapter_source: str | None = None
    api_token: str | None = None
    merged_adapters: MergeSpec | None = None

    def __post_init__(self) -> None:
        check_adapter_source(self.adapter_source)


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter the caller may use: its cache key (None = base model) and local folder."""

    key: str | None
    adapter_id: str = ""
    folder: Path | None = None


@dataclass
class AdapterStats:
    """Counters for one adapter id (as requests name it); `AdapterCache.adapter_stats` hands out snapshots."""

    requests: int = 0
    """Requests that named the adapter and passed its access check."""
    cache_hits: int = 0
    """Of those, the requests that found its weights already loaded (host memory or a device slot)."""
    loads: int = 0
    """Weight loads into host memory (first use, or again after an eviction)."""
    load_failures: int = 0
    load_seconds: float = 0.0
    """Total wall time of the successful loads (divide by `loads` for the mean)."""
    slot_placements: int = 0
    """Copies of its weights into a device slot."""
    host_evictions: int = 0
    slot_evictions: int = 0


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
        hidden_size: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """`hidden_size` and `vocab_size` are the base model's, which Medusa heads must match (None: Medusa
        adapters are refused)."""
        self.slots = slots
        self.base = BaseModelShape(dict(base_modules), hidden_size, vocab_size)
        self.base_model_name = base_model_name
        self.named = {name: Path(path) for name, path in named_adapters.items()}
        self.sources = sources
        self.max_rank = max_rank
        self.target_modules = target_modules
        self.host_cache_bytes = host_cache_bytes
        self.dtype = dtype
        self._host: OrderedDict[str, LoraWeights] = OrderedDict()
        self._folders: dict[str, Path] = {}
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._loading: dict[str, Future] = {}
        self._loaders: dict[str, Callable[[], LoraWeights]] = {}
        self._stats: dict[str, AdapterStats] = {}
        self._key_ids: dict[str, str] = {}
        """cache key -> the adapter id its stats are counted under."""
        self._runtime_names: dict[str, AdapterRequest] = {}
        """Names added while serving (`add_name`) -> the adapter id and source they stand for."""
        self._failed: set[str] = set()
        """Keys whose last load failed: not listed as models until a load succeeds."""
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")
        slots.on_evict = self._record_slot_eviction

    # ----- caller threads -------------------------------------------------------------------
    def is_base(self, adapter_id: str) -> bool:
        return adapter_id in ("", self.base_model_name)

    def resolve(self, request: AdapterRequest) -> ResolvedAdapter:
        """Check access, fetch to disk if needed and start loading the weights (off this thread).

        A merged recipe checks access to and fetches each of its adapters, then loads and merges
        them as one cache entry keyed by the recipe.
        """
        request = self._unalias(request)
        spec = request.merged_adapters
        if spec is not None:
            parts = [
                (adapter_id,
                 *self._locate(self._unalias(AdapterRequest(adapter_id, request.adapter_source, request.api_token))))
                for adapter_id in spec.ids
            ]
            key = f"merge:{spec.recipe_key()}"
            with self._lock:
                self._key_ids[key] = key
            self._count_request(key)
            self._start_load(key, lambda: self._load_merged(key, spec, parts))
            return ResolvedAdapter(key, adapter_id=key)
        if self.is_base(request.adapter_id):
            return ResolvedAdapter(None)
        key, folder = self._locate(request)
        self._count_request(key)
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

    def load_now(self, request: AdapterRequest) -> LoraWeights:
        """Resolve, fetch and load an adapter on this thread and return its weights (engine start-up)."""
        resolved = self.resolve(request)
        if resolved.key is None:
            raise AdapterValidationError(f"{request.adapter_id!r} names the base model, not an adapter")
        self.wait_loaded(resolved)
        weights = self._host_weights(resolved.key)
        assert weights is not None, "a finished load is in host memory"
        return weights

    def adapter_id_of(self, key: str | None) -> str:
        """The adapter id a cache key's requests name ("" for the base model)."""
        if key is None:
            return ""
        with self._lock:
            return self._key_ids.get(key, key)

    def known_adapter_ids(self) -> list[str]:
        """Packaged adapters and fetched ones (by canonical id), leaving out those that failed to load."""
        with self._lock:
            failed = set(self._failed)
            fetched = [key.split(":", 1)[1] for key in self._folders if not key.startswith("name:") and key not in failed]
            runtime = list(self._runtime_names)
        named = [name for name in self.named if f"name:{name}" not in failed]
        return sorted({*named, *runtime, *fetched})

    def add_name(self, name: str, adapter_id: str, adapter_source: str | None = None) -> None:
        """Serve the adapter `adapter_id` (any source) as `name` from now on, once it has loaded.

        The adapter is fetched, validated and loaded before the name exists, so a bad one is the
        caller's 4xx and never a later request's. Access checks still run per request with that
        request's token: a name never lends the loader's credentials to anyone.
        """
        if not isinstance(name, str) or not name.strip() or len(name) > 256 or name != name.strip():
            raise InvalidRequestError("lora_name must be a non-empty name without surrounding spaces",
                                      param="lora_name")
        with self._lock:
            taken = self.is_base(name) or name in self.named or name in self._runtime_names
        if taken:
            raise InvalidRequestError(f"an adapter named {name!r} is already loaded", param="lora_name",
                                      code="adapter_already_loaded")
        self.wait_loaded(self.resolve(AdapterRequest(adapter_id, adapter_source)))
        with self._lock:
            if name in self._runtime_names:
                raise InvalidRequestError(f"an adapter named {name!r} is already loaded", param="lora_name",
                                          code="adapter_already_loaded")
            self._runtime_names[name] = AdapterRequest(adapter_id, adapter_source)

    def remove_name(self, name: str) -> None:
        """Stop serving a name added by `add_name`; requests already running finish with it."""
        with self._lock:
            if self._runtime_names.pop(name, None) is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} was loaded at runtime", param="lora_name")

    def _unalias(self, request: AdapterRequest) -> AdapterRequest:
        with self._lock:
            target = self._runtime_names.get(request.adapter_id) if request.adapter_source is None else None
        if target is None:
            return request
        return replace(request, adapter_id=target.adapter_id, adapter_source=target.adapter_source)

    def host_capacity(self) -> int:
        """How many adapters of the largest accepted rank fit in the host-memory budget (at least 1)."""
        per_rank = sum(n_in + n_out for n_in, n_out in self.base.modules.values()) * self.dtype.itemsize
        return max(1, self.host_cache_bytes // max(per_rank * self.max_rank, 1))

    def adapter_stats(self) -> dict[str, AdapterStats]:
        """A snapshot of the counters of every adapter requested so far, by adapter id."""
        with self._lock:
            return {adapter_id: replace(stats) for adapter_id, stats in self._stats.items()}

    def _locate(self, request: AdapterRequest) -> tuple[str, Path]:
        """The adapter's cache key and local folder, after its access check; fetched once per key."""
        if request.adapter_id in self.named and request.adapter_source in (None, "local"):
            key = f"name:{request.adapter_id}"
            with self._lock:
                self._key_ids[key] = request.adapter_id
            return key, self.named[request.adapter_id]
        try:
            location = self.sources.pin(parse_adapter_id(request.adapter_id, request.adapter_source))
        except AdapterNotFoundError as error:
            raise self._not_found(request.adapter_id, error) from error
        key = self._key(location)
        try:
            self.sources.check_access(location, request.api_token)
        except AdapterNotFoundError as error:
            raise self._not_found(request.adapter_id, error) from error
        with self._lock:
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        with fetch_lock:  # concurrent first requests share one download
            with self._lock:
                folder = self._folders.get(key)
            if folder is None:
                try:
                    folder = self.sources.fetch(location, request.api_token)
                except AdapterNotFoundError as error:
                    raise self._not_found(request.adapter_id, error) from error
        with self._lock:
            self._folders[key] = folder
            self._key_ids[key] = request.adapter_id
        return key, folder

    def _not_found(self, adapter_id: str, error: AdapterNotFoundError) -> AdapterNotFoundError:
        """The 404 for an unknown model id, saying everywhere it was looked for."""
        named = ", ".join(sorted(self.named)) or "none"
        return AdapterNotFoundError(
            f"The model {adapter_id!r} does not exist: it is not the base model ({self.base_model_name!r}) "
            f"nor one of its packaged adapters ({named}), and {error.message}",
            param="model",
        )

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
        with self._timed_load(key):
            root = self.sources.root_for(folder)
            check_base_model(folder, name, self.base_model_name, root=root)
            return load_adapter_folder(
                folder, name, self.base, max_rank=self.max_rank, target_modules=self.target_modules, dtype=self.dtype,
                root=root,
            )

    def _load_merged(self, key: str, spec: MergeSpec, parts: list[tuple[str, str, Path]]) -> LoraWeights:
        """Merge the recipe's adapters, taken from host memory when there, else read from disk."""
        with self._timed_load(key):
            loaded = []
            for adapter_id, part_key, folder in parts:
                with self._lock:
                    cached = self._host.get(part_key)
                part = cached if cached is not None else self._load_folder(part_key, folder, adapter_id)
                if not part.a:
                    raise AdapterValidationError(
                        f"adapter {adapter_id!r} holds only Medusa heads: only LoRA adapters can be merged",
                        param="merged_adapters",
                    )
                loaded.append(part)
            return merge_adapters(loaded, spec)

    @contextmanager
    def _timed_load(self, key: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            with self._lock:
                self._stats_for(key).load_failures += 1
                self._failed.add(key)
            raise
        seconds = time.perf_counter() - started
        with self._lock:
            self._failed.discard(key)
            stats = self._stats_for(key)
            stats.loads += 1
            stats.load_seconds += seconds
        logger.debug("adapter %s loaded in %.1f ms", key, seconds * 1000)

    def _count_request(self, key: str) -> None:
        with self._lock:
            stats = self._stats_for(key)
            stats.requests += 1
            if key in self._host or key in self.slots.resident:
                stats.cache_hits += 1

    def _stats_for(self, key: str) -> AdapterStats:
        """The stats entry of `key`'s adapter id; call with the lock held."""
        return self._stats.setdefault(self._key_ids.get(key, key), AdapterStats())

    def _record_slot_eviction(self, key: str) -> None:
        with self._lock:
            self._stats_for(key).slot_evictions += 1

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
            with self._lock:
                self._stats_for(key).slot_placements += 1
        self.slots.pin(slot)
        return slot

    def release(self, slot: int) -> None:
        self.slots.unpin(slot)

    def slot_digest(self, slot: int) -> str:
        """Content digest of the adapter in `slot` (what the KV prefix cache keys its blocks by)."""
        return self.slots.digests[slot]

    def _host_weights(self, key: str) -> LoraWeights | None:
        """The weights of `key` in host memory, taking a finished load there; None while loading."""
        with self._lock:
            weights = self._host.get(key)
            if weights is not None:
                self._host.move_to_end(key)
                return weights
            future = self._loading.get(key)
            if future is not None and future.done():
                # Taking the load and publishing its weights happen under one lock, so a request
                # resolving meanwhile sees the adapter either loading or loaded, never neither.
                del self._loading[key]
                if future.exception() is None:
                    weights = future.result()
                    self._insert_host(key, weights)
                    return weights
        if future is None:  # evicted from host memory before it reached a slot: load it again
            self._start_load(key, self._loaders[key])
            return None
        if not future.done():
            return None
        error = future.exception()
        if isinstance(error, LoraxError):
            raise error
        raise LoraxError(f"adapter {key!r} failed to load: {error}") from error

    def _insert_host(self, key: str, weights: LoraWeights) -> None:
        """Add to the host LRU and evict the least recently used beyond the byte budget; lock held."""
        self._host[key] = weights
        total = sum(w.nbytes for w in self._host.values())
        while total > self.host_cache_bytes and len(self._host) > 1:
            evicted_key, evicted = self._host.popitem(last=False)
            total -= evicted.nbytes
            self._stats_for(evicted_key).host_evictions += 1
            logger.debug("host cache evicted %s", evicted_key)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
