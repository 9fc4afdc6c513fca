"""Chat messages -> prompt ids, in the format the adapters were trained on.

With a chat template (``tokenizer.chat_template``) the template renders the conversation with its
generation prompt. Without one (the presets, most base models) it is dsft's plain instruction template,
encoded exactly as training encodes it (:func:`dsft.data.tokenize.encode_chat`) up to the start of the
assistant's reply: ``### Instruction:\\n{prompt}\\n\\n### Response:\\n``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from dsft.errors import UsageError

ROLES = ("system", "user", "assistant")


def _content(message: Mapping) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are meaningful to a text model
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UsageError("message content parts must be {\"type\": \"text\", \"text\": ...}")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise UsageError("message content must be a string or a list of text parts")


def encode_messages(tokenizer, messages: Sequence[Mapping]) -> list[int]:
    """Prompt ids for a conversation whose next turn is the assistant's.

    Raises:
        UsageError: no messages, an unknown role, or non-text content.
    """
    from dsft.data.prompt import encode_prompt

    if not messages:
        raise UsageError("messages must hold at least one message")
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise UsageError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        turns.append({"role": role, "content": _content(m)})
    return encode_prompt(tokenizer, turns)
