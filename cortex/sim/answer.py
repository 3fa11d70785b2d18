"""How a simulated model answers: pure functions from a prompt to an answer.

Every API dialect (chat, completions, responses, messages) first reduces its
request to a `Prompt`, then `plan()` decides the answer, then the dialect renders
it. Rules (see `cortex.sim.text` for the exact words):

- Tools are called only when the request has tools, `tool_choice` is not "none"
  and the last message is a user message. Then, first match wins:
  `[[tools:N]]` calls the first N tools in parallel; `[[tool:NAME {args}]]` calls
  NAME; a forced `tool_choice` calls that tool; a tool name mentioned as a whole
  word calls the one mentioned earliest; `tool_choice` "required" calls the first
  tool. Arguments not given are generated from the tool's JSON schema. A tool
  call's completion tokens are `estimate_tokens(len(name) + len(arguments))`.
- A last message that is a tool result is answered `Tool result: <content>`.
- Otherwise the answer is `answer_pieces(model.answer_tokens)`.
- Thinking (`enable_thinking`, Anthropic `thinking`, or `[[think]]` in the last
  user text) puts `REASONING_PIECES` before the answer.
- `max_tokens` cuts reasoning + content (finish `length`); tool calls are never cut.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from cortex.sim.config import SimModel
from cortex.sim.text import (
    REASONING_PIECES,
    answer_pieces,
    arguments_from_schema,
    estimate_tokens,
    first_mentioned,
    parallel_directive,
    tool_directive,
    tool_result_pieces,
    wants_thinking,
)

PREFILL_SPEEDUP = 20.0
"""Prompt tokens are processed this many times faster than tokens are generated."""


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"


class ToolMode(enum.Enum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    schema: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Prompt:
    """What any request dialect boils down to.

    `chars` is the length of all message text (system prompt, message contents,
    tool results; not tool definitions nor tool-call arguments).
    """

    chars: int
    last_role: str
    last_text: str
    tools: tuple[ToolSpec, ...] = ()
    tool_mode: ToolMode = ToolMode.AUTO
    forced_tool: str | None = None
    thinking: bool = False
    max_tokens: int | None = None

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.chars)


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """A JSON object, encoded."""


@dataclass(frozen=True, slots=True)
class Answer:
    prompt_tokens: int
    reasoning: list[str]
    content: list[str]
    tool_calls: list[ToolCall]
    tool_tokens: int
    finish: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.reasoning) + len(self.content) + self.tool_tokens


def plan(prompt: Prompt, model: SimModel, call_ids: Iterator[int]) -> Answer:
    """Decide the whole answer to `prompt`; `call_ids` numbers tool calls `call_<n>`."""
    reasoning = list(REASONING_PIECES) if _thinking(prompt) else []
    calls = [_call(prompt, name, args, call_ids) for name, args in _chosen_tools(prompt)]
    if calls:
        tokens = sum(estimate_tokens(len(c.name) + len(c.arguments)) for c in calls)
        return Answer(prompt.tokens, reasoning, [], calls, tokens, FinishReason.TOOL_CALLS)
    if prompt.last_role == "tool":
        content = tool_result_pieces(prompt.last_text)
    else:
        content = answer_pieces(model.answer_tokens)
    return _cut(prompt, reasoning, content)


def _thinking(prompt: Prompt) -> bool:
    return prompt.thinking or (prompt.last_role == "user" and wants_thinking(prompt.last_text))


def _chosen_tools(prompt: Prompt) -> list[tuple[str, dict[str, Any] | None]]:
    if not prompt.tools or prompt.tool_mode is ToolMode.NONE or prompt.last_role != "user":
        return []
    text = prompt.last_text
    count = parallel_directive(text)
    if count:
        return [(tool.name, None) for tool in prompt.tools[:count]]
    directive = tool_directive(text)
    if directive:
        return [directive]
    name = prompt.forced_tool or first_mentioned(text, [tool.name for tool in prompt.tools])
    if name is None and prompt.tool_mode is ToolMode.REQUIRED:
        name = prompt.tools[0].name
    return [(name, None)] if name else []


def _call(
    prompt: Prompt, name: str, args: dict[str, Any] | None, call_ids: Iterator[int]
) -> ToolCall:
    if args is None:
        schema = next((tool.schema for tool in prompt.tools if tool.name == name), {})
        args = arguments_from_schema(schema)
    return ToolCall(f"call_{next(call_ids)}", name, orjson.dumps(args).decode())


def _cut(prompt: Prompt, reasoning: list[str], content: list[str]) -> Answer:
    budget = prompt.max_tokens
    if budget is None or budget >= len(reasoning) + len(content):
        return Answer(prompt.tokens, reasoning, content, [], 0, FinishReason.STOP)
    reasoning = reasoning[:budget]
    content = content[: budget - len(reasoning)]
    return Answer(prompt.tokens, reasoning, content, [], 0, FinishReason.LENGTH)


@dataclass(frozen=True, slots=True)
class Timing:
    """Nominal durations of an answer at the model's speed (what usage reports)."""

    prompt_s: float
    completion_s: float

    @classmethod
    def of(cls, answer: Answer, model: SimModel) -> Timing:
        prefill = model.tok_per_s * PREFILL_SPEEDUP
        return cls(answer.prompt_tokens / prefill, answer.completion_tokens / model.tok_per_s)

    @property
    def total_s(self) -> float:
        return self.prompt_s + self.completion_s


def usage(answer: Answer, model: SimModel) -> dict[str, Any]:
    """mistral.rs usage: token counts plus nominal timings at the model's speed."""
    timing = Timing.of(answer, model)
    prompt, completion = answer.prompt_tokens, answer.completion_tokens
    return {
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "avg_tok_per_sec": _rate(prompt + completion, timing.total_s),
        "avg_prompt_tok_per_sec": _rate(prompt, timing.prompt_s),
        "avg_compl_tok_per_sec": _rate(completion, timing.completion_s),
        "total_time_sec": round(timing.total_s, 3),
        "total_prompt_time_sec": round(timing.prompt_s, 3),
        "total_completion_time_sec": round(timing.completion_s, 3),
    }


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 1) if seconds > 0 else 0.0
