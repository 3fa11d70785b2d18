"""The Anthropic Messages API through a real gateway and emulated nodes, with the real SDK.

Every node answers deterministically (``cortex.sim.text``), so a test can
predict the text, tool calls and token counts the SDK ends up with. A spy on
the gateway's connection pool records what cortex sent to which node path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic.types import Message

from cortex import proxy
from cortex.anthropic import estimate_tokens
from cortex.fleet import NodeHandle
from cortex.metrics import RequestRecord
from cortex.sim import REASONING_PIECES, SimConfig, SimModel, answer_text, chat_prompt_tokens
from cortex.sim.text import tool_result_pieces
from tests.conftest import Fleet, FleetFactory

MODEL = "claude-opus-4-8"
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CLOCK = {
    "name": "get_time",
    "description": "The time in a time zone.",
    "input_schema": {
        "type": "object",
        "properties": {"tz": {"type": "string"}},
        "required": ["tz"],
    },
}

_clients: list[anthropic.AsyncAnthropic] = []


def claude(url: str, **auth: str) -> anthropic.AsyncAnthropic:
    """An SDK client (``api_key=`` or ``auth_token=``), closed after the test."""
    client = anthropic.AsyncAnthropic(base_url=url, max_retries=0, **(auth or {"api_key": "x"}))
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


class Spy:
    """Records each request cortex sends a node (path and body), then sends it."""

    def __init__(self, fleet: Fleet) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[bytes] = []
        pool = fleet.gateway.proxy.pool
        pool_request = pool.request

        async def request(node: NodeHandle, path: str, body: bytes, request_id: str) -> Any:
            self._seen(path, body)
            return await pool_request(node, path, body, request_id)

        pool.request = request  # type: ignore[method-assign]

    def _seen(self, path: str, body: bytes) -> None:
        self.raw.append(body)
        self.sent.append((path, orjson.loads(body)))

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.sent]


class Records:
    """Stands in for the metrics recorder: keeps each request's record, then passes it on."""

    def __init__(self, inner: proxy.Recorder) -> None:
        self.inner = inner
        self.records: list[RequestRecord] = []

    def record(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        self.inner.record(rec)


def spy(fleet: Fleet) -> Spy:
    return Spy(fleet)


def records(fleet: Fleet) -> Records:
    fleet.gateway.proxy.recorder = kept = Records(fleet.gateway.proxy.recorder)
    return kept


def handle(fleet: Fleet, name: str = "node-a") -> NodeHandle:
    return fleet.gateway.supervisor.snapshot.nodes[name].handle


async def one_node(
    make_fleet: FleetFactory, mode: str = "translate", native: bool | None = None, **sections: Any
) -> Fleet:
    """One node serving m1 (32-token answers), Claude names mapped onto it."""
    native = mode != "translate" if native is None else native
    sim = SimConfig(models=[SimModel("m1")], instant=True, native_messages=native)
    sections.setdefault("model_map", {"claude-*": "m1"})
    nodes = [{"name": "node-a", "endpoint": "{url:node-a}", "anthropic": mode}]
    return await make_fleet({"node-a": sim}, nodes=nodes, **sections)


async def answer(client: anthropic.AsyncAnthropic, stream: bool, **kw: Any) -> Message:
    kw.setdefault("model", MODEL)
    kw.setdefault("max_tokens", 256)
    if not stream:
        return await client.messages.create(**kw)
    async with client.messages.stream(**kw) as stream_:
        return await stream_.get_final_message()


def text_of(message: Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


async def post(url: str, path: str, body: dict[str, Any] | bytes) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + path, data=data, headers={"content-type": "application/json"}) as r,
    ):
        return r.status, await r.read()


def events(raw: bytes) -> list[str]:
    return [line[7:] for line in raw.decode().split("\n") if line.startswith("event: ")]


# --- translated: the node speaks only OpenAI chat -------------------------------------


async def test_create_returns_the_nodes_answer(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet)
    message = await claude(fleet.url).messages.create(model=MODEL, max_tokens=256, messages=HELLO)
    assert message.id.startswith("msg_") and len(message.id) == 28
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert text_of(message) == answer_text(32)
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == chat_prompt_tokens(HELLO)
    assert message.usage.output_tokens == 32


async def test_stream_sends_one_text_delta_per_token(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet)
    async with claude(fleet.url).messages.stream(
        model=MODEL, max_tokens=256, messages=HELLO
    ) as stream:
        deltas = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert len(deltas) == 32
    assert "".join(deltas) == text_of(message) == answer_text(32)
    assert message.id.startswith("msg_") and message.model == MODEL
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 32)
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking_comes_first(make_fleet: FleetFactory, stream: bool) -> None:
    fleet = await one_node(make_fleet)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = await answer(claude(fleet.url), stream, messages=HELLO, thinking=thinking)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "".join(REASONING_PIECES)  # type: ignore[union-attr]
    assert text_of(message) == answer_text(32)
    assert message.usage.output_tokens == 32 + len(REASONING_PIECES)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_use_round_trip(make_fleet: FleetFactory, stream: bool) -> None:
    fleet = await one_node(make_fleet)
    client = claude(fleet.url)
    ask = [{"role": "user", "content": 'Paris? [[tool:get_weather {"city": "Paris"}]]'}]
    first = await answer(client, stream, messages=ask, tools=[WEATHER, CLOCK])
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"city": "Paris"}
    turn = {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}
    history = [
        *ask,
        {"role": "assistant", "content": [turn]},
        {"role": "user", "content": [result]},
    ]
    second = await answer(client, stream, messages=history, tools=[WEATHER, CLOCK])
    assert second.stop_reason == "end_turn"
    assert text_of(second) == "".join(tool_result_pieces("sunny, 21 C"))


@pytest.mark.parametrize("stream", [False, True])
async def test_two_parallel_tool_calls(make_fleet: FleetFactory, stream: bool) -> None:
    fleet = await one_node(make_fleet)
    client = claude(fleet.url)
    ask = [{"role": "user", "content": "Both, please. [[tools:2]]"}]
    first = await answer(client, stream, messages=ask, tools=[WEATHER, CLOCK])
    assert first.stop_reason == "tool_use"
    calls = [block for block in first.content if block.type == "tool_use"]
    assert [(c.name, c.input) for c in calls] == [
        ("get_weather", {"city": "x"}),
        ("get_time", {"tz": "x"}),
    ]
    assert len({c.id for c in calls}) == 2
    turns = [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.input} for c in calls]
    results = [
        {"type": "tool_result", "tool_use_id": c.id, "content": f"result {i}"}
        for i, c in enumerate(calls)
    ]
    history = [*ask, {"role": "assistant", "content": turns}, {"role": "user", "content": results}]
    second = await answer(client, stream, messages=history, tools=[WEATHER, CLOCK])
    assert text_of(second) == "".join(tool_result_pieces("result 1"))


async def test_a_system_turn_after_the_user_turn_still_gets_the_tool_call(
    make_fleet: FleetFactory,
) -> None:
    """Claude Code puts a `role: "system"` message after the user's (mid-conversation system)."""
    fleet = await one_node(make_fleet)
    spied = spy(fleet)
    ask = [
        {"role": "user", "content": 'Paris? [[tool:get_weather {"city": "Paris"}]]'},
        {"role": "system", "content": "Available agents: none."},
    ]
    message = await answer(
        claude(fleet.url), True, system="Be brief.", messages=ask, tools=[WEATHER]
    )
    assert message.stop_reason == "tool_use"
    sent = spied.sent[0][1]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief.\nAvailable agents: none."}
    assert [m["role"] for m in sent] == ["system", "user"]


async def test_count_tokens_is_an_estimate_without_touching_the_node(
    make_fleet: FleetFactory,
) -> None:
    fleet = await one_node(make_fleet)
    spied = spy(fleet)
    body: dict[str, Any] = {"model": MODEL, "system": "Be brief.", "messages": HELLO}
    counted = await claude(fleet.url).messages.count_tokens(**body, tools=[WEATHER])
    assert counted.input_tokens == estimate_tokens({**body, "tools": [WEATHER]})
    assert spied.sent == []


async def test_beta_query_is_accepted(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet)
    client = claude(fleet.url)
    message = await client.beta.messages.create(
        model=MODEL, max_tokens=64, messages=HELLO, betas=["interleaved-thinking-2025-05-14"]
    )
    assert message.content[0].text == answer_text(32)  # type: ignore[union-attr]
    status, raw = await post(
        fleet.url, "/v1/messages/count_tokens?beta=true", {"model": MODEL, "messages": HELLO}
    )
    assert status == 200 and orjson.loads(raw) == {
        "input_tokens": estimate_tokens({"messages": HELLO})
    }


# --- errors arrive as the SDK's own exceptions ----------------------------------------


async def test_unknown_model_is_not_found(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet)
    spied = spy(fleet)
    with pytest.raises(anthropic.NotFoundError) as info:
        await claude(fleet.url).messages.create(model="gpt-nope", max_tokens=8, messages=HELLO)
    assert info.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "The model `gpt-nope` does not exist on any node of this fleet",
        },
    }
    with pytest.raises(anthropic.NotFoundError):
        await claude(fleet.url).messages.count_tokens(model="gpt-nope", messages=HELLO)
    assert spied.sent == []


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"messages": []}, "messages: must be a non-empty list"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {"type": "text", "media_type": "text/plain", "data": "x"},
                            }
                        ],
                    }
                ]
            },
            "'document' is not supported",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "Anthropic server tool",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_or_unsupported_input_is_a_bad_request(
    make_fleet: FleetFactory, fields: dict[str, Any], fragment: str, stream: bool
) -> None:
    fleet = await one_node(make_fleet)
    spied = spy(fleet)
    kw: dict[str, Any] = {"messages": HELLO, **fields}
    with pytest.raises(anthropic.BadRequestError, match=fragment) as info:
        await answer(claude(fleet.url), stream, **kw)
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert spied.sent == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b"{not json", "not valid JSON"), (b"[1]", "invalid request body"), (b"{}", "`model`")],
)
async def test_malformed_bodies_get_anthropic_errors(
    make_fleet: FleetFactory, body: bytes, fragment: str
) -> None:
    fleet = await one_node(make_fleet)
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        status, raw = await post(fleet.url, path, body)
        error = orjson.loads(raw)
        assert status == 400 and error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        assert fragment in error["error"]["message"]


async def test_api_keys_by_x_api_key_or_bearer(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet, gateway={"api_keys": ["k-1"]})
    with pytest.raises(anthropic.AuthenticationError) as info:
        await claude(fleet.url, api_key="wrong").messages.create(
            model=MODEL, max_tokens=8, messages=HELLO
        )
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        await claude(fleet.url, auth_token="wrong").messages.count_tokens(
            model=MODEL, messages=HELLO
        )
    for auth in ({"api_key": "k-1"}, {"auth_token": "k-1"}):
        client = claude(fleet.url, **auth)
        message = await client.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
        assert message.stop_reason == "max_tokens"
        assert (await client.messages.count_tokens(model=MODEL, messages=HELLO)).input_tokens


# --- broken streams: `event: error`, never `message_stop` ---------------------------------


@pytest.mark.parametrize("mode", ["translate", "native"])
@pytest.mark.parametrize(
    ("fault", "fragment"),
    [
        ({"error_after_chunks": 4}, "simulated engine failure"),
        ({"no_done": True}, "ended"),
        ({"drop_after_chunks": 4}, "node-a"),
    ],
)
async def test_a_broken_stream_makes_the_sdk_raise(
    make_fleet: FleetFactory, mode: str, fault: dict[str, Any], fragment: str
) -> None:
    fleet = await one_node(make_fleet, mode)
    fleet.nodes["node-a"].apply_faults(fault)
    kept = records(fleet)
    with pytest.raises(anthropic.APIStatusError, match=fragment):
        await answer(claude(fleet.url), True, messages=HELLO)
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": HELLO}
    _, raw = await post(fleet.url, "/v1/messages", body)
    kinds = events(raw)
    assert kinds[0] == "message_start" and kinds.count("message_start") == 1
    assert kinds[-1] == "error" and kinds.count("error") == 1
    assert "message_stop" not in kinds
    assert len(kept.records) == 2
    assert all(rec.error for rec in kept.records)


# --- limits and names ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["translate", "native"])
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_is_clamped_to_the_models_limit(
    make_fleet: FleetFactory, mode: str, stream: bool
) -> None:
    fleet = await one_node(make_fleet, mode, models=[{"id": "m1", "max_tokens": 5}])
    spied = spy(fleet)
    message = await answer(claude(fleet.url), stream, max_tokens=1000, messages=HELLO)
    assert spied.sent[0][1]["max_tokens"] == 5
    assert text_of(message) == answer_text(5)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5


async def test_claude_codes_max_tokens_is_clamped_to_the_default(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet)
    spied = spy(fleet)
    await answer(claude(fleet.url), True, max_tokens=128000, messages=HELLO)
    assert spied.sent[0][1]["max_tokens"] == proxy.DEFAULT_ANTHROPIC_MAX_TOKENS


async def test_model_map_globs_on_both_dialects(make_fleet: FleetFactory) -> None:
    mapping = {"claude-*opus*": "big", "*": "small"}
    sim = SimConfig(
        models=[SimModel("big", answer_tokens=7), SimModel("small", answer_tokens=3)], instant=True
    )
    fleet = await make_fleet({"node-a": sim}, model_map=mapping)
    client = claude(fleet.url)
    for name, tokens in (
        ("claude-opus-4-8", 7),
        ("claude-3-opus-latest", 7),
        ("claude-haiku-4-5", 3),
    ):
        message = await client.messages.create(model=name, max_tokens=64, messages=HELLO)
        assert (message.model, text_of(message)) == (name, answer_text(tokens))
    async with aiohttp.ClientSession() as s:
        for name, target in (("claude-opus-4-8", "big"), ("gpt-4o", "small")):
            body = {"model": name, "messages": HELLO}
            async with s.post(fleet.url + "/v1/chat/completions", json=body) as r:
                chat = await r.json()
            assert chat["model"] == target
        async with s.get(fleet.url + "/v1/models") as r:
            listing = await r.json()
    assert listing["cortex"]["model_map"] == mapping
    assert sorted(m["id"] for m in listing["data"]) == ["big", "small"]


# --- native: the node serves /v1/messages itself ---------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_native_passes_the_nodes_answer_through(
    make_fleet: FleetFactory, stream: bool
) -> None:
    fleet = await one_node(make_fleet, "native")
    spied, kept = spy(fleet), records(fleet)
    message = await answer(
        claude(fleet.url),
        stream,
        messages=HELLO,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert spied.paths == ["/v1/messages"]
    assert spied.sent[0][1]["model"] == "m1"
    assert message.model == "m1"  # the node's own answer, byte for byte
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert text_of(message) == answer_text(32)
    (rec,) = kept.records
    assert (rec.endpoint, rec.node, rec.status, rec.error) == ("messages", "node-a", 200, "")
    assert (rec.prompt_tokens, rec.completion_tokens, rec.estimated) == (
        message.usage.input_tokens,
        32 + len(REASONING_PIECES),
        False,
    )


async def test_native_forwards_the_clients_bytes_when_nothing_changes(
    make_fleet: FleetFactory,
) -> None:
    fleet = await one_node(make_fleet, "native")
    spied = spy(fleet)
    raw = b'{ "model" : "m1",  "max_tokens": 64, "x-extra": [1, 2],\n'
    raw += b' "messages": [{"role":"user","content":"hi"}]}'
    status, body = await post(fleet.url, "/v1/messages", raw)
    assert status == 200 and orjson.loads(body)["type"] == "message"
    assert spied.raw == [raw]


async def test_auto_uses_a_new_node_natively(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet, "auto", native=True)
    spied = spy(fleet)
    assert handle(fleet).messages_native is None
    for stream in (True, False):
        message = await answer(claude(fleet.url), stream, messages=HELLO)
        assert message.model == "m1" and text_of(message) == answer_text(32)
    assert spied.paths == ["/v1/messages", "/v1/messages"]
    assert handle(fleet).messages_native is True


async def test_auto_probes_an_old_node_once_then_translates(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet, "auto", native=False)
    spied = spy(fleet)
    for stream in (True, False, True):
        message = await answer(claude(fleet.url), stream, messages=HELLO)
        assert message.model == MODEL and text_of(message) == answer_text(32)
    assert spied.paths == ["/v1/messages"] + ["/v1/chat/completions"] * 3
    assert handle(fleet).messages_native is False
    counted = await claude(fleet.url).messages.count_tokens(model=MODEL, messages=HELLO)
    assert counted.input_tokens == estimate_tokens({"messages": HELLO})
    assert spied.paths[4:] == []


async def test_native_count_tokens_is_the_nodes(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet, "native")
    spied = spy(fleet)
    body: dict[str, Any] = {"model": MODEL, "system": "Be brief.", "messages": HELLO}
    counted = await claude(fleet.url).messages.count_tokens(**body)
    assert counted.input_tokens == (len("Be brief.") + len("hello there")) // 4
    assert counted.input_tokens != estimate_tokens(body)
    assert spied.sent == [("/v1/messages/count_tokens", {**body, "model": "m1"})]


@pytest.mark.parametrize(
    ("status", "outcome"), [(500, "estimate"), (529, "estimate"), (400, anthropic.BadRequestError)]
)
async def test_native_count_tokens_falls_back_only_when_the_node_fails(
    make_fleet: FleetFactory, status: int, outcome: Any
) -> None:
    fleet = await one_node(make_fleet, "native")
    fleet.nodes["node-a"].faults.status = status
    client = claude(fleet.url)
    if outcome == "estimate":
        counted = await client.messages.count_tokens(model=MODEL, messages=HELLO)
        assert counted.input_tokens == estimate_tokens({"messages": HELLO})
    else:
        with pytest.raises(outcome, match="simulated failure"):
            await client.messages.count_tokens(model=MODEL, messages=HELLO)


async def test_auto_count_tokens_probes_too(make_fleet: FleetFactory) -> None:
    old = await one_node(make_fleet, "auto", native=False)
    new = await one_node(make_fleet, "auto", native=True)
    for fleet, expected, learnt in (
        (old, estimate_tokens({"messages": HELLO}), False),
        (new, 2, True),
    ):
        counted = await claude(fleet.url).messages.count_tokens(model=MODEL, messages=HELLO)
        assert counted.input_tokens == expected
        assert handle(fleet).messages_native is learnt


async def test_a_stream_waiting_for_a_load_starts_once(
    make_fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep-alives while a model loads are comments: the leg's own message_start comes once."""
    monkeypatch.setattr(proxy, "KEEPALIVE_EVERY_S", 0.05)
    for mode in ("translate", "auto"):
        sim = SimConfig(
            models=[SimModel("m1", loaded=False, load_s=0.3)],
            instant=True,
            native_messages=mode == "auto",
        )
        nodes = [{"name": "node-a", "endpoint": "{url:node-a}", "anthropic": mode}]
        fleet = await make_fleet({"node-a": sim}, nodes=nodes, model_map={"claude-*": "m1"})
        body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": HELLO}
        status, raw = await post(fleet.url, "/v1/messages", body)
        assert status == 200 and raw.startswith(b": cortex")
        kinds = events(raw)
        assert kinds.count("message_start") == 1 and kinds[-1] == "message_stop"


async def test_the_root_answers_claude_codes_reachability_check(make_fleet: FleetFactory) -> None:
    fleet = await one_node(make_fleet)
    async with aiohttp.ClientSession() as s:
        async with s.head(fleet.url + "/") as r:
            assert r.status == 200
        async with s.get(fleet.url + "/") as r:
            assert r.status == 200
