"""cortex: one OpenAI + Anthropic API in front of a fleet of mistral.rs nodes."""

__version__ = "0.1.0"
