"""Everything a running sim node's handlers share."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cortex.sim.admission import Admission
from cortex.sim.config import SimConfig
from cortex.sim.faults import Faults, FaultsPatch
from cortex.sim.models import Registry


@dataclass(slots=True)
class NodeState:
    config: SimConfig
    registry: Registry
    admission: Admission
    faults: Faults
    counters: Counter[str]
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    """The per-node counter behind every answer's `id`."""
    call_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    created: int = field(default_factory=lambda: int(time.time()))


class Control(Protocol):
    """What `/_sim/faults` needs from the node beyond its state."""

    def apply_faults(self, values: Mapping[str, Any] | FaultsPatch) -> None: ...

    def clear_faults(self) -> None: ...
