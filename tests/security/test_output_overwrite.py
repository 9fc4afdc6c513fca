"""Issue 15.3: ``dsft train --output`` never writes into the registry's adapter store or over a registered adapter."""
from __future__ import annotations

import pytest
from security_helpers import one_error_line, write_peft_dir

from dsft.atomic import sha256_file
from dsft.errors import UsageError
from dsft.recipes.run_checks import check_output


@pytest.fixture
def registered(dsft, home, tmp_path):
    write_peft_dir(tmp_path / "peft")
    proc = dsft("registry", "import", str(tmp_path / "peft"), "--domain", "finance")
    assert proc.returncode == 0, proc.stderr
    return home / "adapters" / "finance" / "0.1.0"


@pytest.mark.parametrize("where", ["{adapter}", "{adapter}/sub", "{home}/adapters/finance/0.2.0"])
def test_train_refuses_an_output_in_the_adapter_store(dsft, home, registered, where):
    before = {p.name: sha256_file(p) for p in registered.iterdir()}
    out = where.format(adapter=registered, home=home)
    line = one_error_line(dsft("train", "--output", out, "--max-steps", "1"))
    assert "--output" in line and ("adapter store" in line or "registered adapter" in line)
    assert {p.name: sha256_file(p) for p in registered.iterdir()} == before
    assert not (home / "adapters" / "finance" / "0.2.0").exists()


def test_an_output_elsewhere_is_fine_and_a_registered_directory_outside_the_store_is_not(tmp_path):
    store = tmp_path / "home" / "adapters"
    check_output(tmp_path / "exports" / "finance", store, [str(store / "finance" / "0.1.0")])
    check_output(None, store, [])
    with pytest.raises(UsageError, match="overwrite the registered adapter"):
        check_output(tmp_path / "elsewhere", store, [str(tmp_path / "elsewhere")])
    (tmp_path / "link").symlink_to(store, target_is_directory=False)
    with pytest.raises(UsageError, match="adapter store"):  # a link into the store is the store
        check_output(tmp_path / "link" / "finance", store, [])
