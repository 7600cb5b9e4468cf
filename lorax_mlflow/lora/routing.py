"""Per-step adapter routing, read by every MultiLoraLinear instead of being threaded through
the transformers forward signature (the runner sets it around each forward pass)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lorax_kernels import LoraBatchMeta

_local = threading.local()


@dataclass(frozen=True)
class LoraRouting:
    meta: LoraBatchMeta
    rank: int
    """Largest rank among this step's adapters: layers slice their padded slot stacks to it."""


def current_routing() -> LoraRouting | None:
    return getattr(_local, "routing", None)


@contextmanager
def lora_routing(routing: LoraRouting | None) -> Iterator[None]:
    previous = current_routing()
    _local.routing = routing
    try:
        yield
    finally:
        _local.routing = previous
