"""Loading data files: every format round-trips into records, every bad input is one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.data.files import READERS, Message, Record, load_records
from dsft.errors import DataError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_gives_the_three_kinds_with_their_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write(path, "\n".join([
        json.dumps({"text": "A ledger records transactions.", "id": 7}),  # extra keys are ignored
        "",
        json.dumps({"prompt": "Define EBITDA.", "response": "Earnings before interest, taxes, ..."}),
        json.dumps({"messages": CHAT}),
    ]) + "\n")

    records = load_records([path])

    assert records == [
        Record.raw("A ledger records transactions.", source=f"{path}:1"),
        Record.instruction("Define EBITDA.", "Earnings before interest, taxes, ...", source=f"{path}:3"),
        Record.chat(CHAT, source=f"{path}:4"),
    ]
    assert records[2].messages[0] == Message("system", "Be brief.")
    assert records[2].chat_dicts() == CHAT


def test_json_may_be_lines_or_one_array(tmp_path):
    lines = jsonl(tmp_path / "lines.json", [{"text": "one"}, {"text": "two"}])
    array = write(tmp_path / "array.json", json.dumps([{"text": "one"}, {"prompt": "q", "response": "a"}], indent=2))

    assert [r.text for r in load_records([lines])] == ["one", "two"]
    records = load_records([array])
    assert [r.kind for r in records] == ["text", "instruction"]
    assert records[1].source == f"{array}:2"  # the item number


def test_csv_with_header_and_a_multiline_cell(tmp_path):
    path = write(tmp_path / "qa.csv", 'prompt,response,text\n'
                                      'What is a bond?,"A loan\nto an issuer.",\n'
                                      ',,Plain text row\n')

    records = load_records([path])

    assert records[0] == Record.instruction("What is a bond?", "A loan\nto an issuer.", source=f"{path}:2")
    assert records[1] == Record.raw("Plain text row", source=f"{path}:4")  # empty cells count as missing


def test_csv_messages_cell_holds_json(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"' + json.dumps(CHAT).replace('"', '""') + '"\n')

    assert load_records([path]) == [Record.chat(CHAT, source=f"{path}:2")]


def test_parquet_rows_with_instruction_and_chat_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]), path)
    chats = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), chats)

    assert load_records([path, chats]) == [
        Record.instruction("p1", "r1", source=f"{path}:1"),
        Record.instruction("p2", "r2", source=f"{path}:2"),
        Record.chat(CHAT, source=f"{chats}:1"),
    ]


def test_txt_one_document_per_paragraph(tmp_path):
    path = write(tmp_path / "notes.txt", "\nFirst paragraph,\nstill first.\n\n\nSecond.\n")

    assert load_records([path]) == [
        Record.raw("First paragraph,\nstill first.", source=f"{path}:2"),
        Record.raw("Second.", source=f"{path}:6"),
    ]


def test_save_to_disk_directory(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "alpha"}, {"text": "beta"}]).save_to_disk(str(saved))

    assert load_records([saved]) == [Record.raw("alpha", source=f"{saved}:1"), Record.raw("beta", source=f"{saved}:2")]


def test_files_load_in_order(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    b = write(tmp_path / "b.txt", "b\n")

    assert [r.text for r in load_records([a, str(b)])] == ["a", "b"]


def test_dataset_dict_directory_reads_the_split(tmp_path):
    import datasets

    saved = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x"}]),
                          "test": datasets.Dataset.from_list([{"text": "y"}])}).save_to_disk(str(saved))

    assert [r.text for r in load_records([saved])] == ["x"]
    assert [r.text for r in load_records([saved], split="test")] == ["y"]
    with pytest.raises(DataError, match=r"dd: has no split 'validation'; splits: test, train; pick one with --split"):
        load_records([saved], split="validation")


def bad_json_line_3(tmp_path):
    return write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": "unterminated}\n')


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "nope.jsonl", r"data file not found: .*nope\.jsonl; check the path"),
    (lambda d: write(d / "empty.jsonl", ""), r"empty\.jsonl: file is empty"),
    (lambda d: write(d / "blank.jsonl", "\n\n"), r"blank\.jsonl: file is empty"),
    (lambda d: write(d / "header.csv", "text\n"), r"header\.csv: file is empty"),
    (bad_json_line_3, r"broken\.jsonl line 3: bad JSON \(Unterminated string"),
    (lambda d: jsonl(d / "keys.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "x", "title": "y"}]),
     r"keys\.jsonl line 3: no known record shape in fields \['body', 'title'\]; accepted: text \| prompt\+response \| "
     r"instruction\+output\[\+input\] \(Alpaca\) \| messages \(OpenAI\) \| conversations \(ShareGPT\); map other "
     r"column names with --field"),
    (lambda d: jsonl(d / "types.jsonl", [{"text": 5}]), r"types\.jsonl line 1: text must be a string, got number 5"),
    (lambda d: jsonl(d / "half.jsonl", [{"prompt": "q"}]), r"line 1: has prompt but no response"),
    (lambda d: jsonl(d / "noresp.jsonl", [{"prompt": "q", "response": " "}]), r"line 1: response is empty"),
    (lambda d: jsonl(d / "null.jsonl", [{"text": None}]), r"line 1: text is empty"),
    (lambda d: jsonl(d / "list.jsonl", [["text"]]), r"line 1: expected an object .* got list"),
    (lambda d: jsonl(d / "role.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}]),
     r"role\.jsonl line 1: messages\[0\]\.role 'bot' is not one of system, developer, user, assistant, tool"),
    (lambda d: jsonl(d / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
     r"line 1: messages has no assistant turn"),
    (lambda d: write(d / "wide.csv", "text\na,b\n"), r"wide\.csv line 2: 2 cells but the header has 1"),
    (lambda d: write(d / "notes.docx", "x"), r"notes\.docx: unsupported file type '\.docx'; use one of \.jsonl, \.json"),
    (lambda d: d, r"a directory with no data files \(\.jsonl, .*\) and not a datasets\.save_to_disk directory"),
    (lambda d: write_bytes(d / "latin1.txt", b"ok\ncaf\xe9\n"), r"latin1\.txt line 2: not UTF-8"),
    (lambda d: write(d / "bad.parquet", "not parquet"), r"bad\.parquet: not a readable Parquet file"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, make, expected):
    path = make(tmp_path)

    with pytest.raises(DataError, match=expected) as err:
        load_records([path])

    assert "\n" not in str(err.value)
    assert err.value.exit_code == 4


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    with pytest.raises(DataError) as err:
        load_records([write(tmp_path / "x.xml", "<a/>")])

    assert all(ext in str(err.value) for ext in READERS)
    assert "save_to_disk" in str(err.value)
