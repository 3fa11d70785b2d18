"""Wiring: the API server, the metrics server, the supervisor, signals.

The API port uses aiohttp's low-level :class:`aiohttp.web.Server` with a
dict lookup for dispatch: no router, no middlewares. Its handler runs with
``handler_cancellation`` on, so a client that goes away cancels its request at
once and the upstream request with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from cortex import config, errors, notify
from cortex.admin import admin_routes
from cortex.config import Config, ConfigError
from cortex.errors import CortexError, Dialect
from cortex.metrics import Metrics
from cortex.proxy import Proxy, check_key
from cortex.supervisor import Supervisor
from cortex.watchdog import Watchdog

log = logging.getLogger("cortex")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
_JSON = {"Content-Type": "application/json"}


class _Route:
    __slots__ = ("admin", "auth", "methods")

    def __init__(self, methods: dict[str, Handler], *, auth: bool, admin: bool = False) -> None:
        self.methods = methods
        self.auth = auth
        self.admin = admin


class Gateway:
    """One cortex gateway process: start it, reload it, stop it."""

    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = Metrics()
        self.watchdog = Watchdog()
        self.active = 0
        self.port = 0
        self._idle = asyncio.Event()
        self._server: web.Server | None = None
        self._listener: asyncio.Server | None = None
        self._keys: tuple[bytes, ...] = ()
        self._read_keys(cfg)

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        gw = self.cfg.gateway
        self.session = _client_session(self.cfg)
        self.supervisor = Supervisor(self.cfg, self.session, self.metrics)
        self.proxy = Proxy(self.cfg, self.session, self.supervisor, self.metrics, self.watchdog)
        self.routes = self._routes()
        self.metrics.set_model_sizes({m.id: m.vram_mb for m in self.cfg.models})
        await self.supervisor.start()
        self.watchdog.start()
        host, port = config.split_hostport(gw.metrics_listen)
        await self.metrics.start(host, port)
        loop = asyncio.get_running_loop()
        self._server = web.Server(
            self.handle,
            request_factory=self._make_request,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=75.0,
        )
        host, port = config.split_hostport(gw.listen)
        self._listener = await loop.create_server(
            self._server, host, port, ssl=_tls(self.cfg), backlog=4096, reuse_address=True
        )
        self.port = self._listener.sockets[0].getsockname()[1]
        for warning in config.warnings(self.cfg):
            log.warning("%s", warning)
        log.info("cortex listening on %s (metrics on %s)", gw.listen, gw.metrics_listen)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain time), close."""
        if self._listener is not None:
            self._listener.close()
        drain = self.cfg.gateway.drain_timeout_s
        if self.active:
            log.info("draining %d in-flight request(s), up to %g s", self.active, drain)
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain)
        if self._server is not None:
            await self._server.shutdown(1.0)
        if self._listener is not None:
            await self._listener.wait_closed()
        await self.watchdog.stop()
        await self.supervisor.stop()
        await self.metrics.stop()
        await self.session.close()

    def reload(self) -> bool:
        """Re-read the config file; keep the old config if the new one is invalid."""
        try:
            cfg = config.load(self.config_path)
            self._read_keys(cfg)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the running config: %s", exc)
            return False
        self.cfg = cfg
        self.supervisor.reconfigure(cfg)
        self.proxy.configure(cfg)
        self.metrics.set_model_sizes({m.id: m.vram_mb for m in cfg.models})
        log.info("config reloaded from %s", self.config_path or "defaults")
        return True

    def _read_keys(self, cfg: Config) -> None:
        keys = list(cfg.gateway.api_keys)
        path = cfg.gateway.api_keys_file
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError(
                    f"gateway.api_keys_file: cannot read {path}: {exc.strerror}"
                ) from None
            keys += [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.startswith("#")
            ]
        self._keys = tuple(k.encode() for k in keys)

    # --- dispatch -------------------------------------------------------------

    def _routes(self) -> dict[str, _Route]:
        p = self.proxy

        def chat(endpoint: str) -> Handler:
            return lambda request: p.openai(request, endpoint)

        routes = {
            "/v1/chat/completions": _Route({"POST": chat("chat")}, auth=True),
            "/v1/completions": _Route({"POST": chat("completions")}, auth=True),
            "/v1/embeddings": _Route({"POST": chat("embeddings")}, auth=True),
            "/v1/responses": _Route({"POST": chat("responses")}, auth=True),
            "/v1/messages": _Route({"POST": p.messages}, auth=True),
            "/v1/messages/count_tokens": _Route({"POST": p.count_tokens}, auth=True),
            "/v1/models": _Route({"GET": self._models}, auth=True),
            "/health": _Route({"GET": self._health}, auth=False),
            "/ready": _Route({"GET": self._ready}, auth=False),
            "/admin/reload": _Route({"POST": self._admin_reload}, auth=False, admin=True),
        }
        for rd in admin_routes(self.supervisor):
            route = routes.setdefault(rd.path, _Route({}, auth=False, admin=True))
            route.methods[rd.method] = cast(Handler, rd.handler)  # plain handlers, no views
        return routes

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.active += 1
        try:
            route = self.routes.get(request.path)
            if route is None:
                return await self._unrouted(request)
            handler = route.methods.get(request.method)
            if handler is None:
                return _error(
                    request,
                    errors.MethodNotAllowed(f"{request.method} is not allowed on {request.path}"),
                )
            if route.auth and self._keys and not check_key(self._keys, request):
                return _error(request, errors.Unauthorized("missing or invalid API key"))
            if route.admin and not self._admin_ok(request):
                return _error(
                    request,
                    errors.Forbidden(
                        "the admin API needs gateway.admin_key (or a loopback client when it is unset)"
                    ),
                )
            return await handler(request)
        except CortexError as err:
            return _error(request, err)
        except Exception:
            log.exception("unexpected error handling %s %s", request.method, request.path)
            return _error(request, errors.NodeError("internal error in cortex (logged)"))
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def _unrouted(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/v1/models/") and request.method == "GET":
            if self._keys and not check_key(self._keys, request):
                return _error(request, errors.Unauthorized("missing or invalid API key"))
            return self._model(request.path[len("/v1/models/") :])
        return _error(request, errors.NotFound(f"no route for {request.method} {request.path}"))

    def _admin_ok(self, request: web.BaseRequest) -> bool:
        key = self.cfg.gateway.admin_key
        if key:
            return check_key((key.encode(),), request)
        return bool(request.remote) and config.is_loopback(request.remote or "")

    # --- small handlers ---------------------------------------------------------

    async def _models(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=self.supervisor.snapshot.models_body, headers=_JSON)

    def _model(self, model_id: str) -> web.StreamResponse:
        listing = orjson.loads(self.supervisor.snapshot.models_body)
        for entry in listing.get("data", []):
            if entry.get("id") == model_id:
                return web.Response(body=orjson.dumps(entry), headers=_JSON)
        raise errors.ModelNotFound(
            f"The model `{model_id}` does not exist on any node of this fleet"
        )

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b'{"status":"ok"}', headers=_JSON)

    async def _ready(self, request: web.BaseRequest) -> web.StreamResponse:
        up = [v.name for v in self.supervisor.snapshot.nodes.values() if v.state.routable]
        body = orjson.dumps({"ready": bool(up), "nodes_up": up})
        return web.Response(status=200 if up else 503, body=body, headers=_JSON)

    async def _admin_reload(self, request: web.BaseRequest) -> web.StreamResponse:
        ok = self.reload()
        if not ok:
            raise errors.BadRequest(
                "the new config is invalid; the running config was kept (see the log)"
            )
        return web.Response(body=b'{"reloaded":true}', headers=_JSON)

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: Any,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        limit = self.cfg.gateway.max_body_mb * 1024 * 1024
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            asyncio.get_running_loop(),
            client_max_size=limit,
        )


def _dialect(request: web.BaseRequest) -> Dialect:
    if request.path.startswith("/v1/messages"):
        return Dialect.ANTHROPIC
    return Dialect.OPENAI


def _error(request: web.BaseRequest, err: CortexError) -> web.Response:
    dialect = _dialect(request)
    headers = dict(_JSON)
    headers.update(errors.headers_for(err))
    return web.Response(
        status=errors.status_for(err, dialect), body=errors.body(err, dialect), headers=headers
    )


def _client_session(cfg: Config) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60.0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.gateway.connect_timeout_s),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


def _tls(cfg: Config) -> ssl.SSLContext | None:
    gw = cfg.gateway
    if not gw.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(gw.tls_cert, gw.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"gateway.tls_cert / tls_key: cannot load: {exc}") from None
    return ctx


async def serve(cfg: Config, config_path: Path | None) -> None:
    """Run a gateway until SIGTERM/SIGINT; SIGHUP reloads the config."""
    gateway = Gateway(cfg, config_path)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(gateway))
    notify.ready()
    try:
        await stop.wait()
    finally:
        notify.stopping()
        await gateway.stop()


def _reload(gateway: Gateway) -> None:
    notify.reloading()
    gateway.reload()
    notify.ready()
