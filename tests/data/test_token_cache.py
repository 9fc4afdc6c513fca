"""The tokenised-examples cache: a second run reads the file, the key follows content, big corpora stream."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dsft.data.files import Record
from dsft.data.token_cache import RecordList, cache_key, tokenized
from dsft.data.tokenize import tokenize_records
from dsft.errors import DataError
from tests.data.test_tokenize import make_tokenizer

RECORDS = [Record.raw("The balance sheet lists assets, liabilities and equity. " * 3),
           Record.instruction("Explain the term.", "A short answer."),
           Record.instruction("word " * 40, "answer")]


def test_cached_examples_equal_in_memory_ones_and_a_second_run_reads_the_file(tmp_path, monkeypatch):
    tok = make_tokenizer()
    seqs, stats = tokenize_records(tok, RECORDS, 24)

    first = tokenized(RecordList(RECORDS), tok, 24, tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == [first.path.name]  # no temporary file left
    assert torch.equal(first.lengths, seqs.lengths) and first.stats == stats
    assert all(torch.equal(a, b) for i in range(len(seqs)) for a, b in zip(first.example(i), seqs.example(i)))

    import dsft.data.token_cache as cache
    monkeypatch.setattr(cache, "encode_records", lambda *a, **k: pytest.fail("tokenised again"))
    again = tokenized(RecordList(RECORDS), tok, 24, tmp_path)
    assert again.path == first.path and torch.equal(again.lengths, first.lengths)


def test_the_key_changes_with_the_records_the_tokenizer_and_seq_len():
    tok = make_tokenizer()
    key = cache_key(RecordList(RECORDS), tok, 24)

    assert key == cache_key(RecordList(list(RECORDS)), make_tokenizer(), 24)
    assert key != cache_key(RecordList(RECORDS[:2]), tok, 24)
    assert key != cache_key(RecordList(RECORDS), tok, 32)
    assert key != cache_key(RecordList(RECORDS), make_tokenizer(chat_template="{{ messages }}"), 24)


def test_a_failed_tokenisation_caches_nothing(tmp_path):
    with pytest.raises(DataError, match="no record has a response token"):
        tokenized(RecordList([Record.instruction("word " * 40, "answer")]), make_tokenizer(), 12, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_corpus_larger_than_the_memory_it_may_use_streams_to_disk(tmp_path):
    # A child process tokenises 3,000 records of 256 tokens from a lazy generator. Held in memory, the
    # token lists alone take 16 bytes per token (two list slots) plus the int objects; streamed to the
    # Arrow file, the peak RSS may grow by less than 8 bytes per token.
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from pathlib import Path
        from dsft.data.files import Record
        from dsft.data.token_cache import tokenized
        from tests.data.test_tokenize import make_tokenizer
        tok = make_tokenizer()
        class Big:
            def records(self):
                for i in range(N):
                    yield Record.instruction(f"question {{i}}", "assets " * 300)
            def fingerprint(self):
                return "big-v1"
        N = 300
        tokenized(Big(), tok, 256, Path({str(tmp_path)!r}) / "warm")  # imports and allocator warmed up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        N = 3_000
        seqs = tokenized(Big(), tok, 256, Path({str(tmp_path)!r}))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(json.dumps({{"examples": len(seqs), "tokens": int(seqs.lengths.sum()), "grown": grown}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["examples"] == 3_000 and got["tokens"] == 3_000 * 256  # every example cut to seq_len
    assert got["grown"] < 8 * got["tokens"], got
