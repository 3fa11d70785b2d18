"""Failures a sim node can be told to inject, from Python or over HTTP.

Every knob is read when a request needs it, so assigning a field of
`SimNode.faults` takes effect for the next request (for `refuse`, at once):

- `drop_after_chunks=N`: after N SSE frames (`[DONE]` counts) the TCP connection
  is closed without ending the chunked body; a non-streaming request is dropped
  before any byte of its answer.
- `no_done`: streams end cleanly but without their terminator (`data: [DONE]`,
  Anthropic `message_stop`).
- `error_after_chunks=N`: after N frames, an in-stream error (OpenAI
  `data: {"error":{...}}` then `[DONE]`; Anthropic `event: error`, no
  `message_stop`); a non-streaming request answers 500.
- `stall`: inference requests are accepted and never answered, not even headers
  (until the client gives up or the node stops).
- `status=N`: every inference request answers status N with `{"message": ...}`
  (the Anthropic error envelope on `/v1/messages`).
- `refuse`: the node stops listening and drops every open connection, as if the
  process died; clearing it listens again on the same port.
- `lifecycle_status`: `/v1/models/reload` and `/unload` answer this status
  (e.g. `internal_error`, `not_found`) and change nothing.

Over HTTP, `POST /_sim/faults` takes a JSON object with any of these fields (the
others keep their values) plus `refuse_for_s` (refuse, then listen again after
that many seconds: a refusing node cannot be told to stop over HTTP) and
`models_override` (a list of `ID[:SIZE_MB[:LOAD_S[:TOK_PER_S]]]` specs: the node
restarts with that model list); `DELETE /_sim/faults` clears every fault and
restores the configured models; `GET /_sim/faults` shows them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from cortex.sim.models import LifecycleStatus

_Count = Annotated[int, msgspec.Meta(ge=0)]
_HttpStatus = Annotated[int, msgspec.Meta(ge=100, le=599)]


class FaultsPatch(msgspec.Struct, forbid_unknown_fields=True):
    """The body of `POST /_sim/faults`: fields left out keep their value."""

    drop_after_chunks: _Count | msgspec.UnsetType | None = msgspec.UNSET
    no_done: bool | msgspec.UnsetType = msgspec.UNSET
    error_after_chunks: _Count | msgspec.UnsetType | None = msgspec.UNSET
    stall: bool | msgspec.UnsetType = msgspec.UNSET
    status: _HttpStatus | msgspec.UnsetType | None = msgspec.UNSET
    refuse: bool | msgspec.UnsetType = msgspec.UNSET
    lifecycle_status: LifecycleStatus | msgspec.UnsetType | None = msgspec.UNSET
    refuse_for_s: Annotated[float, msgspec.Meta(gt=0)] | msgspec.UnsetType = msgspec.UNSET
    models_override: list[str] | msgspec.UnsetType | None = msgspec.UNSET


_FIELDS = (
    "drop_after_chunks",
    "no_done",
    "error_after_chunks",
    "stall",
    "status",
    "refuse",
    "lifecycle_status",
)


class Faults:
    """The failures a node injects now; see the module docstring for each knob."""

    __slots__ = (
        "_lifecycle_status",
        "_on_refuse",
        "_refuse",
        "drop_after_chunks",
        "error_after_chunks",
        "no_done",
        "stall",
        "status",
    )

    def __init__(
        self,
        *,
        drop_after_chunks: int | None = None,
        no_done: bool = False,
        error_after_chunks: int | None = None,
        stall: bool = False,
        status: int | None = None,
        refuse: bool = False,
        lifecycle_status: str | None = None,
    ) -> None:
        self._on_refuse: Callable[[bool], None] | None = None
        self._refuse = refuse
        self.drop_after_chunks = drop_after_chunks
        self.no_done = no_done
        self.error_after_chunks = error_after_chunks
        self.stall = stall
        self.status = status
        self.lifecycle_status = lifecycle_status

    @property
    def refuse(self) -> bool:
        return self._refuse

    @refuse.setter
    def refuse(self, value: bool) -> None:
        changed = value != self._refuse
        self._refuse = value
        if changed and self._on_refuse is not None:
            self._on_refuse(value)

    @property
    def lifecycle_status(self) -> str | None:
        return self._lifecycle_status

    @lifecycle_status.setter
    def lifecycle_status(self, value: str | None) -> None:
        self._lifecycle_status = None if value is None else LifecycleStatus(value).value

    @property
    def streams_faulty(self) -> bool:
        return (
            self.drop_after_chunks is not None
            or self.error_after_chunks is not None
            or self.no_done
        )

    def bind(self, on_refuse: Callable[[bool], None] | None) -> None:
        """Let the node act at once when `refuse` changes."""
        self._on_refuse = on_refuse

    def apply(self, patch: FaultsPatch) -> None:
        for name in _FIELDS:
            value = getattr(patch, name)
            if value is not msgspec.UNSET:
                setattr(self, name, value)

    def clear(self) -> None:
        for name, value in _DEFAULTS.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def __repr__(self) -> str:
        active = {k: v for k, v in self.to_json().items() if v not in (None, False)}
        return f"Faults({', '.join(f'{k}={v!r}' for k, v in active.items())})"


_DEFAULTS = Faults().to_json()
