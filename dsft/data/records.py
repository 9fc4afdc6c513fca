"""The normalised record every reader produces: raw text, an instruction pair, or a chat.

Torch-free and dependency-free, so that reading and checking data never pays for a model library.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["text", "instruction", "chat"]
Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One turn of a chat.

    ``tool_calls`` (assistant turns only) is the OpenAI ``tool_calls`` list as canonical JSON text
    (sorted keys), so that a message stays hashable and two spellings of one call compare equal;
    :meth:`Record.chat_dicts` hands it to chat templates as the list again. A ``tool`` turn's
    ``content`` is the tool's output.
    """

    role: Role
    content: str
    tool_calls: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"role", "content"[, "tool_calls"]}``, the form chat templates take."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls is not None:
            out["tool_calls"] = json.loads(self.tool_calls)
        return out


def canonical_tool_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """The canonical JSON text of a ``tool_calls`` list (see :class:`Message`)."""
    return json.dumps(list(calls), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Record:
    """One normalised training record; only the fields of its ``kind`` are set.

    ``source`` is ``"<file>:<n>"``: the line for JSONL/CSV/text files (a paragraph's first line),
    the 1-based row for Parquet and ``datasets`` data, the item for a JSON array.
    """

    kind: Kind
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: tuple[Message, ...] | None = None
    source: str = "<memory>"

    @staticmethod
    def raw(text: str, source: str = "<memory>") -> Record:
        return Record("text", text=text, source=source)

    @staticmethod
    def instruction(prompt: str, response: str, source: str = "<memory>") -> Record:
        return Record("instruction", prompt=prompt, response=response, source=source)

    @staticmethod
    def chat(messages: Sequence[Mapping[str, Any] | Message], source: str = "<memory>") -> Record:
        return Record("chat", messages=tuple(as_message(m) for m in messages), source=source)

    def chat_dicts(self) -> list[dict[str, Any]]:
        """The messages as ``[{"role", "content"}, ...]``, the form chat templates take."""
        return [m.to_dict() for m in self.messages or ()]

    def as_messages(self) -> tuple[Message, ...]:
        """An instruction as the one-turn chat it trains as (user, assistant); a chat's own messages."""
        if self.kind == "instruction":
            return (Message("user", self.prompt or ""), Message("assistant", self.response or ""))
        if self.kind == "chat":
            return self.messages or ()
        raise ValueError("a raw-text record has no messages")


def as_message(m: Mapping[str, Any] | Message) -> Message:
    """A :class:`Message` from itself or from ``{"role", "content"[, "tool_calls"]}``."""
    if isinstance(m, Message):
        return m
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, str):
        calls = canonical_tool_calls(calls)
    return Message(m["role"], m.get("content") or "", calls)
