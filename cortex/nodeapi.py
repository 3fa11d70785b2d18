"""The control plane's side of the node protocol: what nodes and their agents answer.

Parsing is pure (``parse_models``, ``parse_metrics``, ``is_oom``, ``gpu_totals``)
and tested on bytes; :class:`NodeClient` makes the HTTP calls with the shared
``ClientSession``: polls (``/v1/models``, ``/metrics``, the agent's ``/gpu``),
lifecycle calls (``/v1/models/{unload,reload}``) and the agent's ``/restart``.
The hot path does not come here (see :mod:`cortex.upstream`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp
import msgspec
import orjson

from cortex.agent import GpuReport
from cortex.fleet import ModelState, NodeHandle

HTTP_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class _ModelEntry(msgspec.Struct):
    id: str
    status: str | None = None
    parent: str | None = None


class _ModelList(msgspec.Struct):
    data: list[_ModelEntry]


class Lifecycle(msgspec.Struct):
    """A lifecycle call's answer: the node says HTTP 200 whatever happened."""

    status: str = ""
    error: str | None = None


class AgentError(Exception):
    """The node's agent answered its restart call with an error."""


@dataclass(slots=True)
class PollResult:
    """One poll of one node; ``models`` is ``None`` when it failed."""

    models: dict[str, ModelState] | None
    running: int | None = None
    waiting: int | None = None
    error: str = ""
    epoch: int = 0  # the node's model epoch when the poll was sent
    gpu: tuple[int, int] | None = None  # (used, total) MiB from the node's agent


_decode_models = msgspec.json.Decoder(_ModelList).decode
_decode_lifecycle = msgspec.json.Decoder(Lifecycle).decode
_decode_gpu = msgspec.json.Decoder(GpuReport).decode


def parse_models(raw: bytes) -> dict[str, ModelState]:
    """A node's ``GET /v1/models`` answer as model -> state.

    Skips the synthetic ``default`` entry (it has no status). A LoRA adapter
    without a status of its own follows its ``parent``. A model listed twice
    (the reload-on-loaded bug lists a stuck model as ``loaded`` and again as
    ``reloading``) takes the entry that is not ``loaded``: it cannot serve.
    Raises :class:`msgspec.DecodeError` for anything else than a model list.
    """
    entries = _decode_models(raw).data
    out: dict[str, ModelState] = {}
    for entry in entries:
        state = ModelState.from_node(entry.status)
        if state is None or entry.id == "default":
            continue
        if out.get(entry.id) in (None, ModelState.LOADED):
            out[entry.id] = state
    for entry in entries:
        if entry.status is None and entry.parent in out and entry.id not in out:
            out[entry.id] = out[entry.parent]
    return out


_SEQUENCES = re.compile(
    r"^mistralrs_sequences_(running|waiting)(?:\{[^}]*\})?[ \t]+(\S+)", re.MULTILINE
)


def parse_metrics(text: str) -> tuple[int | None, int | None]:
    """``mistralrs_sequences_running`` and ``_waiting`` from Prometheus text, summed over labels."""
    found: dict[str, float] = {}
    for m in _SEQUENCES.finditer(text):
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        found[m.group(1)] = found.get(m.group(1), 0.0) + value
    running, waiting = found.get("running"), found.get("waiting")
    return (
        None if running is None else int(running),
        None if waiting is None else int(waiting),
    )


def is_oom(error: str | None) -> bool:
    """Whether a failed load's ``error`` says the GPU ran out of memory."""
    text = (error or "").lower()
    return "out of memory" in text or "oom" in text.split()


def gpu_totals(report: GpuReport) -> tuple[int, int] | None:
    """Used and total MiB over all of a node's GPUs; ``None`` when nothing was measured."""
    gpus = [g for g in report.gpus if g.memory_used_mb is not None and g.memory_total_mb]
    if not report.available or not gpus:
        return None
    return sum(g.memory_used_mb or 0 for g in gpus), sum(g.memory_total_mb or 0 for g in gpus)


def describe(exc: BaseException) -> str:
    """An exception as a short log/error text: its type, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NodeClient:
    """The control plane's HTTP calls to nodes and their agents."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def models(self, node: NodeHandle, within_s: float) -> PollResult:
        """``GET /v1/models``; a failed poll carries its reason."""
        try:
            async with self.session.get(
                f"{node.base_url}/v1/models",
                headers=_headers(node),
                timeout=aiohttp.ClientTimeout(total=within_s),
            ) as resp:
                if resp.status != 200:
                    return PollResult(None, error=f"GET /v1/models answered HTTP {resp.status}")
                raw = await resp.read()
            return PollResult(parse_models(raw))
        except (*HTTP_ERRORS, msgspec.DecodeError) as exc:
            return PollResult(None, error=describe(exc))

    async def metrics(self, node: NodeHandle, within_s: float) -> tuple[int | None, int | None]:
        """Running and waiting sequences from ``GET /metrics``, when the node serves it."""
        try:
            async with self.session.get(
                f"{node.base_url}/metrics",
                headers=_headers(node),
                timeout=aiohttp.ClientTimeout(total=within_s),
            ) as resp:
                if resp.status != 200:  # 404 (older nodes), 503 (metrics disabled)
                    return None, None
                text = await resp.text(errors="replace")
        except HTTP_ERRORS:
            return None, None
        return parse_metrics(text)

    async def gpu(self, node: NodeHandle, within_s: float) -> tuple[int, int] | None:
        """Measured GPU memory (used, total MiB) from the node's agent, if it has one."""
        agent = node.config.agent
        if not agent:
            return None
        try:
            async with self.session.get(
                f"{agent.rstrip('/')}/gpu",
                headers={"Authorization": f"Bearer {node.config.agent_token}"},
                timeout=aiohttp.ClientTimeout(total=within_s),
            ) as resp:
                if resp.status != 200:
                    return None
                report = _decode_gpu(await resp.read())
        except (*HTTP_ERRORS, msgspec.DecodeError):
            return None
        return gpu_totals(report)

    async def lifecycle(
        self, node: NodeHandle, action: str, model: str, within_s: float
    ) -> Lifecycle:
        """``POST /v1/models/{action}``; the node always answers 200: read the body."""
        async with self.session.post(
            f"{node.base_url}/v1/models/{action}",
            data=orjson.dumps({"model_id": model}),
            headers=_headers(node, json=True),
            timeout=aiohttp.ClientTimeout(total=within_s),
        ) as resp:
            raw = await resp.read()
        try:
            return _decode_lifecycle(raw)
        except msgspec.DecodeError:
            text = raw.decode("utf-8", "replace").strip()[:200]
            return Lifecycle(f"HTTP {resp.status}", text)

    async def restart(self, node: NodeHandle, within_s: float) -> float:
        """Ask the node's agent to restart mistralrs; the seconds it took, as it reports."""
        cfg = node.config
        async with self.session.post(
            f"{cfg.agent.rstrip('/')}/restart",
            headers={"Authorization": f"Bearer {cfg.agent_token}"},
            timeout=aiohttp.ClientTimeout(total=within_s),
        ) as resp:
            raw = await resp.read()
        if resp.status != 200:
            raise AgentError(
                f"agent answered HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace')}"
            )
        try:
            return float(orjson.loads(raw).get("seconds", 0.0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return 0.0


def _headers(node: NodeHandle, *, json: bool = False) -> dict[str, str]:
    headers = {"Content-Type": "application/json"} if json else {}
    if node.config.api_key:
        headers["Authorization"] = f"Bearer {node.config.api_key}"
    return headers
