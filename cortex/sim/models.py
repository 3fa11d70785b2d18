"""Model lifecycle of a simulated node: load states, the VRAM budget, in-flight sequences.

Quirks of `mistralrs serve` emulated here (mistralrs-api.md):

- `reload` on a model that is already loaded answers `not_found` and leaves the
  model STUCK: its status reads `reloading`, `/v1/models` lists it twice (once
  `loaded`, once `reloading`, the second entry last) and every request to it gets
  500 "model `X` is being reloaded". **An `unload` clears it**: the model ends
  `unloaded` (its in-flight requests aborted) and the next request reloads it lazily.
- `unload` of an unloaded model answers `unloaded`; unloading a loaded model
  aborts its in-flight sequences (streams just end, without `[DONE]`).
- A manual `reload` returns only once the load is done (`load_s`). `reload` or
  `unload` of a model that is being loaded answers `reloading` and changes nothing.
- A request to an unloaded model loads it (lazy reload); any other request to a
  model being loaded (lazily or manually) fails at once with `ModelBusy`.

VRAM budget (not a quirk of mistral.rs but of the GPU under it): models that are
loaded, loading or stuck each hold `size_mb`, and the sum must stay within the
node's `vram_mb`. A load that does not fit fails at once like a CUDA OOM, with
`CUDA out of memory: tried to allocate N MiB (M MiB free)`, and the model stays
`unloaded`: a manual reload answers 200 `internal_error` with that `error`, a lazy
load fails its request with 500. Models loaded at start that do not fit raise a
ValueError when the node is built.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cortex.sim.config import SimModel


class ModelStatus(enum.Enum):
    LOADED = "loaded"
    UNLOADED = "unloaded"
    LOADING = "loading"
    STUCK = "stuck"
    """Hit by the reload-on-loaded bug: weights still in VRAM, but unusable."""

    @property
    def wire(self) -> str:
        """The status a node reports in `/v1/models` and `/v1/models/status`."""
        return "reloading" if self.is_reloading else self.value

    @property
    def is_reloading(self) -> bool:
        return self in (ModelStatus.LOADING, ModelStatus.STUCK)

    @property
    def holds_vram(self) -> bool:
        return self is not ModelStatus.UNLOADED


class LifecycleStatus(enum.StrEnum):
    """The `status` of a `/v1/models/{unload,reload,status}` answer."""

    LOADED = "loaded"
    UNLOADED = "unloaded"
    RELOADING = "reloading"
    NOT_FOUND = "not_found"
    NO_LOADER_CONFIG = "no_loader_config"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class LifecycleAnswer:
    model_id: str
    status: LifecycleStatus
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": self.model_id, "status": self.status.value}
        if self.error is not None:
            body["error"] = self.error
        return body


class SimError(Exception):
    """A request the node refuses before generating; `status` is the usual HTTP status."""

    status = 500


class ModelUnavailable(SimError):
    def __init__(self, model_id: str, available: Iterable[str]) -> None:
        super().__init__(
            f"Requested model '{model_id}' is not available. "
            f"Available models: {', '.join(available)}. "
            "Use 'default' or one of the listed model ids."
        )


class ModelBusy(SimError):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"model `{model_id}` is being reloaded")


class OutOfMemory(SimError):
    def __init__(self, model_id: str, size_mb: int, free_mb: int) -> None:
        self.detail = f"CUDA out of memory: tried to allocate {size_mb} MiB ({free_mb} MiB free)"
        super().__init__(f"failed to reload model `{model_id}`: {self.detail}")


class Sequence:
    """One request in flight on a model; unloading the model cancels its task."""

    __slots__ = ("aborted", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.task.cancel()


@dataclass(eq=False, slots=True)
class ModelSlot:
    spec: SimModel
    status: ModelStatus
    sequences: set[Sequence] = field(default_factory=set)
    load: asyncio.Task[None] | None = None

    def track(self) -> Sequence:
        task = asyncio.current_task()
        assert task is not None
        sequence = Sequence(task)
        self.sequences.add(sequence)
        return sequence

    def untrack(self, sequence: Sequence) -> None:
        self.sequences.discard(sequence)

    def abort_all(self) -> int:
        aborted = list(self.sequences)
        for sequence in aborted:
            sequence.abort()
        self.sequences.clear()
        return len(aborted)


class Registry:
    """The models of one node and their lifecycle.

    Counts into `counters`: `load` (loads started), `lazy_load`, `oom`, `abort`
    (sequences aborted by unloads).
    """

    def __init__(self, models: Iterable[SimModel], vram_mb: int, counters: Counter[str]) -> None:
        self._slots = {
            m.id: ModelSlot(m, ModelStatus.LOADED if m.loaded else ModelStatus.UNLOADED)
            for m in models
        }
        self._vram_mb = vram_mb
        self._counters = counters
        self.pending = 0
        """Requests held until a lazy load finishes."""
        if self.free_mb() < 0:
            raise ValueError(
                f"models loaded at start need {vram_mb - self.free_mb()} MiB "
                f"but the node has vram_mb={vram_mb} MiB"
            )

    @property
    def ids(self) -> list[str]:
        return list(self._slots)

    def find(self, model_id: str) -> ModelSlot | None:
        """The slot serving `model_id`; `default` is the first model."""
        if model_id == "default":
            return next(iter(self._slots.values()))
        return self._slots.get(model_id)

    def listing(self) -> list[tuple[str, str]]:
        """(id, status) pairs for `/v1/models`; a stuck model appears twice."""
        pairs = [
            (s.spec.id, "loaded" if s.status is ModelStatus.STUCK else s.status.wire)
            for s in self._slots.values()
        ]
        stuck = [
            (s.spec.id, s.status.wire)
            for s in self._slots.values()
            if s.status is ModelStatus.STUCK
        ]
        return pairs + stuck

    def free_mb(self) -> int:
        used = sum(s.spec.size_mb for s in self._slots.values() if s.status.holds_vram)
        return self._vram_mb - used

    def status(self, model_id: str) -> LifecycleAnswer:
        slot = self._slots.get(model_id)
        if slot is None:
            return LifecycleAnswer(model_id, LifecycleStatus.NOT_FOUND)
        return LifecycleAnswer(model_id, LifecycleStatus(slot.status.wire))

    def unload(self, model_id: str) -> LifecycleAnswer:
        slot = self._slots.get(model_id)
        if slot is None:
            return LifecycleAnswer(model_id, LifecycleStatus.NOT_FOUND)
        if slot.status is ModelStatus.LOADING:
            return LifecycleAnswer(model_id, LifecycleStatus.RELOADING)
        if slot.status is not ModelStatus.UNLOADED:
            slot.status = ModelStatus.UNLOADED
            self._counters["abort"] += slot.abort_all()
        return LifecycleAnswer(model_id, LifecycleStatus.UNLOADED)

    async def reload(self, model_id: str) -> LifecycleAnswer:
        """Reload an unloaded model and return once it is loaded (or failed)."""
        slot = self._slots.get(model_id)
        if slot is None:
            return LifecycleAnswer(model_id, LifecycleStatus.NOT_FOUND)
        if slot.status is ModelStatus.LOADED:
            slot.status = ModelStatus.STUCK
            return LifecycleAnswer(model_id, LifecycleStatus.NOT_FOUND)
        if slot.status.is_reloading:
            return LifecycleAnswer(model_id, LifecycleStatus.RELOADING)
        try:
            load = self._start_load(slot)
        except OutOfMemory as exc:
            return LifecycleAnswer(model_id, LifecycleStatus.INTERNAL_ERROR, exc.detail)
        await asyncio.shield(load)
        return LifecycleAnswer(model_id, LifecycleStatus(slot.status.wire))

    async def acquire(self, model_id: str) -> ModelSlot:
        """The slot to generate with, after a lazy load if the model was unloaded.

        Raises ModelUnavailable, ModelBusy or OutOfMemory.
        """
        slot = self.find(model_id)
        if slot is None:
            raise ModelUnavailable(model_id, self._slots)
        if slot.status.is_reloading:
            raise ModelBusy(slot.spec.id)
        if slot.status is ModelStatus.UNLOADED:
            await self._lazy_load(slot)
        return slot

    async def _lazy_load(self, slot: ModelSlot) -> None:
        load = self._start_load(slot)
        self._counters["lazy_load"] += 1
        self.pending += 1
        try:
            await asyncio.shield(load)
        finally:
            self.pending -= 1

    def _start_load(self, slot: ModelSlot) -> asyncio.Task[None]:
        free = self.free_mb()
        if slot.spec.size_mb > free:
            self._counters["oom"] += 1
            raise OutOfMemory(slot.spec.id, slot.spec.size_mb, free)
        self._counters["load"] += 1
        slot.status = ModelStatus.LOADING
        slot.load = asyncio.get_running_loop().create_task(self._load(slot))
        return slot.load

    @staticmethod
    async def _load(slot: ModelSlot) -> None:
        await asyncio.sleep(slot.spec.load_s)
        slot.status = ModelStatus.LOADED
        slot.load = None

    def close(self) -> None:
        """Stop loads and abort every sequence: the node restarts or stops."""
        for slot in self._slots.values():
            if slot.load is not None:
                slot.load.cancel()
            slot.abort_all()
