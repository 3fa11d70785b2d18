"""An emulated `mistralrs serve` node: the backend every cortex test and benchmark runs against.

It behaves like the real server as described in docs `mistralrs-api.md`, quirks
included, so that what passes against it means something:

- `GET /v1/models` lists a synthetic `default` entry (no `status`) first.
- Lifecycle calls always answer HTTP 200 with the outcome in the body's
  `status`; malformed bodies get axum's plain-text 400/415/422.
- `reload` of a loaded model answers `not_found` and leaves it stuck
  `reloading`, listed twice; an `unload` clears it (see `cortex.sim.models`).
- Unloading a model aborts its in-flight requests: streams end without `[DONE]`.
- A request to an unloaded model reloads it and gets no byte, not even headers,
  until loaded; other requests to that model meanwhile get 500
  "model `X` is being reloaded".
- Errors are `{"message": ...}` (500 internal, 422 validation), not OpenAI's
  envelope; an unknown model is 500 on chat/completions, 422 on embeddings.
- Chat streams repeat `role` in every delta, send usage (with mistral.rs's timing
  fields) only on the final chunk together with `finish_reason`, ignore
  `stream_options.include_usage`; completions streams carry no usage.
- `id` is a per-node counter; keep-alive comments every `keepalive_s`.
- At most `max_seqs` sequences run; the rest queue silently (no 429/503), visible
  only in `/metrics`.
- `/v1/messages` exists only with `native_messages=True` (older nodes: 404).

Beyond the real node: a VRAM budget with CUDA-OOM failures (`cortex.sim.models`),
deterministic content and token counts (`cortex.sim.text`, `cortex.sim.answer`),
tool calls and reasoning on request, and injectable faults (`cortex.sim.faults`).
"""

from cortex.sim.answer import PREFILL_SPEEDUP, FinishReason
from cortex.sim.config import SimConfig, SimModel
from cortex.sim.faults import Faults
from cortex.sim.models import LifecycleStatus, ModelStatus
from cortex.sim.node import SimNode, serve_forever
from cortex.sim.openai import chat_prompt_tokens
from cortex.sim.text import (
    EMBEDDING_DIM,
    REASONING_PIECES,
    answer_pieces,
    answer_text,
    embedding,
    estimate_tokens,
    tool_result_pieces,
)

__all__ = [
    "EMBEDDING_DIM",
    "PREFILL_SPEEDUP",
    "REASONING_PIECES",
    "Faults",
    "FinishReason",
    "LifecycleStatus",
    "ModelStatus",
    "SimConfig",
    "SimModel",
    "SimNode",
    "answer_pieces",
    "answer_text",
    "chat_prompt_tokens",
    "embedding",
    "estimate_tokens",
    "serve_forever",
    "tool_result_pieces",
]
