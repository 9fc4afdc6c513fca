"""Issue 15.5: YAML alias bombs in a recipe, a domain pack or an override are refused quickly, and no error
message prints the whole parsed value."""
from __future__ import annotations

import time

import pytest
from security_helpers import one_error_line

from dsft.errors import UsageError
from dsft.safe_yaml import MAX_NODES, compose, expanded_size, loads


def bomb(levels: int = 10, fanout: int = 9, key: str = "name") -> str:
    """The billion-laughs document: each level a list of ``fanout`` aliases of the previous one."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(fanout))}]")
    lines.append(f"{key}: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_sizes_count_every_use_of_an_alias():
    # the mapping, key a + [1, 2], key b + a list holding [1, 2] twice
    assert expanded_size(compose("a: &x [1, 2]\nb: [*x, *x]\n", "t"), "t") == 1 + (1 + 3) + (1 + (1 + 2 * 3))
    assert loads("a: &x [1, 2]\nb: *x\n", "t") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(UsageError, match="alias bomb"):
        compose(bomb(), "t")
    with pytest.raises(UsageError, match="deeper than"):
        compose("[" * 200 + "]" * 200, "t")


@pytest.mark.parametrize("where", ["recipe", "domain", "override"])
def test_a_bomb_is_refused_in_every_config_quickly_and_briefly(dsft, tmp_path, where):
    path = tmp_path / f"{where}.yaml"
    path.write_text(bomb())
    flow = "{" + bomb().strip().replace("\n", ", ") + "}"  # the same bomb as one command-line value
    args = {"recipe": ["--recipe", str(path)], "domain": ["--domain", str(path)], "override": [f"stages.0.name={flow}"]}[where]
    t0 = time.perf_counter()
    proc = dsft("train", *args, "--max-steps", "1")
    assert time.perf_counter() - t0 < 10
    line = one_error_line(proc)
    assert f"{MAX_NODES:,}" in line and len(line) < 600
