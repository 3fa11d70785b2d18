"""Claude Code itself (`claude -p`) against a real gateway and an emulated node.

`claude` comes from the npm package `@anthropic-ai/claude-code` (its native
binary): on PATH, or where .ci/run installs it (`.ci/claude/node_modules/.bin`).
Without it these tests skip. It runs with a throwaway HOME and no credentials
but a dummy API key, so it talks to nothing but the gateway.

What Claude Code sends is recorded as the gateway reads it, and what the node
got through the gateway's connection pool (see tests.test_messages.Spy); the
assertions name only the parts of its requests cortex relies on, so a newer
Claude Code that adds headers, tools or fields still passes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from cortex.app import Gateway
from cortex.proxy import DEFAULT_ANTHROPIC_MAX_TOKENS
from cortex.server import Request
from cortex.sim import SimConfig, SimModel, answer_text
from cortex.sim.text import tool_result_pieces
from tests.conftest import Fleet, FleetFactory
from tests.test_messages import Spy

ROOT = Path(__file__).resolve().parent.parent
CLAUDE = shutil.which("claude") or shutil.which(
    "claude", path=str(ROOT / ".ci" / "claude" / "node_modules" / ".bin")
)
RUN_TIMEOUT_S = 90.0

pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(
        CLAUDE is None,
        reason="Claude Code is not installed: "
        "npm install --prefix .ci/claude @anthropic-ai/claude-code",
    ),
]


@dataclass
class Sent:
    """One request as Claude Code sent it to the gateway."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]


def record_requests(gateway: Gateway) -> list[Sent]:
    """Record every API request body the gateway reads (all of Claude Code's carry one)."""
    seen: list[Sent] = []
    read_body = gateway.proxy._read_body

    async def reading(request: Request) -> bytes:
        raw = await read_body(request)
        headers = {name.lower(): value for name, value in request.headers.items()}
        seen.append(Sent(request.method, request.target, headers, orjson.loads(raw)))
        return raw

    gateway.proxy._read_body = reading  # type: ignore[method-assign]
    return seen


async def fleet_for_claude(make_fleet: FleetFactory, mode: str) -> Fleet:
    """One node serving m1; every Claude model name maps onto it."""
    sim = SimConfig(models=[SimModel("m1")], instant=True, native_messages=mode == "native")
    nodes = [{"name": "node-a", "endpoint": "{url:node-a}", "anthropic": mode}]
    return await make_fleet({"node-a": sim}, nodes=nodes, model_map={"claude-*": "m1"})


async def claude(fleet: Fleet, home: Path, prompt: str, *args: str) -> dict[str, Any]:
    """Run `claude -p PROMPT --output-format json ARGS` against the gateway; its JSON result."""
    assert CLAUDE is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": fleet.url,
        "ANTHROPIC_API_KEY": "anything",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        CLAUDE,
        "-p",
        prompt,
        "--output-format",
        "json",
        *args,
        cwd=home,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"claude did not finish within {RUN_TIMEOUT_S:g} s") from None
    assert proc.returncode == 0, f"claude exited {proc.returncode}: {out!r} {err!r}"
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    assert result["is_error"] is False, result
    return result


def messages_requests(sent: list[Sent]) -> list[Sent]:
    """The Messages calls; Claude Code may also count tokens, nothing else."""
    assert {s.path.partition("?")[0] for s in sent} <= {
        "/v1/messages",
        "/v1/messages/count_tokens",
    }
    return [s for s in sent if s.path.partition("?")[0] == "/v1/messages"]


def assert_claude_code_shape(request: Sent) -> None:
    """The parts of Claude Code's request that cortex depends on."""
    assert request.method == "POST"
    assert request.headers["x-api-key"] == "anything"
    assert request.headers["anthropic-version"] == "2023-06-01"
    body = request.body
    assert body["model"].startswith("claude-")  # mapped by `claude-*`
    assert body["stream"] is True
    assert isinstance(body["max_tokens"], int)
    assert isinstance(body["system"], list)
    assert all(block["type"] == "text" for block in body["system"])
    assert "Bash" in {tool["name"] for tool in body["tools"]}
    assert all(tool.get("type") in (None, "custom") for tool in body["tools"])


@pytest.mark.parametrize("mode", ["translate", "native"])
async def test_say_hi(make_fleet: FleetFactory, tmp_path: Path, mode: str) -> None:
    fleet = await fleet_for_claude(make_fleet, mode)
    sent, to_node = record_requests(fleet.gateway), Spy(fleet)
    result = await claude(fleet, tmp_path, "say hi")
    assert result["result"] == answer_text(32)
    (request,) = messages_requests(sent)
    assert_claude_code_shape(request)
    assert request.path == "/v1/messages?beta=true"
    last_user = next(m for m in reversed(request.body["messages"]) if m["role"] == "user")
    assert "say hi" in orjson.dumps(last_user["content"]).decode()
    (path, body), *_ = to_node.sent
    assert path == ("/v1/messages" if mode == "native" else "/v1/chat/completions")
    assert body["model"] == "m1"
    assert body["max_tokens"] == min(request.body["max_tokens"], DEFAULT_ANTHROPIC_MAX_TOKENS)
    if mode == "translate":
        assert body["stream"] is True and body["tools"]
        assert [m["role"] for m in body["messages"]] == ["system", "user"]


async def test_a_tool_use_round_trip_runs_bash(make_fleet: FleetFactory, tmp_path: Path) -> None:
    """The node asks for Claude Code's own Bash tool; Claude Code runs it and sends the result.

    Translated only: the emulator calls tools only when the last message is the
    user's, and natively Claude Code's last message is a system turn.
    """
    fleet = await fleet_for_claude(make_fleet, "translate")
    sent, to_node = record_requests(fleet.gateway), Spy(fleet)
    call = '[[tool:Bash {"command": "echo cortex-ok", "description": "echo"}]]'
    result = await claude(fleet, tmp_path, call, "--allowedTools", "Bash")
    assert result["result"] == "".join(tool_result_pieces("cortex-ok"))
    assert result["num_turns"] == 2
    first, second = messages_requests(sent)
    assert_claude_code_shape(first)
    assert_claude_code_shape(second)
    blocks = [block for m in second.body["messages"] for block in _blocks(m)]
    (use,) = [b for b in blocks if b["type"] == "tool_use"]
    assert (use["name"], use["input"]["command"]) == ("Bash", "echo cortex-ok")
    (answer,) = [b for b in blocks if b["type"] == "tool_result"]
    assert answer["tool_use_id"] == use["id"]
    assert "cortex-ok" in orjson.dumps(answer["content"]).decode()
    chats = [body for path, body in to_node.sent if path == "/v1/chat/completions"]
    assert len(chats) == 2
    tool_turn = chats[1]["messages"][-1]
    assert tool_turn == {"role": "tool", "tool_call_id": use["id"], "content": "cortex-ok"}


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content
