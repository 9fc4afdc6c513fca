"""Request bodies of the OpenAI-compatible endpoints (fields OpenAI clients send and dsft ignores are allowed).

Ranges are checked here, so that a bad value is a 400 for its own request and never reaches a batch:
the limits are the runtime's (:func:`dsft.runtime.generation.check_sampling`).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsft.runtime.generation import MAX_SEED, MIN_TEMPERATURE


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    """An attached adapter (``finance``, ``finance@1.2.0``, ``finance@production``) or the base's name."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False
    """Extension (as in vLLM): keep generating past the end-of-sequence token."""

    @field_validator("temperature")
    @classmethod
    def _not_tiny(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE} (smaller values overflow), got {value!r}")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    """An instruction to answer, or (with ``raw``) text to continue; or a list of them."""
    raw: bool = False
    """Extension, as ``dsft generate --raw``: continue the prompt as plain text instead of answering it."""
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class AttachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, max_length=256)
    """The adapter to attach: ``finance``, ``finance@1.2.0`` or ``finance@production``."""
