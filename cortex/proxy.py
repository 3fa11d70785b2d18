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
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import msgspec
import orjson

from cortex import anthropic, errors, fleet
from cortex.config import Config
from cortex.errors import CortexError, Dialect
from cortex.fleet import NodeHandle
from cortex.metrics import RequestRecord
from cortex.server import Answer, BadBody, Request, Response, Stream, TooLarge
from cortex.sse import Tap, Usage
from cortex.upstream import ConnectFailed, Pool, Reply
from cortex.watchdog import Watch, Watchdog

log = logging.getLogger("cortex.proxy")

SSE_KEEPALIVE = b": cortex: waiting for the model to load\n\n"
KEEPALIVE_EVERY_S = 2.0
DEFAULT_ANTHROPIC_MAX_TOKENS = 32768
_UPSTREAM_ERRORS = (
    ConnectFailed,
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
)
# A count is advisory: past this, or on any failure, the estimate answers instead.
_COUNT_TIMEOUT_S = 10.0
# aiohttp raises ClientConnectionResetError (a ConnectionResetError) writing to a gone client.
_CLIENT_GONE = (ConnectionResetError,)


class Router(Protocol):
    """What the proxy needs from the supervisor."""

    snapshot: fleet.Snapshot

    def pick(self, model_id: str, exclude: frozenset[str] = ...) -> NodeHandle | None: ...
    async def acquire(
        self, model_id: str, *, exclude: frozenset[str] = ...
    ) -> tuple[NodeHandle, float]: ...
    def report_failure(
        self, node: NodeHandle, reason: str, *, poll_now: bool = ..., sent: float = ...
    ) -> None: ...
    def report_ok(self, node: NodeHandle, sent: float) -> None: ...


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


class _Envelope(msgspec.Struct):
    type: str | None = None


class _Count(msgspec.Struct):
    input_tokens: int


_decode_view = msgspec.json.Decoder(_View).decode
_decode_usage = msgspec.json.Decoder(_UsageBody).decode
_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_decode_count = msgspec.json.Decoder(_Count).decode


_Work = Callable[["_Exchange", bytes, _View, str], Awaitable[Answer]]


class Proxy:
    """Request handlers of the API port that talk to nodes."""

    def __init__(
        self,
        cfg: Config,
        router: Router,
        recorder: Recorder,
        watchdog: Watchdog,
    ) -> None:
        self.pool = Pool(cfg.gateway.connect_timeout_s)
        self.router = router
        self.recorder = recorder
        self.watchdog = watchdog
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Take a (re)loaded config: limits, timeouts, keys, model facts."""
        self.cfg = cfg
        gw = cfg.gateway
        self.first_byte_s = gw.first_byte_timeout_s
        self.idle_s = gw.idle_timeout_s
        self.max_body = gw.max_body_mb * 1024 * 1024
        self.max_tokens = {m.id: m.max_tokens for m in cfg.models if m.max_tokens}
        self.pool.connect_timeout = gw.connect_timeout_s
        self._native_nodes = any(n.anthropic != "translate" for n in cfg.nodes)

    # --- entry points -------------------------------------------------------

    async def openai(self, request: Request, endpoint: str) -> Answer:
        """``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``."""
        return await self._serve(request, endpoint, Dialect.OPENAI, self._openai)

    async def messages(self, request: Request) -> Answer:
        """``/v1/messages``: Anthropic Messages, translated or passed through natively."""
        return await self._serve(request, "messages", Dialect.ANTHROPIC, self._messages)

    async def count_tokens(self, request: Request) -> Answer:
        """``/v1/messages/count_tokens``: the node's count if it has the route, else an estimate."""
        return await self._serve(request, "count_tokens", Dialect.ANTHROPIC, self._count)

    async def _serve(
        self, request: Request, endpoint: str, dialect: Dialect, work: _Work
    ) -> Answer:
        """Read and route the body, run ``work``, answer errors in ``dialect``, record once."""
        ex = _Exchange(self, request, endpoint, dialect)
        try:
            raw = await self._read_body(request)
            view = _view_of(raw)
            model_id = self._resolve(view.model, ex)
            ex.rec.stream = view.stream
            return await work(ex, raw, view, model_id)
        except CortexError as err:
            return await ex.fail(err)
        except _CLIENT_GONE:
            return ex.gone()
        finally:
            ex.close()

    async def _openai(self, ex: _Exchange, raw: bytes, view: _View, model_id: str) -> Answer:
        return await ex.forward(ex.request.path, self._rewrite(raw, view, model_id), None)

    async def _messages(self, ex: _Exchange, raw: bytes, view: _View, model_id: str) -> Answer:
        cap = self.max_tokens.get(model_id, DEFAULT_ANTHROPIC_MAX_TOKENS)
        tr = _Translation(raw, view, model_id, cap)
        if not self._native_nodes:
            tr.translated()  # reject what cannot be translated before a node is chosen
        return await ex.forward("/v1/messages", raw, tr)

    async def _count(self, ex: _Exchange, raw: bytes, view: _View, model_id: str) -> Answer:
        node = self.router.pick(model_id)
        if node is not None and _speaks_messages(node):
            counted = await self._count_on(node, self._rewrite(raw, view, model_id), ex)
            if counted is not None:
                return counted
        count = anthropic.estimate_tokens(_object_of(raw))
        ex.rec.prompt_tokens = count
        return ex.json(200, orjson.dumps({"input_tokens": count}))

    async def _count_on(self, node: NodeHandle, body: bytes, ex: _Exchange) -> Response | None:
        """The node's own count; ``None`` (use the estimate) when it has none to give."""
        upstream: Reply | None = None
        try:
            async with asyncio.timeout(_COUNT_TIMEOUT_S):
                path = "/v1/messages/count_tokens"
                upstream = await self.pool.request(node, path, body, ex.rec.request_id)
                status, raw = upstream.status, await upstream.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("count_tokens on node %s failed, estimating: %r", node.name, exc)
            return None
        finally:
            if upstream is not None:
                upstream.finish()
        if _learn_messages_route(node, status, raw) or status >= 500:
            return None
        if status >= 400:
            raise errors.from_node(status, raw)
        try:
            count = _decode_count(raw).input_tokens
        except msgspec.DecodeError:
            return None
        ex.rec.node = node.name
        ex.rec.prompt_tokens = count
        return ex.json(200, raw)

    # --- helpers shared by the entry points -------------------------------

    async def _read_body(self, request: Request) -> bytes:
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
            return await request.read(self.max_body)
        except TooLarge:
            raise errors.PayloadTooLarge(
                f"request body is over the limit of {self.max_body} bytes"
            ) from None
        except BadBody as exc:
            raise errors.BadRequest(f"request body is not valid HTTP: {exc}") from None

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
        return _rewritten(raw, view, model_id, self.max_tokens.get(model_id))

    def request_id(self, request: Request) -> str:
        given = request.headers.get("X-Request-Id")
        if given and len(given) <= 200:
            return given
        return f"req_{self._id_prefix}{next(self._ids):x}"


def check_key(keys: tuple[bytes, ...], request: Request) -> bool:
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
    except RecursionError:  # msgspec recurses even to skip a field: `[[[[...]]]]` gets here
        raise errors.BadRequest("request body is nested too deeply") from None


def _rewritten(raw: bytes, view: _View, model_id: str, cap: int | None) -> bytes:
    """``raw`` with ``model`` set to ``model_id`` and the token limit clamped to ``cap``."""
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


def _object_of(raw: bytes) -> dict[str, Any]:
    try:
        req = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.BadRequest("request body is not valid JSON") from None
    if not isinstance(req, dict):
        raise errors.BadRequest("request body must be a JSON object")
    return req


class _Translation:
    """An Anthropic request on its way to a node: passed through, or translated to chat.

    :meth:`leg` decides per node, once the node is known. ``stream`` is the
    translator of a translated stream; it is ``None`` for a native leg (bytes
    pass through) and until a node is chosen, so keep-alives sent while a
    model loads are SSE comments and the first event is whichever
    ``message_start`` the chosen leg sends. Once a leg was translated, later
    legs (failover) translate too: a translated stream may have started.
    """

    __slots__ = (
        "_chat",
        "_translator",
        "cap",
        "model_id",
        "native",
        "raw",
        "stream",
        "view",
    )

    def __init__(self, raw: bytes, view: _View, model_id: str, cap: int) -> None:
        self.raw = raw
        self.view = view
        self.model_id = model_id
        self.cap = cap
        self.native = False
        self.stream: anthropic.StreamTranslator | None = None
        self._chat: bytes | None = None
        self._translator: anthropic.StreamTranslator | None = None

    def leg(self, node: NodeHandle) -> tuple[str, bytes]:
        """The path and body for ``node``; sets up ``stream`` for that leg."""
        self.native = self._chat is None and _speaks_messages(node)
        if self.native:
            self.stream = None
            return "/v1/messages", _rewritten(self.raw, self.view, self.model_id, self.cap)
        body = self.translated()
        self.stream = self._translator
        return "/v1/chat/completions", body

    def translated(self) -> bytes:
        """The chat completions body (translated once); raises what cannot be translated."""
        if self._chat is None:
            req = _object_of(self.raw)
            out = anthropic.to_openai(req, model=self.model_id, max_tokens_cap=self.cap)
            if self.view.stream:
                self._translator = anthropic.StreamTranslator(
                    model=str(self.view.model), input_tokens=anthropic.estimate_tokens(req)
                )
            self._chat = orjson.dumps(out)
        return self._chat

    def whole(self, raw: bytes) -> bytes:
        """A non-streamed answer for the client: the node's own, or translated back."""
        if self.native:
            return raw
        return orjson.dumps(anthropic.from_openai(orjson.loads(raw), model=str(self.view.model)))

    def unrouted(self, node: NodeHandle, status: int, raw: bytes) -> bool:
        """Whether a native leg's error means ``node`` has no ``/v1/messages`` (try again)."""
        return self.native and _learn_messages_route(node, status, raw)

    def routed(self, node: NodeHandle) -> None:
        """A native leg got an answer: an ``auto`` node serves the route."""
        if self.native and node.messages_native is None:
            node.messages_native = True


def _speaks_messages(node: NodeHandle) -> bool:
    """Send Anthropic requests to ``node`` as they are? (``auto``: until it proves it can't)."""
    mode = node.config.anthropic
    return mode == "native" or (mode == "auto" and node.messages_native is not False)


def _learn_messages_route(node: NodeHandle, status: int, raw: bytes) -> bool:
    """Whether an answer from an Anthropic route of an ``auto`` node says it has none.

    Nodes older than the route answer a plain 404; a node that has it answers
    404 only with an Anthropic error (an unknown model). Either way an ``auto``
    node remembers what it learnt.
    """
    if node.config.anthropic != "auto":
        return False
    missing = status == 404 and not _is_anthropic_error(raw)
    if missing and node.messages_native is not False:
        log.info("node %s has no /v1/messages: translating its Anthropic requests", node.name)
    node.messages_native = not missing
    return missing


def _is_anthropic_error(raw: bytes) -> bool:
    try:
        return _decode_envelope(raw).type == "error"
    except msgspec.DecodeError:
        return False


class _Exchange:
    """One client request on its way through cortex, and its measurement."""

    __slots__ = ("dialect", "proxy", "rec", "relayed", "request", "response", "watch")

    def __init__(self, proxy: Proxy, request: Request, endpoint: str, dialect: Dialect) -> None:
        self.proxy = proxy
        self.request = request
        self.dialect = dialect
        self.response: Stream | None = None
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
        acquiring = asyncio.ensure_future(self.proxy.router.acquire(model, exclude=exclude))
        try:
            if self.rec.stream:
                await self._keep_alive(acquiring, tr)
            node, load_wait = await acquiring
        finally:
            acquiring.cancel()
        self.rec.load_wait_s += load_wait
        return node

    async def _keep_alive(self, waiting: asyncio.Future[Any], tr: _Translation | None) -> None:
        """Start the stream and send keep-alives so the client's timeout doesn't fire."""
        resp = self._stream(None)
        if not resp.prepared:
            resp.start()
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=KEEPALIVE_EVERY_S)
            if done:
                return
            ping = tr.stream.ping() if tr is not None and tr.stream is not None else SSE_KEEPALIVE
            await resp.write(ping)

    # --- the upstream exchange ------------------------------------------

    async def forward(self, path: str, body: bytes, tr: _Translation | None) -> Answer:
        """Send ``body`` to a node serving the model; fail over before the first byte."""
        model = self.rec.model
        exclude: frozenset[str] = frozenset()
        attempts = max(2, len(self.proxy.router.snapshot.nodes) + 1)
        for _ in range(attempts):
            node = await self._node(model, exclude, tr)
            if tr is not None:
                path, body = tr.leg(node)
            try:
                return await self._exchange(node, path, body, tr)
            except _Retry as retry:
                if retry.failover:
                    exclude = exclude | {node.name}
                    self.proxy.router.report_failure(node, retry.reason)
        raise errors.BadGateway(f"no node could serve `{model}` after {attempts} attempts")

    async def _exchange(
        self, node: NodeHandle, path: str, body: bytes, tr: _Translation | None
    ) -> Answer:
        proxy = self.proxy
        self.rec.node = node.name
        fleet.begin(node, self.rec.model)
        probe = node.stalls > 0  # back from a hold-out: this request tries it
        if probe:
            node.probes += 1
        self.watch = proxy.watchdog.watch(proxy.first_byte_s, "first byte")
        upstream: Reply | None = None
        try:
            self.rec.upstream_sent = time.monotonic()
            upstream = await proxy.pool.request(node, path, body, self.rec.request_id)
            self.rec.first_byte = time.monotonic()
            if probe:  # answered: a probe no more, however long its stream runs
                node.probes -= 1
                probe = False
            if node.stalls:  # it answers again: its stalls in a row are over
                proxy.router.report_ok(node, self.rec.upstream_sent)
            self.watch.advance(proxy.idle_s, "idle")
            return await self._relay(node, upstream, tr)
        except _UPSTREAM_ERRORS as exc:
            if not self.relayed:
                raise _Retry(f"{type(exc).__name__}: {exc}", failover=True) from None
            raise errors.BadGateway(f"node {node.name} broke the connection: {exc}") from None
        except asyncio.CancelledError:
            if self.watch.fired and _uncancel():
                if self.watch.stage == "first byte":  # its polls may be fine: held out a while
                    reason = f"no first byte in {self.watch.limit:g} s"
                    sent = self.rec.upstream_sent
                    proxy.router.report_failure(node, reason, poll_now=False, sent=sent)
                raise errors.GatewayTimeout(
                    f"node {node.name} sent nothing for {self.watch.limit:g} s "
                    f"(waiting for the {self.watch.stage})"
                ) from None
            raise
        finally:
            proxy.watchdog.release(self.watch)
            if probe:
                node.probes -= 1
            fleet.end(node, self.rec.model)
            if upstream is not None:
                upstream.finish()

    async def _relay(self, node: NodeHandle, upstream: Reply, tr: _Translation | None) -> Answer:
        if upstream.status >= 400:
            raw = await upstream.read()
            if tr is not None and tr.unrouted(node, upstream.status, raw):
                raise _Retry(f"node {node.name} has no /v1/messages", failover=False)
            err = errors.from_node(upstream.status, raw)
            if isinstance(err, errors.Unavailable) and not self.relayed:
                await asyncio.sleep(0.2)
                raise _Retry(err.message, failover=False)
            raise err
        if tr is not None:
            tr.routed(node)
        if "text/event-stream" in upstream.headers.get("Content-Type", ""):
            return await self._relay_stream(node, upstream, tr)
        return await self._relay_whole(node, upstream, tr)

    async def _relay_whole(
        self, node: NodeHandle, upstream: Reply, tr: _Translation | None
    ) -> Answer:
        raw = await upstream.read()
        self.rec.first_token = self.rec.first_byte
        self._usage_of(raw)
        if tr is not None:
            raw = tr.whole(raw)
        headers = self._headers(node.name)
        overhead = self.rec.upstream_sent - self.rec.started
        overhead -= self.rec.queue_wait_s + self.rec.load_wait_s
        headers["x-cortex-overhead-ms"] = f"{overhead * 1000:.3f}"
        self.relayed = True
        self.rec.status = upstream.status
        ctype = upstream.headers.get("Content-Type", "application/json")
        return Response(upstream.status, raw, headers, ctype)

    def _usage_of(self, raw: bytes) -> None:
        try:
            usage = _decode_usage(raw).usage
        except msgspec.DecodeError:
            return
        if usage is not None and usage.prompt_tokens is None:  # a native /v1/messages answer
            self.rec.prompt_tokens = usage.input_tokens
            self.rec.completion_tokens = usage.output_tokens
        elif usage is not None:
            self.rec.prompt_tokens = usage.prompt_tokens
            self.rec.completion_tokens = usage.completion_tokens

    async def _relay_stream(
        self, node: NodeHandle, upstream: Reply, tr: _Translation | None
    ) -> Answer:
        """Forward the node's chunks as they come; ``pending`` is what is not yet sent.

        What has arrived by now goes out with the head, and a last chunk with
        the stream's end: a node's whole answer that is already here (a short
        one, or a fast node) costs the client one write.
        """
        resp = self._stream(node.name)
        translator = tr.stream if tr is not None else None
        content = upstream.content
        watch = self.watch
        assert watch is not None
        tap = Tap()
        pending = translator.start() if translator is not None else b""
        try:
            chunk = content.read_nowait()
            while True:
                if chunk:
                    watch.progress += 1
                    self.relayed = True
                    tap.feed(chunk)
                    pending += chunk if translator is None else translator.feed(chunk)
                if content.at_eof():
                    break
                if not resp.prepared:
                    resp.start(pending)
                elif pending:
                    await resp.write(pending)
                pending = b""
                chunk = await content.readany()
        except _CLIENT_GONE:
            self.rec.status = 499
            self.rec.error = "client_disconnected"
            self._take_tap(tap)
            return resp
        self._take_tap(tap)
        await self._end_stream(resp, tap, translator, pending)
        return resp

    def _take_tap(self, tap: Tap) -> None:
        tap.close()
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
        resp: Stream,
        tap: Tap,
        translator: anthropic.StreamTranslator | None,
        tail: bytes,
    ) -> None:
        """End the stream with ``tail`` (the last chunk not yet sent) and what must follow it."""
        if translator is not None:
            tail += translator.finish()
            if not tap.done:
                self.rec.error = self.rec.error or "stream_truncated"
        elif not tap.done and not (tap.error and self.dialect is Dialect.ANTHROPIC):
            # (An Anthropic stream ends at its `event: error`: no message_stop follows one.)
            self.rec.error = "stream_truncated"
            cut = errors.StreamCut("the node ended the stream before it was complete")
            tail += errors.sse_frame(cut, self.dialect)
        try:
            await resp.write_eof(tail)
        except _CLIENT_GONE:
            self.rec.status = 499
            self.rec.error = self.rec.error or "client_disconnected"

    def _stream(self, node: str | None) -> Stream:
        """This request's SSE answer: keep-alives may have started it already; one
        not started yet is made anew (after a failover it names the new node)."""
        if self.response is None or not self.response.prepared:
            headers = self._headers(node)
            headers["Cache-Control"] = "no-cache"
            self.response = Stream(self.request, 200, headers)
            self.rec.status = 200
        return self.response

    def _headers(self, node: str | None) -> dict[str, str]:
        if node:
            return {"x-request-id": self.rec.request_id, "x-cortex-node": node}
        return {"x-request-id": self.rec.request_id}

    # --- endings ----------------------------------------------------------

    def json(self, status: int, body: bytes) -> Response:
        self.rec.status = status
        return Response(status, body, self._headers(None))

    async def fail(self, err: CortexError) -> Answer:
        """Answer ``err``: as JSON if nothing was sent yet, else as a final SSE event."""
        self.rec.error = self.rec.error or type(err).__name__
        resp = self.response
        if resp is not None and resp.prepared:
            frame = errors.sse_frame(err, self.dialect)
            with contextlib.suppress(*_CLIENT_GONE):
                await resp.write_eof(frame)
            return resp
        status = errors.status_for(err, self.dialect)
        self.rec.status = status
        headers = self._headers(self.rec.node or None)
        headers.update(errors.headers_for(err))
        return Response(status, errors.body(err, self.dialect), headers)

    def gone(self) -> Answer:
        """The client disconnected while cortex was writing to it."""
        self.rec.status = 499
        self.rec.error = self.rec.error or "client_disconnected"
        return self.response if self.response is not None else Response(499)

    def close(self) -> None:
        """Hand the record to the metrics layer; runs exactly once per request."""
        self.rec.ended = time.monotonic()
        task = asyncio.current_task()
        # cancelled: the client went away (handler_cancellation), maybe mid-stream after a 200
        if not self.rec.status or (task is not None and task.cancelling()):
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
