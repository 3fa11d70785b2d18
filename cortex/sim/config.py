"""What a simulated node serves: its models and its engine settings."""

from __future__ import annotations

import msgspec

_SPEC_FIELDS = ("SIZE_MB", "LOAD_S", "TOK_PER_S")


class SimModel(msgspec.Struct, forbid_unknown_fields=True):
    """One model a simulated node can serve.

    `size_mb` counts against the node's VRAM budget while the model is loaded,
    `load_s` is how long a (re)load takes, `tok_per_s` paces generation and
    `answer_tokens` is the length of an answer nobody cut short. Fields are
    validated when built; set them before the node is built (its registry reads
    `loaded` once; `load_s`, `tok_per_s` and `answer_tokens` are read per use).
    """

    id: str
    size_mb: int = 4096
    load_s: float = 2.0
    tok_per_s: float = 50.0
    loaded: bool = True
    answer_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.id or ":" in self.id or self.id == "default":
            raise ValueError(f"bad model id {self.id!r}: must be non-empty, no ':', not 'default'")
        if self.size_mb < 0 or self.load_s < 0 or self.answer_tokens < 0:
            raise ValueError(f"model {self.id!r}: size_mb, load_s and answer_tokens must be >= 0")
        if self.tok_per_s <= 0:
            raise ValueError(f"model {self.id!r}: tok_per_s must be > 0")

    @classmethod
    def parse(cls, spec: str) -> SimModel:
        """Parse the CLI form `ID[:SIZE_MB[:LOAD_S[:TOK_PER_S]]]`, e.g. `Qwen/Qwen3-4B:8000:3:40`."""
        model_id, *numbers = spec.strip().split(":")
        if len(numbers) > len(_SPEC_FIELDS):
            raise ValueError(f"bad model spec {spec!r}: expected ID[:SIZE_MB[:LOAD_S[:TOK_PER_S]]]")
        changes = {
            name.lower(): _parse_number(spec, name, text)
            for name, text in zip(_SPEC_FIELDS, numbers, strict=False)
        }
        return msgspec.structs.replace(cls(model_id), **changes)


def _parse_number(spec: str, name: str, text: str) -> float:
    try:
        return int(text) if name == "SIZE_MB" else float(text)
    except ValueError:
        kind = "an integer" if name == "SIZE_MB" else "a number"
        raise ValueError(f"bad model spec {spec!r}: {name} must be {kind}, got {text!r}") from None


class SimConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A simulated `mistralrs serve` node.

    `instant` drops all pacing (throughput benchmarks); `keepalive_s` is the SSE
    comment interval while a stream is silent; `native_messages` enables the
    newer `/v1/messages` routes (older nodes answer 404).
    """

    models: list[SimModel]
    vram_mb: int = 24576
    max_seqs: int = 32
    instant: bool = False
    keepalive_s: float = 10.0
    native_messages: bool = False
    name: str = "sim"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a sim node needs at least one model")
        ids = [model.id for model in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate model ids: {', '.join(duplicates)}")
        if self.max_seqs < 1 or self.vram_mb < 0 or self.keepalive_s <= 0:
            raise ValueError("max_seqs must be >= 1, vram_mb >= 0 and keepalive_s > 0")
