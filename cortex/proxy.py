"""The hot path: route a request to a node, forward bytes, stream back, tap, measure.

Request bodies go upstream as the bytes the client sent (only ``model``,
``stream`` and the token limits are decoded, with a msgspec view); they are
re-encoded only when an alias must be rewritten or ``max_tokens`` clamped.
Responses go back chunk by chunk as they arrive; a :class:`~cortex.sse.Tap`
sees each chunk for time-to-first-token and usage. One
:class:`~cortex.metrics.RequestRecord` per request is handed to the metrics
layer when the request ends.

Failure handling, by when it happens:
- before anything reached the client: a connection error retries on another
  node; anything else is a JSON error with a status, in the client's dialect;
- after the stream started: an SSE error event, then the stream is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import msgspec
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from cortex import anthropic, errors, fleet
from cortex.config import Config
from cortex.errors import CortexError, Dialect
from cortex.fleet import NodeHandle
from cortex.metrics import RequestRecord
from cortex.sse import Tap, Usage
from cortex.watchdog import Watch, Watchdog

log = logging.getLogger("cortex.proxy")

SSE_KEEPALIVE = b": cortex: waiting for the model to load\n\n"
KEEPALIVE_EVERY_S = 2.0
DEFAULT_ANTHROPIC_MAX_TOKENS = 32768
_UPSTREAM_ERRORS = (
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
)
_LARGE_BODY = 1 << 20
_CLIENT_GONE = (ConnectionResetError, ConnectionError)


class Router(Protocol):
    """What the proxy needs from the supervisor."""

    snapshot: fleet.Snapshot

    def pick(self, model_id: str, exclude: frozenset[str] = ...) -> NodeHandle | None: ...
    async def acquire(
        self, model_id: str, *, exclude: frozenset[str] = ...
    ) -> tuple[NodeHandle, float]: ...
    def report_failure(self, node: NodeHandle, reason: str) -> None: ...


class Recorder(Protocol):
    def record(self, rec: RequestRecord) -> None: ...


class _View(msgspec.Struct):
    """The only fields of a request body the proxy reads."""

    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class _UsageBody(msgspec.Struct):
    usage: Usage | None = None


_decode_view = msgspec.json.Decoder(_View).decode
_decode_usage = msgspec.json.Decoder(_UsageBody).decode


class Proxy:
    """Request handlers of the API port that talk to nodes."""

    def __init__(
        self,
        cfg: Config,
        session: aiohttp.ClientSession,
        router: Router,
        recorder: Recorder,
        watchdog: Watchdog,
    ) -> None:
        self.session = session
        self.router = router
        self.recorder = recorder
        self.watchdog = watchdog
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._urls: dict[tuple[str, str], URL] = {}
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Take a (re)loaded config: limits, timeouts, keys, model facts."""
        self.cfg = cfg
        gw = cfg.gateway
        self.first_byte_s = gw.first_byte_timeout_s
        self.idle_s = gw.idle_timeout_s
        self.max_body = gw.max_body_mb * 1024 * 1024
        self.max_tokens = {m.id: m.max_tokens for m in cfg.models if m.max_tokens}
        self._urls.clear()

    # --- entry points -------------------------------------------------------

    async def openai(self, request: web.BaseRequest, endpoint: str) -> web.StreamResponse:
        """``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``."""
        ex = _Exchange(self, request, endpoint, Dialect.OPENAI)
        try:
            raw = await self._read_body(request)
            view = _view_of(raw)
            model_id = self._resolve(view.model, ex)
            body = self._rewrite(raw, view, model_id)
            ex.rec.stream = view.stream
            return await ex.forward(request.path, body, None)
        except CortexError as err:
            return await ex.fail(err)
        finally:
            ex.close()

    async def messages(self, request: web.BaseRequest) -> web.StreamResponse:
        """``/v1/messages``: Anthropic Messages, translated or passed through natively."""
        ex = _Exchange(self, request, "messages", Dialect.ANTHROPIC)
        try:
            raw = await self._read_body(request)
            req = _object_of(raw)
            model_id = self._resolve(req.get("model"), ex)
            ex.rec.stream = bool(req.get("stream"))
            cap = self.max_tokens.get(model_id, DEFAULT_ANTHROPIC_MAX_TOKENS)
            out = anthropic.to_openai(req, model=model_id, max_tokens_cap=cap)
            translator = None
            if ex.rec.stream:
                translator = anthropic.StreamTranslator(
                    model=str(req["model"]), input_tokens=anthropic.estimate_tokens(req)
                )
            return await ex.forward(
                "/v1/chat/completions", orjson.dumps(out), _Translation(req, translator)
            )
        except CortexError as err:
            return await ex.fail(err)
        finally:
            ex.close()

    async def count_tokens(self, request: web.BaseRequest) -> web.StreamResponse:
        """``/v1/messages/count_tokens``: an estimate over system, messages and tools."""
        ex = _Exchange(self, request, "count_tokens", Dialect.ANTHROPIC)
        try:
            req = _object_of(await self._read_body(request))
            ex.rec.model = self._resolve(req.get("model"), ex)
            count = anthropic.estimate_tokens(req)
            ex.rec.prompt_tokens = count
            return ex.json(200, orjson.dumps({"input_tokens": count}))
        except CortexError as err:
            return await ex.fail(err)
        finally:
            ex.close()

    # --- helpers shared by the entry points -------------------------------

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body:
            raise errors.PayloadTooLarge(
                f"request body of {length} bytes is over the limit of {self.max_body} bytes"
            )
        ctype = request.headers.get("Content-Type", "application/json")
        if "json" not in ctype:
            raise errors.UnsupportedMediaType(
                f"Content-Type must be application/json, got {ctype!r}"
            )
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise errors.PayloadTooLarge(
                f"request body is over the limit of {self.max_body} bytes"
            ) from None

    def _resolve(self, name: object, ex: _Exchange) -> str:
        if not isinstance(name, str) or not name:
            raise errors.BadRequest("`model` is required and must be a string", param="model")
        model_id = self.router.snapshot.resolve(name)
        if model_id is None or model_id not in self.router.snapshot.routes:
            raise errors.ModelNotFound(
                f"The model `{name}` does not exist on any node of this fleet", param="model"
            )
        ex.rec.model = model_id
        return model_id

    def _rewrite(self, raw: bytes, view: _View, model_id: str) -> bytes:
        """The body to send upstream: the client's bytes unless a field must change."""
        cap = self.max_tokens.get(model_id)
        asked = view.max_tokens or view.max_completion_tokens
        over = cap is not None and asked is not None and asked > cap
        if view.model == model_id and not over:
            return raw
        body = orjson.loads(raw)
        body["model"] = model_id
        if over:
            for key in ("max_tokens", "max_completion_tokens"):
                if key in body:
                    body[key] = cap
        return orjson.dumps(body)

    def url(self, node: NodeHandle, path: str) -> URL:
        key = (node.base_url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(node.base_url + path)
        return url

    def request_id(self, request: web.BaseRequest) -> str:
        given = request.headers.get("X-Request-Id")
        if given and len(given) <= 200:
            return given
        return f"req_{self._id_prefix}{next(self._ids):x}"


def check_key(keys: tuple[bytes, ...], request: web.BaseRequest) -> bool:
    """Constant-time check of ``Authorization: Bearer`` or ``x-api-key``."""
    given = request.headers.get("x-api-key", "")
    if not given:
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else ""
    if not given:
        return False
    candidate = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(key, candidate)
    return ok


def _view_of(raw: bytes) -> _View:
    try:
        return _decode_view(raw)
    except msgspec.ValidationError as exc:
        raise errors.BadRequest(f"invalid request body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise errors.BadRequest("request body is not valid JSON (UTF-8)") from None


def _object_of(raw: bytes) -> dict[str, Any]:
    try:
        req = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.BadRequest("request body is not valid JSON") from None
    if not isinstance(req, dict):
        raise errors.BadRequest("request body must be a JSON object")
    return req


class _Translation:
    """The Anthropic side of an exchange that a node serves as OpenAI chat."""

    __slots__ = ("request", "stream")

    def __init__(self, request: dict[str, Any], stream: anthropic.StreamTranslator | None):
        self.request = request
        self.stream = stream


class _Exchange:
    """One client request on its way through cortex, and its measurement."""

    __slots__ = ("dialect", "proxy", "rec", "relayed", "request", "response", "watch")

    def __init__(
        self, proxy: Proxy, request: web.BaseRequest, endpoint: str, dialect: Dialect
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.dialect = dialect
        self.response: web.StreamResponse | None = None
        self.watch: Watch | None = None
        self.relayed = False
        self.rec = RequestRecord(
            request_id=proxy.request_id(request),
            client=request.remote or "",
            model="",
            node="",
            endpoint=endpoint,
            status=0,
            stream=False,
            started=time.monotonic(),
            ended=0.0,
            dialect=dialect.value,
        )

    # --- choosing a node --------------------------------------------------

    async def _node(
        self, model: str, exclude: frozenset[str], tr: _Translation | None
    ) -> NodeHandle:
        node = self.proxy.router.pick(model, exclude)
        if node is not None:
            return node
        waited = time.monotonic()
        acquiring = asyncio.ensure_future(self.proxy.router.acquire(model, exclude=exclude))
        try:
            if self.rec.stream:
                await self._keep_alive(acquiring, tr)
            node, load_wait = await acquiring
        finally:
            acquiring.cancel()
        self.rec.load_wait_s += load_wait
        self.rec.queue_wait_s += max(0.0, time.monotonic() - waited - load_wait)
        return node

    async def _keep_alive(self, waiting: asyncio.Future[Any], tr: _Translation | None) -> None:
        """Start the stream and send keep-alives so the client's timeout doesn't fire."""
        resp = await self._start_stream(None, tr)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=KEEPALIVE_EVERY_S)
            if done:
                return
            ping = tr.stream.ping() if tr is not None and tr.stream is not None else SSE_KEEPALIVE
            await resp.write(ping)

    # --- the upstream exchange ------------------------------------------

    async def forward(self, path: str, body: bytes, tr: _Translation | None) -> web.StreamResponse:
        """Send ``body`` to a node serving the model; fail over before the first byte."""
        model = self.rec.model
        exclude: frozenset[str] = frozenset()
        attempts = max(2, len(self.proxy.router.snapshot.nodes) + 1)
        for _ in range(attempts):
            node = await self._node(model, exclude, tr)
            try:
                return await self._exchange(node, path, body, tr)
            except _Retry as retry:
                if retry.failover:
                    exclude = exclude | {node.name}
                    self.proxy.router.report_failure(node, retry.reason)
        raise errors.BadGateway(f"no node could serve `{model}` after {attempts} attempts")

    async def _exchange(
        self, node: NodeHandle, path: str, body: bytes, tr: _Translation | None
    ) -> web.StreamResponse:
        proxy = self.proxy
        self.rec.node = node.name
        fleet.begin(node, self.rec.model)
        self.watch = proxy.watchdog.watch(proxy.first_byte_s, "first byte")
        upstream: aiohttp.ClientResponse | None = None
        try:
            self.rec.upstream_sent = time.monotonic()
            upstream = await proxy.session.post(
                proxy.url(node, path),
                data=_payload(body),
                headers=_upstream_headers(node, self.rec),
            )
            self.rec.first_byte = time.monotonic()
            self.watch.advance(proxy.idle_s, "idle")
            return await self._relay(node, upstream, tr)
        except _UPSTREAM_ERRORS as exc:
            if not self.relayed:
                raise _Retry(f"{type(exc).__name__}: {exc}", failover=True) from None
            raise errors.BadGateway(f"node {node.name} broke the connection: {exc}") from None
        except asyncio.CancelledError:
            if self.watch.fired and _uncancel():
                raise errors.GatewayTimeout(
                    f"node {node.name} sent nothing for {self.watch.limit:g} s "
                    f"(waiting for the {self.watch.stage})"
                ) from None
            raise
        finally:
            proxy.watchdog.release(self.watch)
            fleet.end(node, self.rec.model)
            if upstream is not None:
                upstream.close()

    async def _relay(
        self, node: NodeHandle, upstream: aiohttp.ClientResponse, tr: _Translation | None
    ) -> web.StreamResponse:
        if upstream.status >= 400:
            raw = await upstream.read()
            err = errors.from_node(upstream.status, raw)
            if isinstance(err, errors.Unavailable) and not self.relayed:
                await asyncio.sleep(0.2)
                raise _Retry(err.message, failover=False)
            raise err
        if "text/event-stream" in upstream.headers.get("Content-Type", ""):
            return await self._relay_stream(node, upstream, tr)
        return await self._relay_whole(node, upstream, tr)

    async def _relay_whole(
        self, node: NodeHandle, upstream: aiohttp.ClientResponse, tr: _Translation | None
    ) -> web.StreamResponse:
        raw = await upstream.read()
        self.rec.first_token = self.rec.first_byte
        self._usage_of(raw)
        if tr is not None:
            raw = orjson.dumps(anthropic.from_openai(orjson.loads(raw), model=tr.request["model"]))
        headers = self._headers(node.name)
        overhead = self.rec.upstream_sent - self.rec.started
        overhead -= self.rec.queue_wait_s + self.rec.load_wait_s
        headers["x-cortex-overhead-ms"] = f"{overhead * 1000:.3f}"
        self.relayed = True
        self.rec.status = upstream.status
        ctype = upstream.headers.get("Content-Type", "application/json")
        return _response(upstream.status, raw, ctype, headers)

    def _usage_of(self, raw: bytes) -> None:
        try:
            usage = _decode_usage(raw).usage
        except msgspec.DecodeError:
            return
        if usage is not None:
            self.rec.prompt_tokens = usage.prompt_tokens
            self.rec.completion_tokens = usage.completion_tokens

    async def _relay_stream(
        self, node: NodeHandle, upstream: aiohttp.ClientResponse, tr: _Translation | None
    ) -> web.StreamResponse:
        resp = await self._start_stream(node.name, tr)
        tap = Tap()
        watch = self.watch
        assert watch is not None
        translator = tr.stream if tr is not None else None
        try:
            async for chunk in upstream.content.iter_any():
                watch.progress += 1
                self.relayed = True
                tap.feed(chunk)
                if translator is None:
                    await resp.write(chunk)
                else:
                    out = translator.feed(chunk)
                    if out:
                        await resp.write(out)
        except _CLIENT_GONE:
            self.rec.status = 499
            self.rec.error = "client_disconnected"
            self._take_tap(tap)
            return resp
        self._take_tap(tap)
        await self._end_stream(resp, tap, translator)
        return resp

    def _take_tap(self, tap: Tap) -> None:
        self.rec.first_token = tap.first_token_at
        self.rec.prompt_tokens = tap.prompt_tokens
        if tap.completion_tokens is not None:
            self.rec.completion_tokens = tap.completion_tokens
        else:
            self.rec.completion_tokens = tap.content_frames
            self.rec.estimated = True
        if tap.error:
            self.rec.error = "node_error"

    async def _end_stream(
        self,
        resp: web.StreamResponse,
        tap: Tap,
        translator: anthropic.StreamTranslator | None,
    ) -> None:
        if translator is not None:
            tail = translator.finish()
            if tail:
                await resp.write(tail)
            if not tap.done:
                self.rec.error = self.rec.error or "stream_truncated"
        elif not tap.done:
            self.rec.error = "stream_truncated"
            cut = errors.StreamCut("the node ended the stream before it was complete")
            await resp.write(errors.sse_frame(cut, Dialect.OPENAI))
        with contextlib.suppress(*_CLIENT_GONE):
            await resp.write_eof()

    async def _start_stream(self, node: str | None, tr: _Translation | None) -> web.StreamResponse:
        if self.response is not None and self.response.prepared:
            return self.response
        resp = web.StreamResponse(status=200, headers=self._headers(node))
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        self.response = resp
        self.rec.status = 200
        await resp.prepare(self.request)
        if tr is not None and tr.stream is not None:
            await resp.write(tr.stream.start())
        return resp

    def _headers(self, node: str | None) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["x-request-id"] = self.rec.request_id
        if node:
            headers["x-cortex-node"] = node
        return headers

    # --- endings ----------------------------------------------------------

    def json(self, status: int, body: bytes) -> web.Response:
        self.rec.status = status
        return _response(status, body, "application/json", self._headers(None))

    async def fail(self, err: CortexError) -> web.StreamResponse:
        """Answer ``err``: as JSON if nothing was sent yet, else as a final SSE event."""
        self.rec.error = self.rec.error or type(err).__name__
        resp = self.response
        if resp is not None and resp.prepared:
            frame = errors.sse_frame(err, self.dialect)
            with contextlib.suppress(*_CLIENT_GONE):
                await resp.write(frame)
                await resp.write_eof()
            return resp
        status = errors.status_for(err, self.dialect)
        self.rec.status = status
        headers = self._headers(self.rec.node or None)
        headers.update(errors.headers_for(err))
        return _response(status, errors.body(err, self.dialect), "application/json", headers)

    def close(self) -> None:
        """Hand the record to the metrics layer; runs exactly once per request."""
        self.rec.ended = time.monotonic()
        if not self.rec.status:
            self.rec.status = 499
            self.rec.error = self.rec.error or "client_disconnected"
        self.proxy.recorder.record(self.rec)


class _Retry(Exception):
    """Try again: on another node (``failover``) or the same one after a wait."""

    def __init__(self, reason: str, *, failover: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failover = failover


def _uncancel() -> bool:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


def _payload(body: bytes) -> bytes | io.BytesIO:
    # aiohttp warns (ResourceWarning) on raw bytes over 1 MiB: a big body is streamed instead.
    return body if len(body) < _LARGE_BODY else io.BytesIO(body)


def _upstream_headers(node: NodeHandle, rec: RequestRecord) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Request-Id": rec.request_id}
    if node.config.api_key:
        headers["Authorization"] = f"Bearer {node.config.api_key}"
    return headers


def _response(status: int, body: bytes, ctype: str, headers: CIMultiDict[str]) -> web.Response:
    headers["Content-Type"] = ctype
    return web.Response(status=status, body=body, headers=headers)


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
