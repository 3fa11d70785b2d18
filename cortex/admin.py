"""The admin API: the fleet as JSON, and model load/unload/pin/unpin.

The handlers raise :mod:`cortex.errors` classes (400 bad body, 404 unknown
model or node, 503 a load or unload that cannot be done now); the gateway's
dispatcher renders them, as for every other route. It also guards these
routes (admin key, or loopback clients only).
"""

from __future__ import annotations

import time

import msgspec
import orjson
from aiohttp import web

from cortex.errors import BadRequest
from cortex.supervisor import Supervisor

_JSON = {"Content-Type": "application/json"}


class _ModelRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of every ``POST /admin/models/*``."""

    model: str
    node: str | None = None


_decode_request = msgspec.json.Decoder(_ModelRequest).decode


def admin_routes(supervisor: Supervisor) -> list[web.RouteDef]:
    """The admin routes over ``supervisor``, for the gateway to mount behind its guard."""
    admin = _Admin(supervisor)
    return [
        web.get("/admin/fleet", admin.fleet),
        web.post("/admin/models/load", admin.load),
        web.post("/admin/models/unload", admin.unload),
        web.post("/admin/models/pin", admin.pin),
        web.post("/admin/models/unpin", admin.unpin),
    ]


class _Admin:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def fleet(self, request: web.BaseRequest) -> web.Response:
        return _json(self.supervisor.fleet())

    async def load(self, request: web.BaseRequest) -> web.Response:
        """Load a model (on a node, or where placement says); answers once it is loaded."""
        body = await _read(request)
        started = time.monotonic()
        node = await self.supervisor.load(body.model, body.node)
        seconds = round(time.monotonic() - started, 3)
        return _json({"model": body.model, "node": node, "status": "loaded", "seconds": seconds})

    async def unload(self, request: web.BaseRequest) -> web.Response:
        """Unload a model (from a node, or everywhere) once its requests are done."""
        body = await _read(request)
        nodes = await self.supervisor.unload(body.model, body.node)
        return _json({"model": body.model, "nodes": nodes, "status": "unloaded"})

    async def pin(self, request: web.BaseRequest) -> web.Response:
        body = await _read(request)
        nodes = self.supervisor.pin(body.model, body.node)
        return _json({"model": body.model, "nodes": nodes, "pinned": True})

    async def unpin(self, request: web.BaseRequest) -> web.Response:
        body = await _read(request)
        nodes = self.supervisor.unpin(body.model, body.node)
        return _json({"model": body.model, "nodes": nodes, "pinned": False})


async def _read(request: web.BaseRequest) -> _ModelRequest:
    raw = await request.read()
    try:
        body = _decode_request(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(
            f'expected a JSON body {{"model": "...", "node": "..." (optional)}}: {exc}'
        ) from None
    if not body.model or body.node == "":
        raise BadRequest("`model` (and `node`, when given) must not be empty")
    return body


def _json(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), headers=_JSON)
