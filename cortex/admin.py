"""The admin API: the fleet as JSON, and model load/unload/pin/unpin.

The handlers raise :mod:`cortex.errors` classes (400 bad body, 404 unknown
model or node, 503 a load or unload that cannot be done now); the gateway's
dispatcher renders them, as for every other route. It also guards these
routes (admin key, or loopback clients only).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import msgspec
import orjson

from cortex.errors import BadRequest
from cortex.server import BadBody, Request, Response, TooLarge
from cortex.supervisor import Supervisor

# Bodies are a few bytes of JSON: this is only a bound.
_MAX_BODY = 1 << 16


class _ModelRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of every ``POST /admin/models/*``."""

    model: str
    node: str | None = None


_decode_request = msgspec.json.Decoder(_ModelRequest).decode


class Route(NamedTuple):
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]


def admin_routes(supervisor: Supervisor) -> list[Route]:
    """The admin routes over ``supervisor``, for the gateway to mount behind its guard."""
    admin = _Admin(supervisor)
    return [
        Route("GET", "/admin/fleet", admin.fleet),
        Route("POST", "/admin/models/load", admin.load),
        Route("POST", "/admin/models/unload", admin.unload),
        Route("POST", "/admin/models/pin", admin.pin),
        Route("POST", "/admin/models/unpin", admin.unpin),
    ]


class _Admin:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def fleet(self, request: Request) -> Response:
        return _json(self.supervisor.fleet())

    async def load(self, request: Request) -> Response:
        """Load a model (on a node, or where placement says); answers once it is loaded."""
        body = await _read(request)
        started = time.monotonic()
        node = await self.supervisor.load(body.model, body.node)
        seconds = round(time.monotonic() - started, 3)
        return _json({"model": body.model, "node": node, "status": "loaded", "seconds": seconds})

    async def unload(self, request: Request) -> Response:
        """Unload a model (from a node, or everywhere) once its requests are done."""
        body = await _read(request)
        nodes = await self.supervisor.unload(body.model, body.node)
        return _json({"model": body.model, "nodes": nodes, "status": "unloaded"})

    async def pin(self, request: Request) -> Response:
        body = await _read(request)
        nodes = self.supervisor.pin(body.model, body.node)
        return _json({"model": body.model, "nodes": nodes, "pinned": True})

    async def unpin(self, request: Request) -> Response:
        body = await _read(request)
        nodes = self.supervisor.unpin(body.model, body.node)
        return _json({"model": body.model, "nodes": nodes, "pinned": False})


async def _read(request: Request) -> _ModelRequest:
    try:
        raw = await request.read(_MAX_BODY)
    except TooLarge:
        raise BadRequest(f"an admin request body is at most {_MAX_BODY} bytes") from None
    except BadBody as exc:
        raise BadRequest(f"request body is not valid HTTP: {exc}") from None
    try:
        body = _decode_request(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(
            f'expected a JSON body {{"model": "...", "node": "..." (optional)}}: {exc}'
        ) from None
    if not body.model or body.node == "":
        raise BadRequest("`model` (and `node`, when given) must not be empty")
    return body


def _json(data: object) -> Response:
    return Response(body=orjson.dumps(data))
