"""``cortex status``: the ``GET /admin/fleet`` answer as fixed-width tables. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_NODE_COLUMNS = (
    "NODE",
    "STATE",
    "USED/TOTAL MB",
    "IN-FLIGHT",
    "RUN/WAIT",
    "CYCLES",
    "ERROR",
)
_MODEL_COLUMNS = ("NODE", "MODEL", "STATUS", "PIN", "LAST USED", "IN-FLIGHT")


def render_fleet(fleet: dict[str, Any]) -> str:
    """Nodes (state, VRAM, in-flight, cycles, last error), then each node's models."""
    nodes = fleet.get("nodes", [])
    if not nodes:
        return "no nodes configured\n"
    node_rows = [_node_row(n) for n in nodes]
    model_rows = [_model_row(n["name"], m) for n in nodes for m in n.get("models", [])]
    out = _table(_NODE_COLUMNS, node_rows)
    out += "\n" + (_table(_MODEL_COLUMNS, model_rows) if model_rows else "no models listed\n")
    loading = fleet.get("loading", [])
    if loading:
        out += "\nloading: " + ", ".join(f"{x['model']} on {x['node']}" for x in loading) + "\n"
    return out


def _node_row(node: dict[str, Any]) -> list[str]:
    total = node.get("vram_total_mb") or 0
    vram = f"{node.get('vram_used_mb', 0)}/{total if total else '?'}"
    running, waiting = node.get("running"), node.get("waiting")
    seqs = (
        "-" if running is None and waiting is None else f"{_or_dash(running)}/{_or_dash(waiting)}"
    )
    return [
        node["name"],
        node.get("state", "?"),
        vram,
        str(node.get("inflight", 0)),
        seqs,
        str(node.get("cycles", 0)),
        node.get("error") or "",
    ]


def _model_row(node: str, model: dict[str, Any]) -> list[str]:
    return [
        node,
        model["id"],
        model.get("status", "?"),
        "*" if model.get("pinned") else "",
        _ago(model.get("last_used_s")),
        str(model.get("inflight", 0)),
    ]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _table(header: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(header), *rows]
    ]
    return "\n".join(lines) + "\n"
