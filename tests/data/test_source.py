"""DataSource: files, directories with splits, saved datasets and cached hub datasets, read offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.data.files import DataSource, load_records, parse_fields
from dsft.data.source import as_sources
from dsft.errors import DataError


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def texts(source: DataSource) -> list[str | None]:
    return [r.text or r.response for r in source.records()]


def test_a_directory_of_text_files_is_every_file_in_name_order(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.txt").write_text("second\n")
    (tmp_path / "notes" / "a.txt").write_text("first\n\nalso first\n")
    (tmp_path / "notes" / "README.md").write_text("not data")

    src = DataSource(str(tmp_path / "notes"))

    assert texts(src) == ["first", "also first", "second"]
    assert [r.source for r in src.records()][-1] == f"{tmp_path / 'notes' / 'b.txt'}:1"


def test_files_named_for_splits_are_read_for_that_split_only(tmp_path):
    jsonl(tmp_path / "ds" / "data" / "train-00000-of-00001.jsonl", [{"text": "t"}])
    jsonl(tmp_path / "ds" / "data" / "validation-00000-of-00001.jsonl", [{"text": "v"}])

    assert texts(DataSource(str(tmp_path / "ds"))) == ["t"]
    assert texts(DataSource(str(tmp_path / "ds"), split="validation")) == ["v"]
    with pytest.raises(DataError, match=r"ds: no files for split 'test'; splits found: train, validation"):
        list(DataSource(str(tmp_path / "ds"), split="test").records())


def test_an_unexpanded_glob_is_expanded_in_name_order(tmp_path):
    for name in ("b", "a"):
        (tmp_path / f"{name}.txt").write_text(name)

    assert [s.location for s in as_sources([str(tmp_path / "*.txt")])] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    with pytest.raises(DataError, match=r"--data .*\*\.csv: the pattern matches no file"):
        as_sources([str(tmp_path / "*.csv")])


def test_fingerprint_follows_the_content_and_the_mapping(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"q": "x", "a": "y"}])
    fields = parse_fields(["prompt=q", "response=a"])
    first = DataSource(str(a), fields=fields).fingerprint()

    assert DataSource(str(a), fields=fields).fingerprint() == first
    assert DataSource(str(a), fields=parse_fields(["prompt=a", "response=q"])).fingerprint() != first
    jsonl(a, [{"q": "x", "a": "z"}])
    assert DataSource(str(a), fields=fields).fingerprint() != first


def test_saved_dataset_fingerprint_is_the_datasets_own(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "alpha"}])
    ds.save_to_disk(str(tmp_path / "saved"))

    src = DataSource(str(tmp_path / "saved"))

    assert texts(src) == ["alpha"]
    assert src.fingerprint() == DataSource(str(tmp_path / "saved")).fingerprint()
    assert src.fingerprint() != DataSource(str(tmp_path / "saved"), fields=parse_fields(["text=text"])).fingerprint()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF hub cache holding dataset acme/filings at one snapshot, as `hf download` leaves it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--acme--filings"
    commit = "0123456789abcdef0123456789abcdef01234567"
    jsonl(repo / "snapshots" / commit / "data" / "train.jsonl", [{"instruction": "Q", "output": "A"}])
    jsonl(repo / "snapshots" / commit / "data" / "test.jsonl", [{"text": "held out"}])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_reads_the_local_cache_offline(hub_cache):
    [r] = load_records(["acme/filings"])
    [held] = load_records(["acme/filings"], split="test")

    assert (r.prompt, r.response, r.source) == ("Q", "A", "acme/filings/data/train.jsonl:1")
    assert held.text == "held out"


def test_hub_files_are_fingerprinted_by_their_blob_names_not_read(hub_cache):
    """`hf download` leaves snapshot files as links to blobs named by their content hash."""
    repo = hub_cache / "datasets--acme--filings"
    train = next((repo / "snapshots").iterdir()) / "data" / "train.jsonl"
    content = train.read_bytes()
    (repo / "blobs").mkdir()

    def link_to(blob: str) -> str:
        (repo / "blobs" / blob).write_bytes(content)
        train.unlink()
        train.symlink_to(Path("../../../blobs") / blob)
        return DataSource("acme/filings").fingerprint()

    first = link_to("a" * 64)

    assert [r.response for r in DataSource("acme/filings").records()] == ["A"]
    assert DataSource("acme/filings").fingerprint() == first
    assert link_to("b" * 64) != first  # same bytes: only the blob name can have told them apart


def test_hub_id_not_in_the_cache_says_how_to_get_it(hub_cache):
    with pytest.raises(DataError, match=r"acme/missing: no such file or directory, and no dataset 'acme/missing' in the "
                                        r"local Hugging Face cache .*; on a connected machine run `hf download "
                                        r"acme/missing --repo-type dataset`") as err:
        load_records(["acme/missing"])
    assert "\n" not in str(err.value)


def _peak_rss_kib_reading(path: Path) -> int:
    """Peak RSS of a fresh process that reads every record of ``path`` (and the record count)."""
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's (pytest's) pages
    code = ("import sys; from dsft.data.source import DataSource; "
            "n = sum(1 for _ in DataSource(sys.argv[1]).records()); "
            "print(n, next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout.split()
    return int(out[1])


def test_records_stream_a_file_in_bounded_memory(tmp_path):
    line = json.dumps({"prompt": "What is accrual accounting? " * 40, "response": "Revenue is recorded when earned. " * 40})
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text((line + "\n") * 100)
    with big.open("w") as f:
        for _ in range(20):
            f.write((line + "\n") * 1000)
    grown_kib = _peak_rss_kib_reading(big) - _peak_rss_kib_reading(small)

    assert grown_kib < big.stat().st_size / 1024 / 8, "reading the file held much of it in memory"
