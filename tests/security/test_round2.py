"""The second hostile-user pass (stop 15, after issue 15's fixes): what it still broke or found weak, each refused in
one line before any work, nothing written."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from security_helpers import one_error_line, write_peft_dir


@pytest.mark.parametrize("make", ["fifo", "dev-zero-link", "long-term"])
def test_a_terms_file_is_a_bounded_regular_file_of_short_terms(dsft, home, tmp_path, make):
    terms = tmp_path / "terms.txt"
    if make == "fifo":
        os.mkfifo(terms)  # read as a file it would hang
    elif make == "dev-zero-link":
        terms.symlink_to("/dev/zero")  # read as a file it would fill memory
    else:
        terms.write_text("rate swap\n" + "t" * 5_000 + "\n")
    line = one_error_line(dsft("domains", "new", "foo", "--terms", str(terms)))
    assert {"fifo": "not a regular file", "dev-zero-link": "not a regular file", "long-term": "a term of 5,000 characters"}[make] in line
    assert not (home / "domains" / "foo.yaml").exists()


def test_an_import_that_would_not_fit_on_the_disk_is_refused_before_copying(dsft, home, tmp_path):
    src = tmp_path / "peft"
    write_peft_dir(src)
    free = shutil.disk_usage(tmp_path).free
    with open(src / "big.dat", "wb") as f:
        f.truncate(free + 2**31)  # sparse: takes no space here, but a copy writes it out whole
    line = one_error_line(dsft("registry", "import", str(src), "--domain", "sparse"))
    assert "GiB once copied" in line and "free" in line
    assert not (home / "adapters" / "sparse").exists() or not any(p.is_file() for p in (home / "adapters" / "sparse").rglob("*"))


@pytest.mark.parametrize("host", ["0", "0.0.0.00", "::0"])
def test_every_spelling_of_every_interface_needs_an_api_key(dsft, monkeypatch, host):
    import dsft.runtime.base as runtime_base

    def load_base(*_a, **_k):
        raise AssertionError("a base was loaded: the server would have started")

    monkeypatch.setattr(runtime_base, "load_base", load_base)
    monkeypatch.delenv("DSFT_API_KEY", raising=False)
    line = one_error_line(dsft("serve", "--host", host))
    assert f"--host {host} listens on every interface" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["train", "--domain", "finance"], ["generate", "hi"]])
def test_cuda_on_a_machine_without_it_says_so(dsft, command):
    line = one_error_line(dsft(*command, "--device", "cuda"))
    assert "CUDA is not available on this machine" in line and "--device cpu" in line


def test_num_gpus_below_one_is_refused(dsft):
    line = one_error_line(dsft("train", "--domain", "finance", "--num-gpus", "-3"))
    assert "--num-gpus must be >= 1, got -3" in line
