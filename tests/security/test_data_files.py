"""Hostile data files given to ``dsft train --data``: one line naming the file and the line (or row), exit 4,
before a run directory is opened; never a hang, a RecursionError or an abort in the tokenizer."""
from __future__ import annotations

import os

import pytest
from security_helpers import one_error_line

from dsft.data.readers import MAX_RECORD_BYTES


def _fifo(d):
    os.mkfifo(d / "pipe.jsonl")  # reading it would block forever
    return d / "pipe.jsonl", r"pipe.jsonl: not a regular file"


def _dev_zero(d):
    (d / "zero.jsonl").symlink_to("/dev/zero")  # reading it would never end
    return d / "zero.jsonl", r"zero.jsonl: not a regular file"


def _deep(d):
    (d / "deep.jsonl").write_text('{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return d / "deep.jsonl", "deep.jsonl line 2: JSON nested too deeply to read"


def _quote(d):
    (d / "quote.csv").write_text('text\n"fine"\n"never closed\nmore\n')
    return d / "quote.csv", "quote.csv line 3: bad CSV"


def _huge_line(d):
    with open(d / "huge.jsonl", "w") as f:
        f.write('{"text": "ok"}\n{"text": "')
        f.write("x" * (MAX_RECORD_BYTES + 1))
        f.write('"}\n')
    return d / "huge.jsonl", f"huge.jsonl line 2: longer than {MAX_RECORD_BYTES:,} bytes"


def _huge_row(d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "ok"}, {"text": "x" * (MAX_RECORD_BYTES + 1)}]), d / "huge.parquet")
    return d / "huge.parquet", f"huge.parquet row 2: record longer than {MAX_RECORD_BYTES:,} characters"


@pytest.mark.parametrize("make", [_fifo, _dev_zero, _deep, _quote, _huge_line, _huge_row],
                         ids=["fifo", "dev-zero", "100k-deep", "open-quote", "huge-line", "huge-parquet-row"])
def test_a_hostile_data_file_is_one_line_naming_file_and_line(dsft, home, tmp_path, make):
    path, message = make(tmp_path)
    proc = dsft("train", "--data", str(path), "--max-steps", "1")
    line = one_error_line(proc)
    assert message in line and str(tmp_path) in line, line
    assert proc.returncode == 4
    assert not (home / "runs").exists()
