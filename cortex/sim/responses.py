"""A minimal OpenAI Responses API (`/v1/responses`): text and function calls.

Streams send `response.created`, one `response.output_text.delta` per token and
`response.completed` (with the whole response and usage); no `[DONE]`.
Reasoning tokens are counted in usage but not shown.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
from aiohttp import web

from cortex.sim.answer import Answer, FinishReason, Prompt, ToolSpec
from cortex.sim.dialect import FAULT_MESSAGE, Reply, SseBody, event, message_error
from cortex.sim.openai import tool_choice


class Part(msgspec.Struct):
    type: str
    text: str | None = None


class Item(msgspec.Struct):
    type: str = "message"
    role: str = "user"
    content: str | list[Part] | None = None
    output: str | list[Part] | None = None


class FunctionTool(msgspec.Struct):
    name: str = ""
    type: str = "function"
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ResponsesRequest(msgspec.Struct):
    input: str | list[Item]
    model: str = "default"
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None


DECODER = msgspec.json.Decoder(ResponsesRequest)


def _text(content: str | list[Part] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content)


def _role_and_text(item: Item) -> tuple[str, str]:
    if item.type == "function_call_output":
        return "tool", _text(item.output)
    if item.type == "function_call":
        return "assistant", ""
    return item.role, _text(item.content)


def responses_prompt(request: ResponsesRequest) -> Prompt:
    items = [Item(content=request.input)] if isinstance(request.input, str) else request.input
    if not items:
        raise ValueError("`input` must not be empty")
    turns = [_role_and_text(item) for item in items]
    mode, forced = tool_choice(request.tool_choice)
    tools = tuple(ToolSpec(t.name, t.parameters) for t in request.tools or () if t.name)
    return Prompt(
        chars=len(request.instructions or "") + sum(len(text) for _, text in turns),
        last_role=turns[-1][0],
        last_text=turns[-1][1],
        tools=tools,
        tool_mode=mode,
        forced_tool=forced,
        max_tokens=request.max_output_tokens,
    )


def _output(answer: Answer, reply: Reply) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {
            "type": "function_call",
            "id": f"fc_{call.id}",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
            "status": "completed",
        }
        for call in answer.tool_calls
    ]
    if not answer.tool_calls:
        text = {"type": "output_text", "text": "".join(answer.content), "annotations": []}
        items.append(
            {
                "type": "message",
                "id": f"msg_{reply.id}",
                "status": "completed",
                "role": "assistant",
                "content": [text],
            }
        )
    return items


def _response(answer: Answer | None, reply: Reply) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": f"resp_{reply.id}",
        "object": "response",
        "created_at": reply.created,
        "model": reply.model.id,
        "status": "in_progress",
        "output": [],
        "usage": None,
    }
    if answer is not None:
        cut = answer.finish is FinishReason.LENGTH
        document["status"] = "incomplete" if cut else "completed"
        document["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
        document["output"] = _output(answer, reply)
        document["usage"] = {
            "input_tokens": answer.prompt_tokens,
            "output_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }
    return document


class ResponsesDialect:
    unknown_model_status = 500
    invalid_status = 422

    def stream(self, answer: Answer, reply: Reply) -> SseBody:
        frames = [
            event(
                "response.created", {"type": "response.created", "response": _response(None, reply)}
            )
        ]
        for piece in answer.content:
            delta = {
                "type": "response.output_text.delta",
                "item_id": f"msg_{reply.id}",
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
            }
            frames.append(event("response.output_text.delta", delta))
        done = {"type": "response.completed", "response": _response(answer, reply)}
        frames.append(event("response.completed", done))
        costs = [0] + [1] * len(answer.content) + [len(answer.reasoning) + answer.tool_tokens]
        error = {"type": "error", "code": "server_error", "message": FAULT_MESSAGE, "param": None}
        return SseBody(frames, costs, b"", event("error", error))

    def body(self, answer: Answer, reply: Reply) -> bytes:
        return orjson.dumps(_response(answer, reply))

    def error(self, status: int, message: str) -> web.Response:
        return message_error(status, message)


RESPONSES = ResponsesDialect()
