"""The client's view of the core's adapter cache: resolution, load checks and counters, as calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorax_mlflow.adapters.cache import AdapterRequest, AdapterStats, ResolvedAdapter

CallCore = Callable[..., Any]


class AdapterClient:
    """Same calls as :class:`~lorax_mlflow.adapters.cache.AdapterCache`'s caller-side methods, answered
    by the core (which fetches adapters off its loop thread and loads their weights)."""

    def __init__(self, call: CallCore) -> None:
        self._call = call

    def resolve(self, request: AdapterRequest) -> ResolvedAdapter:
        """Check access, fetch to disk if needed and start loading the weights in the core."""
        found = self._call("resolve_adapter", asdict(request))
        folder = found["folder"]
        return ResolvedAdapter(found["key"], adapter_id=found["adapter_id"], folder=None if folder is None else Path(folder))

    def wait_loaded(self, resolved: ResolvedAdapter) -> None:
        """Block until the adapter's weights are in the core's host memory; raise its load error, if any."""
        self._call("wait_adapter_loaded", {"key": resolved.key, "adapter_id": resolved.adapter_id})

    def add_name(self, name: str, adapter_id: str, adapter_source: str | None = None) -> None:
        """Serve `adapter_id` as `name` from now on, once it has loaded (runtime adapter management)."""
        self._call("add_adapter_name", name, adapter_id, adapter_source)

    def remove_name(self, name: str) -> None:
        self._call("remove_adapter_name", name)

    def host_capacity(self) -> int:
        """How many adapters of the largest accepted rank fit in the core's host-memory budget."""
        return int(self._call("adapter_host_capacity"))

    def known_adapter_ids(self) -> list[str]:
        return list(self._call("known_adapter_ids"))

    def adapter_stats(self) -> dict[str, AdapterStats]:
        return {adapter_id: AdapterStats(**fields) for adapter_id, fields in self._call("adapter_stats").items()}
