"""One prompt format: how a conversation becomes token ids, for training and for serving alike.

Training encodes a record with :func:`encode_chat` (an instruction is the one-turn chat
user/assistant, :func:`encode_instruction`); serving encodes a request with :func:`encode_prompt`.
Both render through the same functions here, so the ids a served conversation gets as its prompt are
exactly the ids that preceded the assistant's reply when the adapter trained (issue 21.6):

* **with a chat template** (``tokenizer.chat_template``): the template renders the conversation.
  Loss positions come from ``return_assistant_tokens_mask`` when the template marks assistant text
  with ``{% generation %}``; otherwise each assistant turn's span is found by rendering the
  conversation up to it (with the generation prompt) and through it, falling back to locating the
  turn's content in the full rendering;
* **without one** (the presets, most base models): dsft's plain template
  ``### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<eos>`` (system turns ``### System:``,
  tool results ``### Tool:``, an assistant's tool calls one JSON object per line after its text).

Loss is on assistant turns (and their end-of-turn or EOS token) only.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dsft.data.records import Message, as_message
from dsft.errors import DataError, UsageError

IGNORE = -100
"""Label value that takes no loss (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``)."""

HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n", "tool": "### Tool:\n"}
TURN_END = "\n\n"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Segments = list[tuple[str, bool]]
"""A rendered conversation as (text, takes loss) pieces, in order."""
Turns = Sequence[Message | Mapping[str, Any]]


def encode_instruction(tokenizer: Any, prompt: str, response: str, seq_len: int) -> tuple[list[int], list[int]]:
    """Encode a prompt/response pair as the one-turn chat (user, assistant) it serves as.

    Returns:
        ``(input_ids, labels)`` as :func:`encode_chat`.
    """
    return encode_chat(tokenizer, [Message("user", prompt), Message("assistant", response)], seq_len)


def encode_chat(tokenizer: Any, messages: Turns, seq_len: int) -> tuple[list[int], list[int]]:
    """Encode one conversation; loss on the assistant turns only.

    Args:
        tokenizer: a Hugging Face tokenizer (with an EOS token when it has no chat template).
        messages: :class:`Message` objects or ``{"role", "content"[, "tool_calls"]}`` dicts.
        seq_len: the result is cut to at most this many tokens, keeping the start.

    Returns:
        ``(input_ids, labels)``, equal lengths <= ``seq_len``, unpadded; labels are ``IGNORE``
        outside assistant turns.

    Raises:
        DataError: the chat template fails on the conversation, or an assistant turn cannot be located.
    """
    check_seq_len(seq_len)
    turns = [as_message(m) for m in messages]
    if not has_chat_template(tokenizer):
        return _encode_segments(tokenizer, _plain_segments(turns), seq_len, plain=True)
    if _GENERATION_TAG.search(tokenizer.chat_template):
        masked = _encode_with_mask(tokenizer, turns)
        if masked is not None:
            ids, labels = masked
            return ids[:seq_len], labels[:seq_len]
    return _encode_segments(tokenizer, _template_segments(tokenizer, turns), seq_len, plain=False)


def encode_chats(tokenizer: Any, conversations: Sequence[Turns], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_chat` of many conversations: the same ids and labels. With dsft's plain template the
    segments of all of them go through the tokenizer in two calls (its per-call cost, not the text,
    dominates short examples: ~25x faster on instruction records); a chat template renders one by one.

    Raises:
        DataError: as :func:`encode_chat`, for the first conversation that fails.
    """
    check_seq_len(seq_len)
    if has_chat_template(tokenizer):
        return [encode_chat(tokenizer, c, seq_len) for c in conversations]
    segments = [_plain_segments([as_message(m) for m in c]) for c in conversations]
    eos = eos_id(tokenizer)
    # the first segment of an example gets the tokenizer's BOS (special=True), the others none: see _encode_segments
    firsts = iter(encode_texts(tokenizer, [s[0][0] for s in segments if s], special=True, split=True))
    rest = iter(encode_texts(tokenizer, [text for s in segments for text, _ in s[1:]], special=False, split=True))
    out = []
    for segs in segments:
        ids: list[int] = []
        labels: list[int] = []
        for k, (_, trained) in enumerate(segs):
            piece = next(firsts) if k == 0 else next(rest)
            if trained:
                piece = piece + [eos]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        out.append((ids[:seq_len], labels[:seq_len]))
    return out


def encode_prompt(tokenizer: Any, messages: Turns) -> list[int]:
    """Prompt ids for a conversation whose next turn is the assistant's: the ids :func:`encode_chat`
    puts before an assistant turn that follows these messages.

    Raises:
        UsageError: no messages; DataError: the chat template fails on them.
    """
    if not messages:
        raise UsageError("messages must hold at least one message")
    turns = [as_message(m) for m in messages]
    if has_chat_template(tokenizer):
        text = _render(tokenizer, [m.to_dict() for m in turns], generation=True)
        return _encode_segments(tokenizer, [(text, False)], 1 << 30, plain=False)[0]
    segments = _merge([*_plain_segments(turns), (HEADERS["assistant"], False)])
    return _encode_segments(tokenizer, segments, 1 << 30, plain=True)[0]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# --- rendering ---------------------------------------------------------------------------------


def _assistant_text(m: Message) -> str:
    if not m.tool_calls:
        return m.content
    fns = [c.get("function", c) for c in json.loads(m.tool_calls)]
    calls = [json.dumps({"name": f.get("name"), "arguments": f.get("arguments", {})}, ensure_ascii=False) for f in fns]
    return "\n".join([m.content, *calls] if m.content else calls)


def _plain_segments(turns: Sequence[Message]) -> Segments:
    segments: Segments = []
    for m in turns:
        if m.role == "assistant":
            segments += [(HEADERS["assistant"], False), (_assistant_text(m), True)]
        else:
            # no separator after an assistant turn: its EOS ends it
            segments.append((HEADERS[m.role] + m.content + TURN_END, False))
    return _merge(segments)


def _render(tokenizer: Any, dicts: list[dict[str, Any]], generation: bool = False) -> str:
    if not dicts:
        return ""
    try:
        return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # jinja2 errors, or the template's own raise_exception(...)
        raise DataError(f"the tokenizer's chat template fails on this conversation ({e}); "
                        "check the roles' order") from None


def _encode_with_mask(tokenizer: Any, turns: Sequence[Message]) -> tuple[list[int], list[int]] | None:
    """The template's own assistant mask; None when it marks nothing (a generation block elsewhere)."""
    try:
        out = tokenizer.apply_chat_template([m.to_dict() for m in turns], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception as e:
        raise DataError(f"the tokenizer's chat template fails on this conversation ({e}); "
                        "check the roles' order") from None
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        return None
    return ids, [i if m else IGNORE for i, m in zip(ids, mask)]


def _template_segments(tokenizer: Any, turns: Sequence[Message]) -> Segments:
    dicts = [m.to_dict() for m in turns]
    full = _render(tokenizer, dicts)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(turns):
        if m.role != "assistant":
            continue
        before, through = _render(tokenizer, dicts[:i], generation=True), _render(tokenizer, dicts[: i + 1])
        if full.startswith(before) and full.startswith(through) and cursor <= len(before) < len(through):
            span = (len(before), len(through))
        else:
            span = _find_content(tokenizer, full, m.content, cursor, i)
        spans.append(span)
        cursor = span[1]
    segments: Segments = []
    pos = 0
    for start, end in spans:
        segments += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segments.append((full[pos:], False))
    return _merge(segments)


def _find_content(tokenizer: Any, full: str, content: str, cursor: int, i: int) -> tuple[int, int]:
    """Locate an assistant turn's content in the full rendering; extend it over an end-of-turn token."""
    needle = content.strip()  # templates often trim content
    at = full.find(needle, cursor) if needle else -1
    if at < 0:
        raise DataError(f"cannot find assistant turn messages[{i}] in the chat template's rendering; "
                        "use a tokenizer without a template or report the template")
    end = at + len(needle)
    specials = set(getattr(tokenizer, "all_special_tokens", [])) | set(getattr(tokenizer, "get_added_vocab", dict)())
    follow = max((s for s in specials if s and full.startswith(s, end)), key=len, default="")
    return at, end + len(follow)


def _merge(segments: Segments) -> Segments:
    merged: Segments = []
    for text, trained in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def _encode_segments(tokenizer: Any, segments: Segments, seq_len: int, plain: bool) -> tuple[list[int], list[int]]:
    # Plain template: user text is data, so "<|endoftext|>" written in it is not a control token
    # (split_special_tokens), the tokenizer's BOS (if any) starts the example, and each trained
    # segment gets EOS. Chat template: the rendering already holds BOS and end-of-turn tokens.
    eos = eos_id(tokenizer) if plain else None
    ids: list[int] = []
    labels: list[int] = []
    for k, (text, trained) in enumerate(segments):
        piece = encode_texts(tokenizer, [text], special=plain and k == 0, split=plain)[0]
        if trained and eos is not None:
            piece = piece + [eos]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids[:seq_len], labels[:seq_len]


# --- tokenizer access ------------------------------------------------------------------------------


def encode_texts(tokenizer: Any, texts: list[str], special: bool, split: bool) -> list[list[int]]:
    """Token ids of each text (``special``: add BOS/EOS as the tokenizer does; ``split``: special-token
    text in ``texts`` is plain text)."""
    if not texts:
        return []
    # verbose=False: long documents are expected here; they are packed, not fed to the model whole
    enc = tokenizer(texts, add_special_tokens=special, split_special_tokens=split, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UsageError("the tokenizer has no EOS token; set tokenizer.eos_token before building examples")
    return eos


def pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos_id(tokenizer) if pad is None else pad


def check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise UsageError(f"seq_len must be >= 2 (labels are shifted by one), got {seq_len}")
