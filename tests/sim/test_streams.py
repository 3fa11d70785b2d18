"""Answers over real HTTP: exact stream shapes, tools, reasoning, pacing, queueing, dialects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from cortex.sim import (
    EMBEDDING_DIM,
    REASONING_PIECES,
    SimConfig,
    SimModel,
    SimNode,
    answer_text,
    chat_prompt_tokens,
    embedding,
)

USAGE_FIELDS = {
    "completion_tokens",
    "prompt_tokens",
    "total_tokens",
    "avg_tok_per_sec",
    "avg_prompt_tok_per_sec",
    "avg_compl_tok_per_sec",
    "total_time_sec",
    "total_prompt_time_sec",
    "total_completion_time_sec",
}
BASH = {
    "type": "function",
    "function": {
        "name": "Bash",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
            "required": ["command", "timeout"],
        },
    },
}
READ = {
    "type": "function",
    "function": {"name": "Read", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def node() -> AsyncIterator[SimNode]:
    config = SimConfig(
        models=[SimModel("m", answer_tokens=6), SimModel("other")],
        instant=True,
        native_messages=True,
    )
    async with SimNode(config).running() as running:
        yield running


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with session.post(url, json=body) as response:
        return response.status, await response.text()


def data_lines(text: str) -> list[Any]:
    """Every frame of an SSE body must be one `data:` line; JSON payloads decoded, `[DONE]` kept."""
    frames = text.split("\n\n")
    assert frames[-1] == ""
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith("data: ") and "\n" not in frame, frame
        payload = frame.removeprefix("data: ")
        payloads.append(payload if payload == "[DONE]" else json.loads(payload))
    return payloads


def events(text: str) -> list[tuple[str, Any]]:
    """Frames of `event:` + `data:` lines, as Anthropic and Responses streams send them."""
    pairs = []
    for frame in text.split("\n\n")[:-1]:
        kind, data = frame.split("\n")
        pairs.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return pairs


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def chat_stream(session: aiohttp.ClientSession, node: SimNode, **body: Any) -> list[Any]:
    status, text = await post(session, f"{node.url}/v1/chat/completions", {"stream": True, **body})
    assert status == 200
    return data_lines(text)


async def test_chat_stream_has_the_exact_mistralrs_shape(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    body = chat_body("x" * 40, stream_options={"include_usage": False})
    async with session.post(
        f"{node.url}/v1/chat/completions", json={**body, "stream": True}
    ) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        chunks = data_lines(await response.text())
    assert chunks[-1] == "[DONE]"
    *content, final = chunks[:-1]
    assert len(content) == 6
    for chunk in chunks[:-1]:
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["model"], chunk["system_fingerprint"], chunk["id"]) == (
            "m",
            "local",
            chunks[0]["id"],
        )
        (choice,) = chunk["choices"]
        assert choice["delta"]["role"] == "assistant" and choice["delta"]["tool_calls"] is None
        assert choice["logprobs"] is None and choice["index"] == 0
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == answer_text(6)
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["delta"]["content"] == ""
    assert set(final["usage"]) == USAGE_FIELDS
    assert (final["usage"]["prompt_tokens"], final["usage"]["completion_tokens"]) == (10, 6)
    assert final["usage"]["total_tokens"] == 16


async def test_answer_ids_count_per_node(session: aiohttp.ClientSession, node: SimNode) -> None:
    first = await chat_stream(session, node, **chat_body("hi"))
    second = await chat_stream(session, node, **chat_body("hi"))
    assert int(second[0]["id"]) == int(first[0]["id"]) + 1


async def test_max_tokens_cuts_with_length(session: aiohttp.ClientSession, node: SimNode) -> None:
    for limit in ("max_tokens", "max_completion_tokens"):
        chunks = await chat_stream(session, node, **chat_body("hi", **{limit: 2}))
        assert len(chunks) == 4
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-2]["usage"]["completion_tokens"] == 2


async def test_non_streaming_chat_shape(session: aiohttp.ClientSession, node: SimNode) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
    ]
    status, text = await post(
        session, f"{node.url}/v1/chat/completions", {"model": "m", "messages": messages}
    )
    body = json.loads(text)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "content": answer_text(6),
        "role": "assistant",
        "tool_calls": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert set(body["usage"]) == USAGE_FIELDS
    assert body["usage"]["prompt_tokens"] == chat_prompt_tokens(messages) == 4


async def test_completions_stream_carries_no_usage(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    status, text = await post(
        session, f"{node.url}/v1/completions", {"model": "m", "prompt": "abc", "stream": True}
    )
    chunks = data_lines(text)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == answer_text(6)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    status, text = await post(
        session, f"{node.url}/v1/completions", {"model": "m", "prompt": "abc", "max_tokens": 1}
    )
    body = json.loads(text)
    assert (body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == ("lorem ", "length")
    assert body["usage"]["completion_tokens"] == 1


async def test_embeddings_are_deterministic_vectors(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    status, text = await post(
        session, f"{node.url}/v1/embeddings", {"model": "m", "input": ["alpha", "beta"]}
    )
    body = json.loads(text)
    assert status == 200 and body["object"] == "list" and body["model"] == "m"
    assert [(d["object"], d["index"], d["embedding"]) for d in body["data"]] == [
        ("embedding", 0, embedding("alpha")),
        ("embedding", 1, embedding("beta")),
    ]
    assert len(body["data"][0]["embedding"]) == EMBEDDING_DIM
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


async def test_unknown_models_and_invalid_bodies(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, text = await post(
            session, node.url + path, {"model": "x", "messages": [], "prompt": "p"}
        )
        if path == "/v1/completions":
            assert status == 500
            assert json.loads(text)["message"].startswith(
                "Requested model 'x' is not available. Available models: m, other."
            )
    status, text = await post(
        session, f"{node.url}/v1/chat/completions", chat_body("hi", model="x")
    )
    assert status == 500 and "Requested model 'x' is not available" in json.loads(text)["message"]
    status, text = await post(session, f"{node.url}/v1/embeddings", {"model": "x", "input": "hi"})
    assert status == 422 and "Requested model 'x'" in json.loads(text)["message"]
    status, text = await post(session, f"{node.url}/v1/chat/completions", {"model": "m"})
    assert status == 422 and "messages" in json.loads(text)["message"]
    async with session.post(f"{node.url}/v1/chat/completions", data=b"{nope") as response:
        assert response.status == 422 and "message" in await response.json()


async def test_tool_directive_calls_the_tool_whole_in_one_chunk(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    body = chat_body('go [[tool:Bash {"command": "ls -l"}]]', tools=[BASH, READ])
    chunks = await chat_stream(session, node, **body)
    assert chunks[-1] == "[DONE]"
    (call_chunk,) = chunks[:-1]
    choice = call_chunk["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["delta"]["content"] is None and choice["delta"]["role"] == "assistant"
    (call,) = choice["delta"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "Bash", "arguments": '{"command":"ls -l"}'}
    assert call_chunk["usage"]["completion_tokens"] > 0


async def test_naming_a_tool_calls_it_with_schema_arguments(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    status, text = await post(
        session, f"{node.url}/v1/chat/completions", chat_body("please use Bash", tools=[BASH, READ])
    )
    message = json.loads(text)["choices"][0]["message"]
    assert status == 200 and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "Bash", "arguments": '{"command":"x","timeout":1}'}
    ]
    chunks = await chat_stream(session, node, **chat_body("[[tools:2]]", tools=[BASH, READ]))
    calls = chunks[0]["choices"][0]["delta"]["tool_calls"]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "Bash"), (1, "Read")]
    assert calls[0]["id"] != calls[1]["id"]


async def test_a_tool_result_is_quoted_in_the_answer(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    messages = [
        {"role": "user", "content": "use Bash"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "Bash", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "file1 file2"},
    ]
    chunks = await chat_stream(session, node, model="m", messages=messages, tools=[BASH])
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert text == "Tool result: file1 file2 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_reasoning_comes_before_content_on_request(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    for body in (chat_body("hi", enable_thinking=True), chat_body("hi [[think]]")):
        chunks = await chat_stream(session, node, **body)
        deltas = [c["choices"][0]["delta"] for c in chunks[:-2]]
        reasoning = deltas[: len(REASONING_PIECES)]
        assert [d["reasoning_content"] for d in reasoning] == list(REASONING_PIECES)
        assert all(d["content"] is None for d in reasoning)
        assert all("reasoning_content" not in d for d in deltas[len(REASONING_PIECES) :])
        assert chunks[-2]["usage"]["completion_tokens"] == len(REASONING_PIECES) + 6


async def test_tokens_are_paced_and_silences_get_keepalives(session: aiohttp.ClientSession) -> None:
    config = SimConfig(models=[SimModel("slow", tok_per_s=10.0, answer_tokens=3)], keepalive_s=0.04)
    async with SimNode(config).running() as node:
        started = asyncio.get_running_loop().time()
        status, text = await post(
            session,
            f"{node.url}/v1/chat/completions",
            {**chat_body("hi", model="slow"), "stream": True},
        )
        elapsed = asyncio.get_running_loop().time() - started
    assert status == 200 and 0.28 <= elapsed < 2.0
    frames = text.split("\n\n")
    assert ":" in frames and frames.index(":") < frames.index("data: [DONE]")
    assert len([f for f in frames if f.startswith("data: {")]) == 4


async def test_sequences_beyond_max_seqs_queue_silently(session: aiohttp.ClientSession) -> None:
    config = SimConfig(models=[SimModel("m", tok_per_s=20.0, answer_tokens=5)], max_seqs=1)
    async with SimNode(config).running() as node:
        body = {**chat_body("hi"), "stream": True}
        requests = [
            asyncio.ensure_future(post(session, f"{node.url}/v1/chat/completions", body))
            for _ in range(3)
        ]
        for _ in range(100):
            if node.waiting_sequences == 2:
                break
            await asyncio.sleep(0.01)
        async with session.get(f"{node.url}/metrics") as response:
            metrics = dict(
                line.split()
                for line in (await response.text()).splitlines()
                if not line.startswith("#")
            )
        assert metrics == {
            "mistralrs_sequences_running": "1",
            "mistralrs_sequences_waiting": "2",
            "mistralrs_sequences_capacity": "1",
            "mistralrs_requests_pending_admission": "0",
        }
        results = await asyncio.wait_for(asyncio.gather(*requests), 3)
    assert [status for status, _ in results] == [200, 200, 200]
    assert all(data_lines(text)[-1] == "[DONE]" for _, text in results)


async def test_responses_api_minimal_shape(session: aiohttp.ClientSession, node: SimNode) -> None:
    status, text = await post(
        session,
        f"{node.url}/v1/responses",
        {"model": "m", "input": "hello", "instructions": "be nice"},
    )
    body = json.loads(text)
    assert status == 200 and body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0] == {
        "type": "output_text",
        "text": answer_text(6),
        "annotations": [],
    }
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 6, "total_tokens": 9}
    status, text = await post(
        session, f"{node.url}/v1/responses", {"model": "m", "input": "hi", "stream": True}
    )
    kinds = [kind for kind, _ in events(text)]
    assert kinds == ["response.created"] + ["response.output_text.delta"] * 6 + [
        "response.completed"
    ]


async def test_messages_routes_are_absent_on_older_nodes(session: aiohttp.ClientSession) -> None:
    async with SimNode(SimConfig(models=[SimModel("m")], instant=True)).running() as node:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            status, _ = await post(
                session, node.url + path, {"model": "m", "max_tokens": 5, "messages": []}
            )
            assert status == 404


async def test_native_messages_stream_uses_event_lines(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    body = {
        "model": "m",
        "max_tokens": 128000,
        "stream": True,
        "system": [{"type": "text", "text": "sys"}],
        "messages": [{"role": "user", "content": "hi [[think]] [[tool:Read]]"}],
        "tools": [
            {
                "name": "Read",
                "input_schema": {
                    "type": "object",
                    "properties": {"p": {"type": "string"}},
                    "required": ["p"],
                },
            }
        ],
    }
    async with session.post(f"{node.url}/v1/messages?beta=true", json=body) as response:
        assert response.status == 200
        pairs = events(await response.text())
    assert all(kind == payload["type"] for kind, payload in pairs)
    kinds = [kind for kind, _ in pairs]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [p["content_block"]["type"] for k, p in pairs if k == "content_block_start"]
    assert starts == ["thinking", "tool_use"]
    json_parts = [
        p["delta"]["partial_json"]
        for k, p in pairs
        if k == "content_block_delta" and p["delta"]["type"] == "input_json_delta"
    ]
    assert json.loads("".join(json_parts)) == {"p": "x"}
    assert pairs[-2][1]["delta"]["stop_reason"] == "tool_use"
    status, text = await post(
        session,
        f"{node.url}/v1/messages/count_tokens",
        {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]},
    )
    assert (status, json.loads(text)) == (200, {"input_tokens": 10})


async def test_native_messages_errors_use_the_anthropic_envelope(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    status, text = await post(session, f"{node.url}/v1/messages", {"model": "m", "messages": []})
    assert status == 400
    assert json.loads(text)["error"]["type"] == "invalid_request_error"
    body = {
        "model": "claude-opus-5-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    status, text = await post(session, f"{node.url}/v1/messages", body)
    assert status == 404 and json.loads(text)["type"] == "error"


async def test_official_sdks_parse_the_streams(node: SimNode) -> None:
    async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x") as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == answer_text(6)
    bash = {
        "name": "Bash",
        "input_schema": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    }
    claude = anthropic.AsyncAnthropic(base_url=node.url, api_key="x")
    async with (
        claude,
        claude.messages.stream(
            model="m",
            max_tokens=100,
            messages=[{"role": "user", "content": "use Bash"}],
            tools=[bash],
        ) as stream,
    ):
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("tool_use", {"command": "x"})
    ]
