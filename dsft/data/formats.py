"""Record shapes: which fields make which record, and the ``--field`` column mapping.

An object (a JSON line, a CSV row, a table row) becomes a :class:`~dsft.data.records.Record` by
its fields, checked in this order:

==========================================  ==================================================
``messages`` (OpenAI)                        chat: ``{"role": system|developer|user|assistant|tool,
                                             "content": str | text parts}``; assistant turns may
                                             carry ``tool_calls``
``conversations`` (ShareGPT)                 chat: ``{"from": human|gpt|system|tool|observation|
                                             function_call, "value": str}``; a top-level
                                             ``system`` string opens the chat
``instruction`` + ``output`` (Alpaca)        instruction: prompt = instruction, then a blank line
                                             and ``input`` when that is not empty
``prompt`` + ``response``                    instruction
``text``                                     raw text
==========================================  ==================================================

Other fields (ids, metadata) are ignored. A dataset whose columns have other names maps them with
``--field DSFT_FIELD=COLUMN`` (e.g. ``--field response=answer``): :func:`parse_fields` reads the
option, :func:`to_record` applies it. The same conversation written in any of these shapes becomes
the same record.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dsft.data.records import Message, Record, canonical_tool_calls
from dsft.errors import DataError, UsageError

FIELDS = ("text", "prompt", "response", "instruction", "input", "output", "system", "messages", "conversations")
"""dsft's field names, the left side of ``--field``."""

SHAPES = ("text | prompt+response | instruction+output[+input] (Alpaca) | messages (OpenAI) | "
          "conversations (ShareGPT)")

FieldMap = tuple[tuple[str, str], ...]
"""``((dsft_field, user_column), ...)``, from :func:`parse_fields`."""

# ShareGPT speakers -> roles. function_call turns are the assistant calling a tool; observation
# (LLaMA-Factory) and function_response are the tool's answer.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool",
    "function_call": "assistant",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def parse_fields(items: Sequence[str] | None) -> FieldMap:
    """Read ``--field`` values: ``["response=answer", "prompt=question"]`` -> ``(("response", "answer"), ...)``.

    Raises:
        UsageError: an item is not ``DSFT_FIELD=COLUMN``, names an unknown dsft field, or maps one twice.
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, eq, column = item.partition("=")
        key, column = key.strip(), column.strip()
        if not eq or not key or not column:
            raise UsageError(f"--field {item!r}: expected DSFT_FIELD=COLUMN, e.g. --field response=answer")
        if key not in FIELDS:
            raise UsageError(f"--field {item!r}: {key!r} is not one of dsft's fields ({', '.join(FIELDS)})")
        if key in out:
            raise UsageError(f"--field {key} is given twice ({out[key]!r} and {column!r}); give it once")
        out[key] = column
    return tuple(out.items())


def to_record(obj: Any, name: str, unit: str, n: int, fields: FieldMap = (),
              max_chars: int | None = None) -> Record:
    """Normalise one parsed object found at ``unit n`` (e.g. "line 3") of the file ``name``.

    Args:
        obj: the parsed JSON object, CSV row or table row.
        name: the file as the user named it; unit: "line", "row" or "item"; n: 1-based position.
        fields: the ``--field`` mapping; each user column is read as the dsft field it names.
        max_chars: refuse a record whose text is longer than this (rows of tables and datasets,
            whose size the file readers cannot bound).

    Returns:
        The record, with ``source="{name}:{n}"``.

    Raises:
        DataError: the object has no known shape, a mapped column is missing, a field has the
            wrong type, or the record is too long; one line naming the file and position.
    """
    where = f"{name} {unit} {n}"
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object with {SHAPES}, got {_kind_of(obj)}")
    if fields:
        obj = _apply_fields(obj, fields, where)
    record = _shape(obj, where, f"{name}:{n}")
    if max_chars is not None and _chars(record) > max_chars:
        raise DataError(f"{where}: record longer than {max_chars:,} characters (the limit for one record); split it")
    return record


def _apply_fields(obj: Mapping[str, Any], fields: FieldMap, where: str) -> dict[str, Any]:
    mapped = dict(obj)
    for key, column in fields:
        if column not in obj:
            raise DataError(f"{where}: --field {key}={column}: no field {column!r} here; "
                            f"fields found: {_keys(obj)}")
        mapped.pop(column)
    for key, column in fields:
        mapped[key] = obj[column]
    return mapped


def _shape(obj: Mapping[str, Any], where: str, source: str) -> Record:
    present = {k for k, v in obj.items() if v is not None}
    if "messages" in present:
        return Record("chat", messages=_openai(obj["messages"], where), source=source)
    if "conversations" in present:
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: system must be a string, got {_kind_of(system)} {_short(system)}")
        turns = _sharegpt(obj["conversations"], where)
        if system and turns[0].role != "system":
            turns = (Message("system", system), *turns)
        return Record("chat", messages=turns, source=source)
    if "instruction" in present or "output" in present:
        for key, other in (("instruction", "output"), ("output", "instruction")):
            if key not in present:
                raise DataError(f"{where}: has {other} but no {key}; an Alpaca record needs instruction and output")
        prompt = _string(obj, "instruction", where)
        extra = _string(obj, "input", where) if "input" in present else ""
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return _instruction(prompt, _string(obj, "output", where), "output", where, source)
    if "prompt" in present or "response" in present:
        for key, other in (("prompt", "response"), ("response", "prompt")):
            if key not in present:
                raise DataError(f"{where}: has {other} but no {key}; an instruction record needs both")
        return _instruction(_string(obj, "prompt", where), _string(obj, "response", where), "response", where, source)
    if "text" in present:
        text = _string(obj, "text", where)
        if not text.strip():
            raise DataError(f"{where}: text is empty; fill it in or drop the record")
        return Record("text", text=text, source=source)
    empty = [k for k in ("messages", "conversations", "instruction", "prompt", "response", "output", "text") if k in obj]
    if empty:
        raise DataError(f"{where}: {empty[0]} is empty; fill it in or drop the record")
    raise DataError(f"{where}: no known record shape in fields {_keys(obj)}; accepted: {SHAPES}; "
                    "map other column names with --field, e.g. --field response=answer")


def _instruction(prompt: str, response: str, field: str, where: str, source: str) -> Record:
    if not response.strip():
        raise DataError(f"{where}: {field} is empty; nothing to learn from, fill it in or drop the record")
    return Record("instruction", prompt=prompt, response=response, source=source)


def _turn_list(value: Any, field: str, keys: str, where: str) -> list[Any]:
    if isinstance(value, str):  # CSV and some Parquet exports store the list as a JSON string
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{where}: {field} is a string but not a JSON list; store it as a list") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field} must be a non-empty list of {{{keys}}}, got {_short(value)}")
    return value


def _openai(value: Any, where: str) -> tuple[Message, ...]:
    turns = []
    for i, m in enumerate(_turn_list(value, "messages", "role, content", where)):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, Mapping) or "role" not in m:
            raise DataError(f"{at} must be an object with role and content, got {_short(m)}")
        role = OPENAI_ROLES.get(m["role"]) if isinstance(m["role"], str) else None
        if role is None:
            raise DataError(f"{at}.role {m['role']!r} is not one of {', '.join(OPENAI_ROLES)}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if "content" not in m and calls is None:
            raise DataError(f"{at} must be an object with role and content, got {_short(m)}")
        content = _content(m.get("content"), f"{at}.content")
        turns.append(Message(role, content, _tool_calls(calls, f"{at}.tool_calls") if calls else None))
    return _check_turns(turns, "messages", where)


def _sharegpt(value: Any, where: str) -> tuple[Message, ...]:
    turns = []
    for i, m in enumerate(_turn_list(value, "conversations", "from, value", where)):
        at = f"{where}: conversations[{i}]"
        if not isinstance(m, Mapping) or "from" not in m or "value" not in m:
            raise DataError(f"{at} must be an object with from and value, got {_short(m)}")
        speaker = m["from"]
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{at}.from {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        content = _content(m["value"], f"{at}.value")
        if speaker == "function_call":
            call = _json_value(content, f"{at}.value")
            turns.append(Message("assistant", "", _tool_calls(call if isinstance(call, list) else [call], f"{at}.value")))
        else:
            turns.append(Message(role, content))
    return _check_turns(turns, "conversations", where)


def _check_turns(turns: list[Message], field: str, where: str) -> tuple[Message, ...]:
    if not any(t.role == "assistant" for t in turns):
        raise DataError(f"{where}: {field} has no assistant turn; the loss is on assistant turns, so add one")
    return tuple(turns)


def _content(value: Any, at: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):  # OpenAI content parts: only text parts are meaningful to a text model
        if all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise DataError(f"{at} parts must all be {{\"type\": \"text\", \"text\": str}}, got {_short(value)}")
    raise DataError(f"{at} must be a string, got {_kind_of(value)} {_short(value)}")


def _tool_calls(calls: Any, at: str) -> str:
    """Canonical tool calls: ``[{"type": "function", "function": {"name", "arguments": object}}]``.

    Ids are dropped and JSON-text arguments are parsed (chat templates render them as objects), so
    OpenAI's and ShareGPT's spellings of one call are equal.
    """
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{at} must be a non-empty list of tool calls, got {_short(calls)}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise DataError(f"{at}[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}, got {_short(call)}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (json.JSONDecodeError, RecursionError):
                pass  # not JSON: the model was trained to write it as it is
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return canonical_tool_calls(out)


def _json_value(text: str, at: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise DataError(f"{at}: a function_call turn must hold the call as JSON "
                        "({\"name\": ..., \"arguments\": ...})") from None


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} must be a string, got {_kind_of(value)} {_short(value)}")
    return value


def _chars(record: Record) -> int:
    parts = [record.text, record.prompt, record.response]
    parts += [t for m in record.messages or () for t in (m.content, m.tool_calls)]
    return sum(len(p) for p in parts if p)


def _keys(obj: Mapping[str, Any]) -> str:
    return _short(sorted(map(str, obj)), 120)


def _kind_of(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
