"""Bounded reading (issue 15): hostile or broken files give one line naming the file and line, never a hang."""
from __future__ import annotations

import json
import os

import pytest

from dsft.data.files import DataSource, load_records
from dsft.errors import DataError


def one_line_error(source: DataSource, expected: str) -> None:
    with pytest.raises(DataError, match=expected) as err:
        list(source.records())
    assert "\n" not in str(err.value) and err.value.exit_code == 4


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)

    one_line_error(DataSource(str(fifo)), r"pipe\.jsonl: not a regular file \(a FIFO, device or socket\)")


def test_a_link_to_dev_zero_is_refused(tmp_path):
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")

    one_line_error(DataSource(str(link)), r"zero\.txt: not a regular file")


@pytest.mark.parametrize("name, body, line", [
    ("long.jsonl", '{"text": "ok"}\n{"text": "' + "x" * 300 + '"}\n', 2),
    ("long.txt", "ok\n\n" + "word " * 30 + "\n" + "word " * 40 + "\n", 3),
    ("long.csv", 'text\nok\n"' + "x\n" * 150 + '"\n', 3),
])
def test_a_record_over_the_size_bound_names_file_and_line(tmp_path, name, body, line):
    (tmp_path / name).write_text(body)

    one_line_error(DataSource(str(tmp_path / name), max_record_bytes=200), rf"{name} line {line}: .*longer than 200 bytes")


def test_deeply_nested_json_is_a_data_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")

    one_line_error(DataSource(str(path)), r"deep\.jsonl line 2: JSON nested too deeply to read")


def test_an_unterminated_csv_quote_names_the_file_and_line(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('text\n"ok"\n"never closed\nmore\n')

    one_line_error(DataSource(str(path)), r"quote\.csv line 3: bad CSV \(unexpected end of data\); check the quoting")


def test_non_utf8_names_the_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    before = b'{"text": "ok"}\n{"text": "caf'
    path.write_bytes(before + b'\xe9"}\n')

    one_line_error(DataSource(str(path)), rf"latin1\.jsonl line 2: not UTF-8 text at byte {len(before)} ")


def test_records_stream_one_at_a_time(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"broken\n')

    stream = DataSource(str(path)).records()

    assert [next(stream).text, next(stream).text] == ["a", "b"]  # read before the bad line is reached
    with pytest.raises(DataError, match=r"late\.jsonl line 3: bad JSON"):
        next(stream)
    with pytest.raises(DataError):
        load_records([path])


def test_compressed_tsv_and_arrow_files_read_like_jsonl(tmp_path):
    import bz2
    import gzip

    import datasets

    rows = [{"prompt": "Define accrual.", "response": "Recorded when earned."}, {"prompt": "P/E?", "response": "Price/earnings."}]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "a.tsv.bz2").write_bytes(bz2.compress(b"prompt\tresponse\n" + b"".join(
        f"{r['prompt']}\t{r['response']}\n".encode() for r in rows)))
    arrow = datasets.Dataset.from_list(rows)
    arrow.save_to_disk(str(tmp_path / "saved"))
    [shard] = (tmp_path / "saved").glob("*.arrow")

    def pairs(path):
        return [(r.prompt, r.response) for r in DataSource(str(path)).records()]

    expected = pairs(tmp_path / "a.jsonl")
    assert pairs(tmp_path / "a.jsonl.gz") == pairs(tmp_path / "a.tsv.bz2") == pairs(shard) == expected


def test_a_corrupt_gzip_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")

    one_line_error(DataSource(str(tmp_path / "bad.jsonl.gz")), r"bad\.jsonl\.gz line 1: cannot decompress")
