"""What the runtime hands out: attached-adapter info and generation results (plain data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsft.adapters.terms import TermRange
from dsft.errors import DsftError, UsageError


class ContextLengthError(UsageError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class RuntimeClosedError(DsftError):
    """The runtime was closed while a request was generating: its adapters and multi-adapter tables are gone,
    so the request stopped (a request made after the close runs on the plain base, installed again)."""


@dataclass(frozen=True)
class AdapterInfo:
    """An attached adapter: its ref, where its files are, its compatibility with this base, its term ids."""

    domain: str
    version: str
    path: str
    status: str
    """``verified`` or ``compatible`` on this base (the registry's word at attach time)."""
    added_tokens: int
    term_range: TermRange | None
    """Its added tokens' ids in the loaded model (None: it adds none)."""
    nbytes: int
    via: str | None = None
    """How attach picked this version from what was asked: ``production tag``, ``newest version``, ``TAG tag``,
    or None when the version was named."""

    @property
    def ref(self) -> str:
        return f"{self.domain}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        r = self.term_range
        return {"ref": self.ref, "domain": self.domain, "version": self.version, "path": self.path,
                "status": self.status, "added_tokens": self.added_tokens, "bytes": self.nbytes,
                "term_ids": [r.start, r.end] if r else None, "via": self.via}


@dataclass
class Generation:
    """One generated completion: text, local token ids, why it ended, and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    adapter: str | None
    """The ref of the adapter that generated it (``finance@0.1.0``; None: the plain base)."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
