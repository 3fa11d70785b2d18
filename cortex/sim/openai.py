"""OpenAI-style routes as mistral.rs speaks them: chat, completions, embeddings.

Chat stream chunks repeat `role` and `tool_calls: null` in every delta, carry
`usage: null` until the final chunk, which has `finish_reason` and mistral.rs's
usage together (`stream_options.include_usage` is ignored); then `[DONE]`.
Completions streams carry no usage at all. The constant parts of a chunk are
encoded once per answer and only the token is encoded per chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import orjson
from aiohttp import web

from cortex.sim.answer import Answer, Prompt, ToolCall, ToolMode, ToolSpec, usage
from cortex.sim.dialect import (
    DONE,
    OPENAI_STREAM_ERROR,
    Reply,
    SseBody,
    message_error,
)
from cortex.sim.text import embedding, estimate_tokens


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


Content = str | list[ContentPart] | None


class ChatMessage(msgspec.Struct):
    role: str
    content: Content = None


class FunctionDef(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ToolDef(msgspec.Struct):
    function: FunctionDef
    type: str = "function"


class ChatRequest(msgspec.Struct):
    messages: list[ChatMessage]
    model: str = "default"
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    enable_thinking: bool | None = None


class CompletionRequest(msgspec.Struct):
    prompt: str | list[str]
    model: str = "default"
    stream: bool = False
    max_tokens: int | None = None


class EmbeddingRequest(msgspec.Struct):
    input: str | list[str]
    model: str = "default"


CHAT_DECODER = msgspec.json.Decoder(ChatRequest)
COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
EMBEDDING_DECODER = msgspec.json.Decoder(EmbeddingRequest)


def content_text(content: Content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


def chat_prompt(request: ChatRequest) -> Prompt:
    """Reduce a chat request to what the simulated model looks at."""
    if not request.messages:
        raise ValueError("`messages` must not be empty")
    texts = [content_text(m.content) for m in request.messages]
    mode, forced = tool_choice(request.tool_choice)
    tools = tuple(ToolSpec(t.function.name, t.function.parameters) for t in request.tools or ())
    return Prompt(
        chars=sum(map(len, texts)),
        last_role=request.messages[-1].role,
        last_text=texts[-1],
        tools=tools,
        tool_mode=mode,
        forced_tool=forced,
        thinking=bool(request.enable_thinking),
        max_tokens=request.max_tokens
        if request.max_tokens is not None
        else request.max_completion_tokens,
    )


def chat_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The `prompt_tokens` a node reports for these OpenAI chat messages."""
    decoded = msgspec.convert(messages, list[ChatMessage])
    return estimate_tokens(sum(len(content_text(m.content)) for m in decoded))


def tool_choice(choice: str | dict[str, Any] | None) -> tuple[ToolMode, str | None]:
    if isinstance(choice, dict):
        return ToolMode.REQUIRED, (choice.get("function") or {}).get("name") or choice.get("name")
    if choice in ("none", "required"):
        return ToolMode(choice), None
    return ToolMode.AUTO, None


def completion_prompt(request: CompletionRequest) -> Prompt:
    texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    return Prompt(
        chars=sum(map(len, texts)),
        last_role="completion",
        last_text=texts[-1] if texts else "",
        max_tokens=request.max_tokens,
    )


def _tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


def _envelope(reply: Reply, kind: str) -> tuple[bytes, bytes]:
    """The bytes around `choices` of every chunk of one answer."""
    head = b'data: {"id":"' + reply.id.encode() + b'","choices":['
    tail = (
        b'],"created":'
        + str(reply.created).encode()
        + b',"model":'
        + orjson.dumps(reply.model.id)
        + b',"system_fingerprint":"local","object":"'
        + kind.encode()
        + b'"'
    )
    return head, tail


class ChatDialect:
    unknown_model_status = 500
    invalid_status = 422

    def stream(self, answer: Answer, reply: Reply) -> SseBody:
        head, tail = _envelope(reply, "chat.completion.chunk")
        head += b'{"finish_reason":null,"index":0,"delta":{"content":'
        tail = b',"role":"assistant","tool_calls":null},"logprobs":null}' + tail
        tail += b',"usage":null}\n\n'
        reasoning = head + b'null,"reasoning_content":'
        frames = [reasoning + orjson.dumps(piece) + tail for piece in answer.reasoning]
        frames += [head + orjson.dumps(piece) + tail for piece in answer.content]
        frames.append(self._final_chunk(answer, reply))
        costs = [1] * (len(frames) - 1) + [answer.tool_tokens]
        return SseBody(frames, costs, DONE, OPENAI_STREAM_ERROR)

    def _final_chunk(self, answer: Answer, reply: Reply) -> bytes:
        delta: dict[str, Any] = {"content": "", "role": "assistant", "tool_calls": None}
        if answer.tool_calls:
            calls = _tool_calls_json(answer.tool_calls)
            delta = {"content": None, "role": "assistant", "tool_calls": calls}
        choice = {"finish_reason": answer.finish, "index": 0, "delta": delta, "logprobs": None}
        chunk = self._document(reply, "chat.completion.chunk", choice, answer)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def body(self, answer: Answer, reply: Reply) -> bytes:
        message: dict[str, Any] = {
            "content": None if answer.tool_calls else "".join(answer.content),
            "role": "assistant",
            "tool_calls": _tool_calls_json(answer.tool_calls) if answer.tool_calls else None,
        }
        if answer.reasoning:
            message["reasoning_content"] = "".join(answer.reasoning)
        choice = {"finish_reason": answer.finish, "index": 0, "message": message, "logprobs": None}
        return orjson.dumps(self._document(reply, "chat.completion", choice, answer))

    @staticmethod
    def _document(reply: Reply, kind: str, choice: object, answer: Answer) -> dict[str, Any]:
        return {
            "id": reply.id,
            "choices": [choice],
            "created": reply.created,
            "model": reply.model.id,
            "system_fingerprint": "local",
            "object": kind,
            "usage": usage(answer, reply.model),
        }

    def error(self, status: int, message: str) -> web.Response:
        return message_error(status, message)


class CompletionDialect:
    unknown_model_status = 500
    invalid_status = 422

    def stream(self, answer: Answer, reply: Reply) -> SseBody:
        head, tail = _envelope(reply, "text_completion")
        head += b'{"text":'
        middle = b',"index":0,"logprobs":null,"finish_reason":'
        tail += b"}\n\n"
        frames = [head + orjson.dumps(p) + middle + b"null}" + tail for p in answer.content]
        final = b'"' + answer.finish.value.encode() + b'"'
        frames.append(head + b'""' + middle + final + b"}" + tail)
        costs = [1] * (len(frames) - 1) + [0]
        return SseBody(frames, costs, DONE, OPENAI_STREAM_ERROR)

    def body(self, answer: Answer, reply: Reply) -> bytes:
        choice = {
            "finish_reason": answer.finish,
            "index": 0,
            "text": "".join(answer.content),
            "logprobs": None,
        }
        return orjson.dumps(
            {
                "id": reply.id,
                "choices": [choice],
                "created": reply.created,
                "model": reply.model.id,
                "system_fingerprint": "local",
                "object": "text_completion",
                "usage": usage(answer, reply.model),
            }
        )

    def error(self, status: int, message: str) -> web.Response:
        return message_error(status, message)


def embeddings_prompt(request: EmbeddingRequest) -> Prompt:
    """Embedding requests generate nothing: `max_tokens=0` leaves only the prompt."""
    inputs = [request.input] if isinstance(request.input, str) else request.input
    return Prompt(chars=sum(map(len, inputs)), last_role="embedding", last_text="", max_tokens=0)


class EmbeddingsDialect:
    """One per request: the body needs the inputs."""

    unknown_model_status = 422
    invalid_status = 422

    def __init__(self, request: EmbeddingRequest) -> None:
        self._inputs = [request.input] if isinstance(request.input, str) else request.input

    def stream(self, answer: Answer, reply: Reply) -> SseBody:
        raise TypeError("embeddings do not stream")

    def body(self, answer: Answer, reply: Reply) -> bytes:
        data = [
            {"object": "embedding", "embedding": embedding(text), "index": i}
            for i, text in enumerate(self._inputs)
        ]
        tokens = answer.prompt_tokens
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": reply.model.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def error(self, status: int, message: str) -> web.Response:
        return message_error(status, message)


CHAT = ChatDialect()
COMPLETIONS = CompletionDialect()
