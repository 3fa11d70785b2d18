"""The emulator's pure parts: config parsing, deterministic content, answer planning, admission."""

from __future__ import annotations

import asyncio
import itertools

import orjson
import pytest

from cortex.sim import (
    EMBEDDING_DIM,
    REASONING_PIECES,
    Faults,
    SimConfig,
    SimModel,
    SimNode,
    answer_pieces,
    answer_text,
    chat_prompt_tokens,
    embedding,
    estimate_tokens,
)
from cortex.sim.admission import Admission
from cortex.sim.answer import FinishReason, Prompt, ToolMode, ToolSpec, plan, usage
from cortex.sim.dialect import SseBody
from cortex.sim.inference import stream_plan
from cortex.sim.text import arguments_from_schema

BASH = ToolSpec(
    "Bash",
    {
        "type": "object",
        "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
        "required": ["command"],
    },
)
READ = ToolSpec("Read", {"type": "object", "properties": {"path": {"type": "string"}}})
MODEL = SimModel("m", answer_tokens=5, tok_per_s=100.0)


def user(text: str, **kwargs: object) -> Prompt:
    return Prompt(chars=len(text), last_role="user", last_text=text, **kwargs)  # type: ignore[arg-type]


def answer(prompt: Prompt) -> object:
    return plan(prompt, MODEL, itertools.count(1))


def test_model_spec_parses_every_optional_field() -> None:
    assert SimModel.parse("Qwen/Qwen3-4B:8000:3:40") == SimModel("Qwen/Qwen3-4B", 8000, 3.0, 40.0)
    assert SimModel.parse("a") == SimModel("a")
    assert SimModel.parse("a:100").size_mb == 100


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a:big", "SIZE_MB must be an integer"),
        ("a:1:slow", "LOAD_S must be a number"),
        ("a:1:2:3:4", "expected ID[:SIZE_MB[:LOAD_S[:TOK_PER_S]]]"),
        (":1", "bad model id"),
        ("a:1:2:0", "tok_per_s must be > 0"),
    ],
)
def test_model_spec_errors_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        SimModel.parse(spec)


def test_config_rejects_duplicates_and_an_overcommitted_start() -> None:
    with pytest.raises(ValueError, match="duplicate model ids: a"):
        SimConfig(models=[SimModel("a"), SimModel("a")])
    too_big = SimConfig(
        models=[SimModel("a", size_mb=600), SimModel("b", size_mb=600)], vram_mb=1000
    )
    with pytest.raises(ValueError, match="need 1200 MiB but the node has vram_mb=1000"):
        SimNode(too_big)
    SimNode(
        SimConfig(
            models=[SimModel("a", size_mb=600), SimModel("b", 600, loaded=False)], vram_mb=1000
        )
    )


def test_content_and_token_counts_are_predictable() -> None:
    assert answer_pieces(3) == ["lorem ", "ipsum ", "dolor "]
    assert len(answer_pieces(45)) == 45
    assert answer_pieces(20)[19] == "lorem "
    assert answer_text(2) == "lorem ipsum "
    assert estimate_tokens(0) == 1
    assert estimate_tokens(41) == 10
    messages = [
        {"role": "system", "content": "x" * 10},
        {"role": "user", "content": [{"type": "text", "text": "y" * 30}]},
    ]
    assert chat_prompt_tokens(messages) == 10


def test_embeddings_are_deterministic_and_small() -> None:
    vector = embedding("hello")
    assert len(vector) == EMBEDDING_DIM
    assert vector == embedding("hello") != embedding("hello!")
    assert all(-1.0 <= v <= 1.0 for v in vector)


def test_arguments_fill_required_properties_from_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "n": {"type": "integer"},
            "b": {"type": "boolean"},
            "e": {"enum": ["fast", "slow"]},
            "o": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
            "optional": {"type": "string"},
        },
        "required": ["s", "n", "b", "e", "o"],
    }
    assert arguments_from_schema(schema) == {
        "s": "x",
        "n": 1,
        "b": True,
        "e": "fast",
        "o": {"x": 1},
    }


def test_a_plain_prompt_gets_answer_tokens_and_stop() -> None:
    result = plan(user("hi there"), MODEL, itertools.count(1))
    assert result.content == answer_pieces(5)
    assert result.finish is FinishReason.STOP
    assert (result.prompt_tokens, result.completion_tokens) == (2, 5)


def test_max_tokens_cuts_reasoning_then_content_with_length() -> None:
    cut = plan(user("hi", max_tokens=4, thinking=True), MODEL, itertools.count(1))
    assert cut.reasoning == list(REASONING_PIECES)
    assert cut.content == answer_pieces(1)
    assert cut.finish is FinishReason.LENGTH
    exact = plan(user("hi", max_tokens=5), MODEL, itertools.count(1))
    assert exact.finish is FinishReason.STOP


def test_tool_directive_with_arguments_calls_that_tool() -> None:
    prompt = user('please [[tool:Read {"path": "/etc/hosts"}]]', tools=(BASH, READ))
    result = plan(prompt, MODEL, itertools.count(7))
    assert [(c.id, c.name, orjson.loads(c.arguments)) for c in result.tool_calls] == [
        ("call_7", "Read", {"path": "/etc/hosts"})
    ]
    assert result.finish is FinishReason.TOOL_CALLS
    assert result.content == []


def test_a_tool_named_as_a_whole_word_is_called_with_schema_arguments() -> None:
    result = plan(user("run Bash for me", tools=(BASH, READ)), MODEL, itertools.count(1))
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("Bash", '{"command":"x"}')]
    assert plan(user("Bashful", tools=(BASH,)), MODEL, itertools.count(1)).tool_calls == []
    assert (
        plan(user("Read then Bash", tools=(BASH, READ)), MODEL, itertools.count(1))
        .tool_calls[0]
        .name
        == "Read"
    )


def test_parallel_directive_calls_the_first_tools() -> None:
    result = plan(user("[[tools:2]]", tools=(BASH, READ)), MODEL, itertools.count(1))
    assert [(c.id, c.name) for c in result.tool_calls] == [("call_1", "Bash"), ("call_2", "Read")]


def test_tool_choice_none_and_required() -> None:
    assert (
        plan(
            user("Bash", tools=(BASH,), tool_mode=ToolMode.NONE), MODEL, itertools.count(1)
        ).tool_calls
        == []
    )
    forced = plan(
        user("hello", tools=(BASH, READ), tool_mode=ToolMode.REQUIRED), MODEL, itertools.count(1)
    )
    assert [c.name for c in forced.tool_calls] == ["Bash"]


def test_a_tool_result_is_quoted_back() -> None:
    prompt = Prompt(chars=5, last_role="tool", last_text="42 files", tools=(BASH,))
    result = plan(prompt, MODEL, itertools.count(1))
    assert "".join(result.content) == "Tool result: 42 files "
    assert result.tool_calls == []


def test_usage_reports_nominal_timings_at_the_model_speed() -> None:
    result = plan(user("x" * 400), MODEL, itertools.count(1))
    fields = usage(result, MODEL)
    assert fields["prompt_tokens"] == 100
    assert fields["completion_tokens"] == 5
    assert fields["avg_compl_tok_per_sec"] == 100.0
    assert fields["total_completion_time_sec"] == 0.05
    assert fields["avg_prompt_tok_per_sec"] == 2000.0


async def test_admission_is_fifo_and_hands_slots_over() -> None:
    admission = Admission(1)
    assert admission.try_enter()
    first, second = admission.enqueue(), admission.enqueue()
    assert (admission.running, admission.waiting) == (1, 2)
    admission.abandon(first)
    assert admission.waiting == 1
    admission.leave()
    await asyncio.wait_for(second, 1)
    assert (admission.running, admission.waiting) == (1, 0)
    admission.abandon(second)
    assert admission.running == 0


def sse(*frames: bytes) -> SseBody:
    return SseBody(list(frames), [1] * len(frames), b"D", b"E")


def test_stream_faults_cut_replace_or_drop_frames() -> None:
    body = sse(b"1", b"2", b"3")
    assert stream_plan(body, Faults()).frames == [b"1", b"2", b"3", b"D"]
    assert stream_plan(body, Faults(no_done=True)).frames == [b"1", b"2", b"3"]
    assert stream_plan(body, Faults(error_after_chunks=1)).frames == [b"1", b"E"]
    dropped = stream_plan(body, Faults(drop_after_chunks=2))
    assert (dropped.frames, dropped.drop) == ([b"1", b"2"], True)


def test_faults_validate_lifecycle_status() -> None:
    faults = Faults()
    faults.lifecycle_status = "internal_error"
    assert faults.lifecycle_status == "internal_error"
    with pytest.raises(ValueError, match="'bogus' is not a valid LifecycleStatus"):
        faults.lifecycle_status = "bogus"
    faults.clear()
    assert faults.lifecycle_status is None
