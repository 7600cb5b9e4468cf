"""Device slots: which adapters are resident in the stacked MultiLoraLinear weights (and their Medusa heads).

LRU over ``max_loras`` slots; a slot is pinned by every running sequence that uses it and is only
evicted when nothing pins it. Called from the engine thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

from lorax_mlflow.lora.weights import LoraWeights, MedusaHeads
from lorax_mlflow.lora.layers import LoraSlice

logger = logging.getLogger(__name__)


class DeviceSlots:
    def __init__(
        self,
        layers: dict[str, LoraSlice],
        max_loras: int,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        self.layers = layers
        self.max_loras = max_loras
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.refs = [0] * max_loras
        self.ranks = [0] * max_loras
        self.medusa: list[MedusaHeads | None] = [None] * max_loras
        """The Medusa heads of each slot's adapter, on the device; None for LoRA-only adapters."""
        self.digests = [""] * max_loras
        """Content digest of the adapter in each slot (its prefix-cache identity)."""
        self.evictions = 0
        self.on_evict = on_evict
        """Told the key of every adapter evicted from a slot (the adapter cache counts them)."""

    @property
    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).device

    def lookup(self, key: str) -> int | None:
        slot = self.resident.get(key)
        if slot is not None:
            self.resident.move_to_end(key)
        return slot

    def place(self, key: str, weights: LoraWeights) -> int | None:
        """Write `weights` into a free or evictable slot; None when every slot is pinned."""
        slot = self._free_slot()
        if slot is None:
            return None
        previous_rank = self.ranks[slot]
        with torch.no_grad():
            for name, handle in self.layers.items():  # a module the adapter does not target is cleared
                handle.write_slot(slot, weights.a.get(name), weights.b.get(name), previous_rank)
        self.resident[key] = slot
        self.ranks[slot] = weights.rank
        self.medusa[slot] = None if weights.medusa is None else weights.medusa.to(self._device)
        self.digests[slot] = weights.digest
        logger.debug("adapter %s -> slot %d", key, slot)
        return slot

    def _free_slot(self) -> int | None:
        used = set(self.resident.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        for key, slot in self.resident.items():  # least recently used first
            if self.refs[slot] == 0:
                del self.resident[key]
                self.evictions += 1
                logger.debug("evicting adapter %s from slot %d", key, slot)
                if self.on_evict is not None:
                    self.on_evict(key)
                return slot
        return None

    def pin(self, slot: int) -> None:
        self.refs[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self.refs[slot] > 0, f"slot {slot} released more often than acquired"
        self.refs[slot] -= 1

