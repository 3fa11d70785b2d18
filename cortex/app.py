"""Wiring: the API server, the metrics server, the supervisor, signals.

The API port uses cortex's own HTTP/1.1 server (:mod:`cortex.server`) with a
dict lookup for dispatch: no router, no middlewares. A client that goes away
cancels its request at once, and the upstream request with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson

from cortex import config, errors, notify
from cortex.admin import admin_routes
from cortex.config import Config, ConfigError
from cortex.errors import CortexError, Dialect
from cortex.metrics import Metrics, RequestRecord
from cortex.proxy import Proxy, check_key
from cortex.server import Answer, Request, Response, Server
from cortex.supervisor import Supervisor
from cortex.watchdog import Watchdog

log = logging.getLogger("cortex")

# How long a response whose handler is done gets to finish writing at shutdown,
# and a cut request to unwind (its upstream request closed).
_SHUTDOWN_GRACE_S = 1.0
# Built into the listening sockets and the client session: a reload cannot change them.
_RESTART_KEYS = ("listen", "metrics_listen", "connect_timeout_s")

Handler = Callable[[Request], Awaitable[Answer]]
_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/models": "models",
}


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
        self.stopping = False
        # Set when `active` drops to 0, or by cut(): what a drain waits for.
        self._idle = asyncio.Event()
        self._cut = False
        self._server: Server | None = None
        self._listener: asyncio.Server | None = None
        self._ssl: ssl.SSLContext | None = None
        self._label = str(config_path) if config_path is not None else "<config>"
        self._keys = _read_keys(cfg, self._label)

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Poll the nodes once, then listen on the metrics and API ports.

        Raises :class:`ConfigError` naming the key for TLS files that cannot be
        loaded or an address that cannot be bound; nothing is left running then.
        """
        self._ssl = _tls(self.cfg.gateway, self._label)
        self.session = _client_session(self.cfg)
        self.supervisor = Supervisor(self.cfg, self.session, self.metrics)
        self.proxy = Proxy(self.cfg, self.supervisor, self.metrics, self.watchdog)
        self.routes = self._routes()
        self.metrics.set_model_sizes({m.id: m.vram_mb for m in self.cfg.models})
        try:
            await self.supervisor.start()
            self.watchdog.start()
            await self._listen()
        except BaseException:
            await self._close()
            raise
        for warning in config.warnings(self.cfg):
            log.warning("%s", warning)

    async def _listen(self) -> None:
        gw = self.cfg.gateway
        host, port = config.split_hostport(gw.metrics_listen)
        try:
            await self.metrics.start(host, port)
        except OSError as exc:
            raise self._cannot_listen("metrics_listen", exc) from None
        self._server = Server(self.handle, receive_timeout=gw.client_timeout_s)
        host, port = config.split_hostport(gw.listen)
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(
                self._server, host, port, ssl=self._ssl, backlog=4096, reuse_address=True
            )
        except OSError as exc:
            raise self._cannot_listen("listen", exc) from None
        self.port = self._listener.sockets[0].getsockname()[1]
        scheme = "https" if self._ssl is not None else "http"
        mhost, _ = config.split_hostport(gw.metrics_listen)
        log.info(
            "cortex listening on %s://%s:%d (metrics on http://%s:%d/metrics)",
            scheme,
            _bracket(host),
            self.port,
            _bracket(mhost),
            self.metrics.bound_port,
        )

    def _cannot_listen(self, key: str, exc: OSError) -> ConfigError:
        value = getattr(self.cfg.gateway, key)
        return ConfigError(
            f"{self._label}: gateway.{key} = {value!r}: cannot listen: {exc.strerror or exc}"
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain_timeout_s``), close.

        Idle keep-alive connections close at once and busy ones after their
        response, so no new request starts. Requests still running when the
        drain time is over (or :meth:`cut` is called) have their connections
        closed, which cancels them and their upstream requests.
        """
        self.stopping = True
        if self._listener is not None:
            self._listener.close()
        if self._server is not None:
            self._server.pre_shutdown()
            if not await self._drain(self.cfg.gateway.drain_timeout_s):
                for connection in self._server.connections:
                    connection.force_close()
            # Drained: lets the last responses finish their final write. Cut:
            # lets the cancelled handlers unwind.
            await self._server.shutdown(_SHUTDOWN_GRACE_S)
        if self._listener is not None:
            await self._listener.wait_closed()
        await self._close()

    async def _drain(self, within: float) -> bool:
        """Wait until no request is in flight, at most ``within`` s; whether that happened."""
        if self.active and not self._cut:
            log.info("draining %d in-flight request(s), up to %g s", self.active, within)
            notify.status(f"draining {self.active} in-flight request(s)")
            # No await between the check and the clear: the last request to end sets it.
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._idle.wait()
        if self.active:
            log.warning("drain over: cutting %d request(s) still in flight", self.active)
            return False
        return True

    def cut(self) -> None:
        """End the drain now, or before it starts (a second SIGTERM or Ctrl-C)."""
        self._cut = True
        self._idle.set()

    async def _close(self) -> None:
        await self.watchdog.stop()
        await self.supervisor.stop()
        await self.metrics.stop()
        self.proxy.pool.close()
        await self.session.close()

    def reload(self) -> bool:
        """Re-read the config file (and ``api_keys_file``, TLS files) and apply it.

        Nodes, pins, model facts, API keys and timeouts change at once; requests
        in flight finish as they started. An invalid file is rejected with its
        error logged (file and key) and the running config kept: returns False.
        ``listen``, ``metrics_listen`` and ``connect_timeout_s`` (and turning TLS
        on or off) take a restart: their running values are kept, with a warning.
        """
        return self._reload() is None

    def _reload(self) -> str | None:
        """:meth:`reload`; None when applied, else why not (already logged)."""
        if self.config_path is None:
            log.warning("config reload: started without a config file, nothing to re-read")
            return "the gateway was started without a config file"
        try:
            loaded = config.load(self.config_path)
            kept = self._restart_keys(loaded.gateway)
            cfg = _with_gateway(loaded, kept)
            keys = _read_keys(cfg, self._label)
            if self._ssl is not None:  # prove the files before the live context reads them
                _tls(cfg.gateway, self._label)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the running config: %s", exc)
            notify.status("config reload rejected, running config kept (see the log)")
            return str(exc)
        for key, value in kept.items():
            log.warning(
                "%s: gateway.%s changed to %r: that takes a restart; still using %r",
                self._label,
                key,
                getattr(loaded.gateway, key),
                value,
            )
        old, self.cfg, self._keys = self.cfg, cfg, keys
        self.supervisor.reconfigure(cfg)
        self.proxy.configure(cfg)
        if self._server is not None:
            self._server.receive_timeout = cfg.gateway.client_timeout_s
        self.metrics.set_model_sizes({m.id: m.vram_mb for m in cfg.models})
        self._reload_certificate()
        log.info("config reloaded from %s: %s", self._label, _changes(old, cfg, len(keys)))
        notify.status(f"config reloaded; {len(cfg.nodes)} node(s)")
        return None

    def _restart_keys(self, new: config.Gateway) -> dict[str, Any]:
        """The running values of the keys a reload cannot change, where ``new`` changes them."""
        running = self.cfg.gateway
        kept = {
            key: getattr(running, key)
            for key in _RESTART_KEYS
            if getattr(new, key) != getattr(running, key)
        }
        if bool(new.tls_cert) != bool(running.tls_cert):
            kept.update(tls_cert=running.tls_cert, tls_key=running.tls_key)
        return kept

    def _reload_certificate(self) -> None:
        """New handshakes use the (renewed) files; open connections keep theirs."""
        if self._ssl is None:
            return
        gw = self.cfg.gateway
        try:
            self._ssl.load_cert_chain(gw.tls_cert, gw.tls_key)
        except (OSError, ssl.SSLError) as exc:  # the files changed again since _tls() read them
            log.error(
                "%s: gateway.tls_cert / tls_key: cannot reload (%s); restart cortex",
                self._label,
                exc,
            )

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
            # Claude Code checks that its base URL answers with `HEAD /` (nodes answer `/` too).
            "/": _Route({"GET": self._health, "HEAD": self._health}, auth=False),
            "/ready": _Route({"GET": self._ready}, auth=False),
            "/admin/reload": _Route({"POST": self._admin_reload}, auth=False, admin=True),
        }
        for rd in admin_routes(self.supervisor):
            route = routes.setdefault(rd.path, _Route({}, auth=False, admin=True))
            route.methods[rd.method] = rd.handler
        return routes

    async def handle(self, request: Request) -> Answer:
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
                return self._unauthorized(request)
            if route.admin and (denied := self._admin_denied(request)) is not None:
                return _error(request, denied)
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

    async def _unrouted(self, request: Request) -> Answer:
        if request.path.startswith("/v1/models/") and request.method == "GET":
            if self._keys and not check_key(self._keys, request):
                return self._unauthorized(request)
            return self._model(request.path[len("/v1/models/") :])
        return _error(request, errors.NotFound(f"no route for {request.method} {request.path}"))

    def _unauthorized(self, request: Request) -> Response:
        """401, and a metrics/access-log record of it (never the key): attempts leave a trace."""
        response = _error(request, errors.Unauthorized("missing or invalid API key"))
        now = time.monotonic()
        self.metrics.record(
            RequestRecord(
                request_id=self.proxy.request_id(request),
                client=request.remote or "",
                model="",
                node="",
                endpoint=_ENDPOINTS.get(request.path, "other"),
                status=response.status,
                stream=False,
                started=now,
                ended=now,
                error="unauthorized",
                dialect=_dialect(request).value,
            )
        )
        return response

    def _admin_denied(self, request: Request) -> CortexError | None:
        """Why ``request`` may not use the admin API: a wrong key (401), not loopback (403)."""
        key = self.cfg.gateway.admin_key
        if key:
            if check_key((key.encode(),), request):
                return None
            return errors.Unauthorized("the admin API needs gateway.admin_key")
        forwarded = "Forwarded" in request.headers or "X-Forwarded-For" in request.headers
        if request.remote and config.is_loopback(request.remote) and not forwarded:
            return None  # a proxy on this host makes every client loopback: not trusted
        return errors.Forbidden(
            "the admin API needs gateway.admin_key (or a loopback client when it is unset)"
        )

    # --- small handlers ---------------------------------------------------------

    async def _models(self, request: Request) -> Answer:
        return Response(body=self.supervisor.snapshot.models_body)

    def _model(self, model_id: str) -> Answer:
        listing = orjson.loads(self.supervisor.snapshot.models_body)
        for entry in listing.get("data", []):
            if entry.get("id") == model_id:
                return Response(body=orjson.dumps(entry))
        raise errors.ModelNotFound(
            f"The model `{model_id}` does not exist on any node of this fleet"
        )

    async def _health(self, request: Request) -> Answer:
        return Response(body=b'{"status":"ok"}')

    async def _ready(self, request: Request) -> Answer:
        up = [v.name for v in self.supervisor.snapshot.nodes.values() if v.state.routable]
        body = orjson.dumps({"ready": bool(up), "nodes_up": up})
        return Response(200 if up else 503, body)

    async def _admin_reload(self, request: Request) -> Answer:
        error = self._reload()
        if error is not None:
            raise errors.BadRequest(f"config reload rejected, the running config is kept: {error}")
        return Response(body=b'{"reloaded":true}')


def _dialect(request: Request) -> Dialect:
    if request.path.startswith("/v1/messages"):
        return Dialect.ANTHROPIC
    return Dialect.OPENAI


def _error(request: Request, err: CortexError) -> Response:
    dialect = _dialect(request)
    return Response(
        errors.status_for(err, dialect), errors.body(err, dialect), dict(errors.headers_for(err))
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


def check_files(cfg: Config, label: str) -> None:
    """Read ``api_keys_file`` and the TLS files as a start would: ConfigError if unusable."""
    _read_keys(cfg, label)
    _tls(cfg.gateway, label)


def _read_keys(cfg: Config, label: str) -> tuple[bytes, ...]:
    """``gateway.api_keys`` and the keys of ``api_keys_file`` (one a line, ``#`` comments)."""
    keys = list(cfg.gateway.api_keys)
    path = cfg.gateway.api_keys_file
    if path:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"{label}: gateway.api_keys_file: cannot read {path}: {why}"
            ) from None
        stripped = (line.strip() for line in text.splitlines())
        keys += [line for line in stripped if line and not line.startswith("#")]
    return tuple(k.encode() for k in keys)


def _tls(gw: config.Gateway, label: str) -> ssl.SSLContext | None:
    """The API port's TLS context (TLS 1.2 and up), or None when ``tls_cert`` is unset."""
    if not gw.tls_cert:
        return None
    for key in ("tls_cert", "tls_key"):
        path = getattr(gw, key)
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{label}: gateway.{key}: cannot read {path}: {exc.strerror}"
            ) from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(gw.tls_cert, gw.tls_key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{label}: gateway.tls_cert / gateway.tls_key: not a PEM certificate chain "
            f"and its private key: {exc.reason or exc}"
        ) from None
    return ctx


def _with_gateway(cfg: Config, changes: dict[str, Any]) -> Config:
    if not changes:
        return cfg
    return msgspec.structs.replace(cfg, gateway=msgspec.structs.replace(cfg.gateway, **changes))


def _changes(old: Config, new: Config, n_keys: int) -> str:
    """What a reload changed, for its log line: ``nodes +c -a ~b; 2 API key(s)``."""
    before = {n.name: n for n in old.nodes}
    after = {n.name: n for n in new.nodes}
    nodes = [f"+{name}" for name in after if name not in before]
    nodes += [f"-{name}" for name in before if name not in after]
    nodes += [f"~{name}" for name in after if name in before and after[name] != before[name]]
    return (
        f"nodes {' '.join(nodes) or 'unchanged'}; {len(new.nodes)} node(s), "
        f"{len(new.models)} model fact(s), {n_keys} API key(s)"
    )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(cfg: Config, config_path: Path | None) -> None:
    """Run a gateway until SIGTERM/SIGINT; SIGHUP reloads the config.

    The first SIGTERM/SIGINT starts the drain (see :meth:`Gateway.stop`); a
    second one cuts it short. systemd hears READY=1 once both ports listen,
    RELOADING=1 ... READY=1 around a reload, and STOPPING=1 at the drain.
    """
    gateway = Gateway(cfg, config_path)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_stop_signal, gateway, stop, sig)
    loop.add_signal_handler(signal.SIGHUP, _on_reload_signal, gateway)
    notify.ready()
    notify.status(f"serving; {len(cfg.nodes)} node(s)")
    try:
        await stop.wait()
    finally:
        notify.stopping()
        await gateway.stop()
    log.info("cortex stopped")


def _on_stop_signal(gateway: Gateway, stop: asyncio.Event, sig: signal.Signals) -> None:
    if stop.is_set():
        log.warning("%s again: cutting the drain short", sig.name)
        gateway.cut()
        return
    log.info(
        "%s: stopping (in-flight requests get up to %g s)",
        sig.name,
        gateway.cfg.gateway.drain_timeout_s,
    )
    stop.set()


def _on_reload_signal(gateway: Gateway) -> None:
    if gateway.stopping:
        log.info("SIGHUP while stopping: ignored")
        return
    notify.reloading()
    gateway.reload()
    notify.ready()
