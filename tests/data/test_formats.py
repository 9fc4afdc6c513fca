"""Record shapes: one conversation written as Alpaca, ShareGPT or OpenAI messages is one record."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dsft.data.files import Message, Record, load_records, parse_fields
from dsft.errors import DataError, UsageError


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def strip_source(records: list[Record]) -> list[Record]:
    return [Record(r.kind, r.text, r.prompt, r.response, r.messages) for r in records]


def test_alpaca_is_an_instruction_with_its_input_after_a_blank_line(tmp_path):
    alpaca = jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Define EBITDA.", "input": "", "output": "Earnings before interest..."},
        {"instruction": "Translate to French.", "input": "interest rate", "output": "taux d'intérêt"},
    ])
    plain = jsonl(tmp_path / "plain.jsonl", [
        {"prompt": "Define EBITDA.", "response": "Earnings before interest..."},
        {"prompt": "Translate to French.\n\ninterest rate", "response": "taux d'intérêt"},
    ])

    assert strip_source(load_records([alpaca])) == strip_source(load_records([plain]))
    assert load_records([alpaca])[1].source == f"{alpaca}:2"


def test_sharegpt_and_openai_messages_give_the_same_chat_with_tool_turns(tmp_path):
    call = {"name": "get_rate", "arguments": {"currency": "EUR"}}
    sharegpt = jsonl(tmp_path / "sharegpt.jsonl", [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": "EUR rate?"},
        {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "1.08"},
        {"from": "gpt", "value": "1.08 USD."},
    ]}])
    openai = jsonl(tmp_path / "openai.jsonl", [{"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "EUR "}, {"type": "text", "text": "rate?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_rate", "arguments": '{"currency": "EUR"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1.08"},
        {"role": "assistant", "content": "1.08 USD."},
    ]}])

    [a], [b] = load_records([sharegpt]), load_records([openai])

    assert strip_source([a]) == strip_source([b])
    assert [m.role for m in a.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert a.chat_dicts()[2]["tool_calls"] == [{"type": "function", "function": call}]
    assert a.messages[4] == Message("assistant", "1.08 USD.")


def test_each_format_through_csv_round_trips_to_the_jsonl_records(tmp_path):
    rows = [{"instruction": "Q1", "input": "ctx", "output": "A1"}, {"text": "raw doc"}]
    path = tmp_path / "mixed.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output", "text"])
        w.writeheader()
        w.writerows(rows)

    assert strip_source(load_records([path])) == strip_source(load_records([jsonl(tmp_path / "m.jsonl", rows)]))


def test_field_mapping_reads_the_users_columns(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "Q", "answer": "A", "prompt": "ignored?"}])

    [r] = load_records([path], fields=parse_fields(["prompt=question", "response=answer"]))

    assert (r.kind, r.prompt, r.response) == ("instruction", "Q", "A")


def test_field_mapping_naming_a_missing_column_is_one_line(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "Q", "answer": "A"}])

    with pytest.raises(DataError, match=r"qa\.jsonl line 1: --field response=reply: no field 'reply' here; "
                                        r"fields found: \['answer', 'question'\]") as err:
        load_records([path], fields=parse_fields(["response=reply"]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("items, expected", [
    (["response"], r"--field 'response': expected DSFT_FIELD=COLUMN, e\.g\. --field response=answer"),
    (["answer=response"], r"--field 'answer=response': 'answer' is not one of dsft's fields \(text, prompt"),
    (["text=a", "text=b"], r"--field text is given twice \('a' and 'b'\)"),
])
def test_bad_field_options_are_usage_errors(items, expected):
    with pytest.raises(UsageError, match=expected):
        parse_fields(items)


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Q"}, r"line 1: has instruction but no output; an Alpaca record needs instruction and output"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]\.from 'bot' is not one of human, user, gpt"),
    ({"conversations": [{"from": "human", "value": "x"}]}, r"line 1: conversations has no assistant turn"),
    ({"conversations": [{"from": "function_call", "value": "get_rate("}]},
     r"conversations\[0\]\.value: a function_call turn must hold the call as JSON"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     r"messages\[0\]\.tool_calls\[0\] must be \{\"function\": \{\"name\", \"arguments\"\}\}"),
])
def test_bad_chats_are_one_line(tmp_path, row, expected):
    with pytest.raises(DataError, match=expected) as err:
        load_records([jsonl(tmp_path / "bad.jsonl", [row])])
    assert "\n" not in str(err.value)
