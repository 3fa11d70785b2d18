"""Native Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`), as newer nodes serve them.

Streams are `event: <type>` + `data:` frames: `message_start`, then per content
block (thinking, text, each tool_use) `content_block_start`, deltas
(`thinking_delta`, `text_delta`, two `input_json_delta` fragments per tool call)
and `content_block_stop`, then `message_delta` (stop_reason, cumulative usage)
and `message_stop`. Errors use the Anthropic envelope; a mid-stream error is an
`event: error` frame with no `message_stop` after it.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
from aiohttp import web

from cortex.sim.answer import Answer, FinishReason, Prompt, ToolCall, ToolMode, ToolSpec
from cortex.sim.dialect import FAULT_MESSAGE, Reply, SseBody, event

STOP_REASONS = {
    FinishReason.STOP: "end_turn",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.TOOL_CALLS: "tool_use",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_TOOL_MODES = {"auto": ToolMode.AUTO, "any": ToolMode.REQUIRED, "tool": ToolMode.REQUIRED}


class Block(msgspec.Struct):
    type: str
    text: str | None = None
    content: str | list[Block] | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[Block]


class Tool(msgspec.Struct):
    name: str
    input_schema: dict[str, Any] = msgspec.field(default_factory=dict)


class ToolChoice(msgspec.Struct):
    type: str
    name: str | None = None


class Thinking(msgspec.Struct):
    type: str = "enabled"


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message]
    system: str | list[Block] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: int
    stream: bool = False


MESSAGES_DECODER = msgspec.json.Decoder(MessagesRequest)
COUNT_TOKENS_DECODER = msgspec.json.Decoder(CountTokensRequest)


def _text(content: str | list[Block] | None, kinds: tuple[str, ...] = ("text",)) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = (_block_text(block) for block in content if block.type in kinds)
    return "".join(parts)


def _block_text(block: Block) -> str:
    if block.type == "text":
        return block.text or ""
    return _text(block.content)


def _last_turn(message: Message) -> tuple[str, str]:
    """(role, text) the model answers: tool results only when no user text came with them."""
    text = _text(message.content)
    if message.role == "user" and not text and isinstance(message.content, list):
        results = [_block_text(b) for b in message.content if b.type == "tool_result"]
        if results:
            return "tool", results[-1]
    return message.role, text


def messages_prompt(request: CountTokensRequest) -> Prompt:
    """Reduce a Messages request to what the simulated model looks at."""
    if not request.messages:
        raise ValueError("messages: at least one message is required")
    texts = [_text(m.content, ("text", "tool_result")) for m in request.messages]
    role, text = _last_turn(request.messages[-1])
    choice = request.tool_choice
    thinking = request.thinking is not None and request.thinking.type != "disabled"
    return Prompt(
        chars=len(_text(request.system)) + sum(map(len, texts)),
        last_role=role,
        last_text=text,
        tools=tuple(ToolSpec(t.name, t.input_schema) for t in request.tools or ()),
        tool_mode=_TOOL_MODES.get(choice.type, ToolMode.NONE) if choice else ToolMode.AUTO,
        forced_tool=choice.name if choice and choice.type == "tool" else None,
        thinking=thinking,
        max_tokens=request.max_tokens if isinstance(request, MessagesRequest) else None,
    )


def _usage(answer: Answer) -> dict[str, int]:
    return {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens}


class _Blocks:
    """Accumulates the frames of a stream, numbering content blocks in start order."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.costs: list[int] = []
        self._index = -1

    def add(self, kind: str, payload: dict[str, Any], cost: int = 0) -> None:
        self.frames.append(event(kind, {"type": kind, **payload}))
        self.costs.append(cost)

    def block(self, start: dict[str, Any], deltas: list[dict[str, Any]], costs: list[int]) -> None:
        self._index += 1
        self.add("content_block_start", {"index": self._index, "content_block": start})
        for delta, cost in zip(deltas, costs, strict=True):
            self.add("content_block_delta", {"index": self._index, "delta": delta}, cost)
        self.add("content_block_stop", {"index": self._index})


def _tool_block(blocks: _Blocks, call: ToolCall, cost: int) -> None:
    start = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
    half = len(call.arguments) // 2
    fragments = [call.arguments[:half], call.arguments[half:]]
    deltas = [{"type": "input_json_delta", "partial_json": f} for f in fragments]
    blocks.block(start, deltas, [cost, 0])


class MessagesDialect:
    unknown_model_status = 404
    invalid_status = 400

    def stream(self, answer: Answer, reply: Reply) -> SseBody:
        blocks = _Blocks()
        blocks.add("message_start", {"message": self._message(answer, reply, [], None)})
        if answer.reasoning:
            deltas = [{"type": "thinking_delta", "thinking": p} for p in answer.reasoning]
            start = {"type": "thinking", "thinking": "", "signature": ""}
            blocks.block(start, deltas, [1] * len(deltas))
        if not answer.tool_calls:
            deltas = [{"type": "text_delta", "text": p} for p in answer.content]
            blocks.block({"type": "text", "text": ""}, deltas, [1] * len(deltas))
        for i, call in enumerate(answer.tool_calls):
            _tool_block(blocks, call, answer.tool_tokens if i == 0 else 0)
        stop = {"stop_reason": STOP_REASONS[answer.finish], "stop_sequence": None}
        blocks.add("message_delta", {"delta": stop, "usage": _usage(answer)})
        return SseBody(blocks.frames, blocks.costs, MESSAGE_STOP, STREAM_ERROR)

    def body(self, answer: Answer, reply: Reply) -> bytes:
        content: list[dict[str, Any]] = []
        if answer.reasoning:
            thinking = "".join(answer.reasoning)
            content.append({"type": "thinking", "thinking": thinking, "signature": ""})
        if not answer.tool_calls:
            content.append({"type": "text", "text": "".join(answer.content)})
        for call in answer.tool_calls:
            tool_input = orjson.loads(call.arguments)
            content.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input}
            )
        message = self._message(answer, reply, content, STOP_REASONS[answer.finish])
        message["usage"] = _usage(answer)
        return orjson.dumps(message)

    @staticmethod
    def _message(
        answer: Answer, reply: Reply, content: list[dict[str, Any]], stop_reason: str | None
    ) -> dict[str, Any]:
        return {
            "id": f"msg_{reply.id}",
            "type": "message",
            "role": "assistant",
            "model": reply.model.id,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 0},
        }

    def error(self, status: int, message: str) -> web.Response:
        return web.Response(
            status=status,
            body=orjson.dumps(error_envelope(status, message)),
            content_type="application/json",
        )


def error_envelope(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


MESSAGE_STOP = event("message_stop", {"type": "message_stop"})
STREAM_ERROR = event("error", error_envelope(500, FAULT_MESSAGE))
MESSAGES = MessagesDialect()
