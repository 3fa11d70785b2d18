"""The HTTP surface of a sim node: the routes of `mistralrs serve` plus `/_sim/*` controls.

Framework behaviour emulated: lifecycle routes parse their body like axum's
`Json` extractor (plain-text 415 without a JSON content type, 400 for broken
JSON, 422 for a body of the wrong shape); inference routes answer 422
`{"message": ...}` for invalid requests; CORS is open; bodies are limited to
50 MB; `x-request-id` is echoed, or generated as `req_<uuid>`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from aiohttp import web
from msgspec import UNSET

from cortex.sim import anthropic, openai, responses
from cortex.sim.dialect import Dialect, message_error
from cortex.sim.faults import FaultsPatch
from cortex.sim.inference import Job, Pipeline
from cortex.sim.models import LifecycleAnswer, LifecycleStatus
from cortex.sim.state import Control, NodeState

MAX_BODY_BYTES = 50 * 1024 * 1024


class ModelOperation(msgspec.Struct):
    model_id: str


_OPERATION_DECODER = msgspec.json.Decoder(ModelOperation)
_PATCH_DECODER = msgspec.json.Decoder(FaultsPatch)
_CORS_PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "*",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Max-Age": "86400",
}


def _chat_job(raw: bytes) -> Job:
    request = openai.CHAT_DECODER.decode(raw)
    return Job(openai.CHAT, request.model, openai.chat_prompt(request), request.stream)


def _completion_job(raw: bytes) -> Job:
    request = openai.COMPLETION_DECODER.decode(raw)
    return Job(openai.COMPLETIONS, request.model, openai.completion_prompt(request), request.stream)


def _embedding_job(raw: bytes) -> Job:
    request = openai.EMBEDDING_DECODER.decode(raw)
    dialect = openai.EmbeddingsDialect(request)
    return Job(dialect, request.model, openai.embeddings_prompt(request), stream=False)


def _responses_job(raw: bytes) -> Job:
    request = responses.DECODER.decode(raw)
    prompt = responses.responses_prompt(request)
    return Job(responses.RESPONSES, request.model, prompt, request.stream)


def _messages_job(raw: bytes) -> Job:
    request = anthropic.MESSAGES_DECODER.decode(raw)
    prompt = anthropic.messages_prompt(request)
    return Job(anthropic.MESSAGES, request.model, prompt, request.stream)


class SimServer:
    """Route handlers over a node's shared state."""

    def __init__(self, state: NodeState, control: Control) -> None:
        self._state = state
        self._control = control
        self._pipeline = Pipeline(state)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.on_response_prepare.append(_stamp_headers)
        add = app.router.add_route
        for path in ("/", "/health"):
            add("GET", path, self.health)
        add("GET", "/metrics", self.metrics)
        add("GET", "/v1/models", self.models)
        add("POST", "/v1/models/unload", self.unload)
        add("POST", "/v1/models/reload", self.reload)
        add("POST", "/v1/models/status", self.status)
        inference: dict[str, tuple[Dialect, Callable[[bytes], Job]]] = {
            "/v1/chat/completions": (openai.CHAT, _chat_job),
            "/v1/completions": (openai.COMPLETIONS, _completion_job),
            "/v1/embeddings": (openai.CHAT, _embedding_job),
            "/v1/responses": (responses.RESPONSES, _responses_job),
        }
        if self._state.config.native_messages:
            inference["/v1/messages"] = (anthropic.MESSAGES, _messages_job)
            add("POST", "/v1/messages/count_tokens", self.count_tokens)
        for path, (dialect, decode) in inference.items():
            add("POST", path, self._inference_handler(path, dialect, decode))
        add("GET", "/_sim/faults", self.get_faults)
        add("POST", "/_sim/faults", self.set_faults)
        add("DELETE", "/_sim/faults", self.clear_faults)
        add("GET", "/_sim/counters", self.get_counters)
        for resource in app.router.resources():
            if isinstance(resource, web.Resource):
                resource.add_route("OPTIONS", _preflight)
        return app

    async def health(self, request: web.Request) -> web.Response:
        self._state.counters[request.path] += 1
        return web.Response(text="OK")

    async def metrics(self, request: web.Request) -> web.Response:
        self._state.counters["/metrics"] += 1
        admission = self._state.admission
        gauges = {
            "mistralrs_sequences_running": admission.running,
            "mistralrs_sequences_waiting": admission.waiting,
            "mistralrs_sequences_capacity": admission.capacity,
            "mistralrs_requests_pending_admission": self._state.registry.pending,
        }
        lines = [f"# TYPE {name} gauge\n{name} {value}\n" for name, value in gauges.items()]
        return web.Response(text="".join(lines), content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        self._state.counters["/v1/models"] += 1
        created = self._state.created
        data: list[dict[str, Any]] = [_model_entry("default", created)]
        for model_id, status in self._state.registry.listing():
            data.append({**_model_entry(model_id, created), "status": status})
        body = orjson.dumps({"object": "list", "data": data})
        return web.Response(body=body, content_type="application/json")

    async def unload(self, request: web.Request) -> web.Response:
        operation = await self._operation(request, "/v1/models/unload")
        if isinstance(operation, web.Response):
            return operation
        answer = self._forced(operation.model_id) or self._state.registry.unload(operation.model_id)
        return _json(answer.to_json())

    async def reload(self, request: web.Request) -> web.Response:
        operation = await self._operation(request, "/v1/models/reload")
        if isinstance(operation, web.Response):
            return operation
        answer = self._forced(operation.model_id)
        if answer is None:
            answer = await self._state.registry.reload(operation.model_id)
        return _json(answer.to_json())

    async def status(self, request: web.Request) -> web.Response:
        operation = await self._operation(request, "/v1/models/status")
        if isinstance(operation, web.Response):
            return operation
        return _json(self._state.registry.status(operation.model_id).to_json())

    async def _operation(self, request: web.Request, path: str) -> ModelOperation | web.Response:
        self._state.counters[path] += 1
        return await _model_operation(request)

    def _forced(self, model_id: str) -> LifecycleAnswer | None:
        forced = self._state.faults.lifecycle_status
        if forced is None:
            return None
        status = LifecycleStatus(forced)
        error = "simulated failure (cortex sim fault lifecycle_status)"
        return LifecycleAnswer(
            model_id, status, error if status.value == "internal_error" else None
        )

    def _inference_handler(
        self, path: str, dialect: Dialect, decode: Callable[[bytes], Job]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A handler for `path`; `dialect` shapes the errors found before decoding."""

        async def handle(request: web.Request) -> web.StreamResponse:
            self._state.counters[path] += 1
            refusal = await self._gate(dialect)
            if refusal is not None:
                return refusal
            try:
                job = decode(await request.read())
            except (msgspec.DecodeError, ValueError) as exc:
                return dialect.error(dialect.invalid_status, str(exc))
            return await self._pipeline.run(request, job)

        return handle

    async def count_tokens(self, request: web.Request) -> web.Response:
        self._state.counters["/v1/messages/count_tokens"] += 1
        refusal = await self._gate(anthropic.MESSAGES)
        if refusal is not None:
            return refusal
        try:
            decoded = anthropic.COUNT_TOKENS_DECODER.decode(await request.read())
            prompt = anthropic.messages_prompt(decoded)
        except (msgspec.DecodeError, ValueError) as exc:
            return anthropic.MESSAGES.error(anthropic.MESSAGES.invalid_status, str(exc))
        return _json({"input_tokens": prompt.tokens})

    async def _gate(self, dialect: Dialect) -> web.Response | None:
        """The request-wide faults: `stall` never answers, `status` answers an error."""
        faults = self._state.faults
        if faults.stall:
            await asyncio.get_running_loop().create_future()
        if faults.status is not None:
            return dialect.error(
                faults.status, f"simulated failure (cortex sim fault status={faults.status})"
            )
        return None

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json(self._faults_json())

    async def set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            patch = _PATCH_DECODER.decode(await request.read())
            self._control.apply_faults(
                msgspec.structs.replace(patch, refuse=UNSET, refuse_for_s=UNSET)
            )
        except (msgspec.DecodeError, ValueError) as exc:
            return message_error(422, str(exc))
        if patch.refuse is UNSET and patch.refuse_for_s is UNSET:
            return _json(self._faults_json())
        response = _json({**self._faults_json(), "refuse": patch.refuse is not False})
        # Answer before refusing: refusing drops this very connection.
        await response.prepare(request)
        await response.write_eof()
        self._control.apply_faults(
            FaultsPatch(refuse=patch.refuse, refuse_for_s=patch.refuse_for_s)
        )
        return response

    async def clear_faults(self, request: web.Request) -> web.Response:
        self._control.clear_faults()
        return _json(self._faults_json())

    async def get_counters(self, request: web.Request) -> web.Response:
        return _json(dict(self._state.counters))

    def _faults_json(self) -> dict[str, Any]:
        return {**self._state.faults.to_json(), "models": self._state.registry.ids}


def _model_entry(model_id: str, created: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "local",
        "root": model_id,
    }


async def _model_operation(request: web.Request) -> ModelOperation | web.Response:
    """Decode a lifecycle body the way axum's `Json` extractor does, rejections included."""
    mime = request.content_type
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        return _text(415, "Expected request with `Content-Type: application/json`")
    raw = await request.read()
    try:
        return _OPERATION_DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        return _text(422, f"Failed to deserialize the JSON body into the target type: {exc}")
    except ValueError as exc:
        return _text(400, f"Failed to parse the request body as JSON: {exc}")


def _json(body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


async def _preflight(request: web.Request) -> web.Response:
    return web.Response(headers=_CORS_PREFLIGHT)


async def _stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["x-request-id"] = request.headers.get("x-request-id") or f"req_{uuid.uuid4()}"
    headers.setdefault("Access-Control-Allow-Origin", "*")
