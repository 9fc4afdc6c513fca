"""Request bodies of the OpenAI-compatible endpoints (fields OpenAI clients send and dsft ignores are allowed).

Ranges are checked here, so that a bad value is a 400 for its own request and never reaches a batch:
the limits are the runtime's (:func:`dsft.runtime.generation.check_sampling`).
Every text a request carries must be valid Unicode: JSON's ``\\ud800`` escape decodes to a lone UTF-16
surrogate, which no tokenizer or response can encode, so it is refused here, naming the field (checked
before the type, so that every field gives the same message).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from dsft.runtime.generation import MAX_SEED, MIN_TEMPERATURE


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where ``value`` (a string, or lists and objects of strings, keys included) holds text that UTF-8
    cannot encode: ``"at position P[ of PATH]"``; None when all of it can be."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"at position {exc.start}" + (f" of {where}" if where else "")
        return None
    if isinstance(value, list):
        pairs = [(f"{where}[{i}]", None, item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        pairs = [(f"{where}[{ascii(key)}]", key, item) for key, item in value.items()]
    else:
        return None
    for path, key, item in pairs:
        problem = (_lone_surrogate(key, f"the key {path}") if key is not None else None) or _lone_surrogate(item, path)
        if problem:
            return problem
    return None


def _unicode_text(value: Any) -> Any:
    """``value`` unchanged when all its text is valid Unicode; else the field's error (one line)."""
    problem = _lone_surrogate(value)
    if problem:
        raise PydanticCustomError("invalid_unicode", "not valid Unicode text (a lone surrogate {problem})",
                                  {"problem": problem})
    return value


MAX_STOPS = 16
MAX_STOP_CHARS = 1024


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

    @field_validator("model", "stop", mode="before")
    @classmethod
    def _model_stop_unicode(cls, value: Any) -> Any:
        return _unicode_text(value)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        # Each stop string holds back as many characters of the stream and is searched for at every token.
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value

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

    @field_validator("prompt", "suffix", mode="before")
    @classmethod
    def _text_unicode(cls, value: Any) -> Any:
        return _unicode_text(value)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role", "content", mode="before")
    @classmethod
    def _text_unicode(cls, value: Any) -> Any:
        return _unicode_text(value)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class AttachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, max_length=256)
    """The adapter to attach: ``finance``, ``finance@1.2.0`` or ``finance@production``."""

    @field_validator("ref", mode="before")
    @classmethod
    def _ref_unicode(cls, value: Any) -> Any:
        return _unicode_text(value)
