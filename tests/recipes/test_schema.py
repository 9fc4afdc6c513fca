"""Recipes are validated before any work: every problem at once, each with its dotted path."""
from __future__ import annotations

import pytest

from dsft.errors import NotFoundError, UsageError
from dsft.recipes import builtin_recipes, load_recipe
from dsft.recipes.typed import ConfigError

GOOD = """
name: mine
description: test recipe
stages:
  - name: one
    kind: sft
    data: [{source: domain.instruct, weight: 1.0}]
    lr: 1.0e-4
    steps: 10
"""


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_recipe_validates_and_starts_with_its_command(name):
    from dsft.recipes.schema import recipe_path

    recipe = load_recipe(name)
    assert recipe.name == name and recipe.stages
    assert recipe_path(name).read_text().startswith(f"# Run: dsft train --domain finance --recipe {name}")


def test_all_problems_are_reported_at_once_with_dotted_paths(tmp_path):
    bad = GOOD.replace("lr: 1.0e-4", "lr: -1.0e-5").replace("steps: 10", "steps: 10\n    bogus: 1").replace("weight: 1.0", "weight: 0")
    path = tmp_path / "r.yaml"
    path.write_text(bad)
    with pytest.raises(ConfigError) as err:
        load_recipe(str(path))
    problems = "\n".join(err.value.problems)
    assert "stages[0].lr: must be > 0, got -1e-05" in problems
    assert "stages[0].bogus: unknown key" in problems
    assert "stages[0].data[0].weight: must be > 0, got 0" in problems
    assert len(err.value.problems) == 3


def test_unknown_stage_kind_and_a_stage_that_trains_nothing(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace("kind: sft", "kind: dance").replace("steps: 10", "steps: 10\n    train: {lora: [], terms: false}"))
    with pytest.raises(ConfigError) as err:
        load_recipe(str(path))
    text = str(err.value)
    assert "stages[0].kind: must be one of 'cpt' | 'sft', got 'dance'" in text
    assert "trains nothing" in text


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstages: [\n  - oops: : :\n")
    with pytest.raises(UsageError, match=r"line \d+, column \d+"):
        load_recipe(str(path))


def test_dotted_overrides_apply_before_validation():
    recipe = load_recipe("lora", ["stages.0.lr=2e-5", "adapter.r=4"])
    assert recipe.stages[0].lr == 2e-5 and recipe.adapter.r == 4
    with pytest.raises(UsageError, match="stages.5"):
        load_recipe("lora", ["stages.5.lr=1"])
    with pytest.raises(ConfigError, match="stages\\[0\\].lr: must be > 0"):
        load_recipe("lora", ["stages.0.lr=0"])


def test_unknown_recipe_lists_the_builtin_ones():
    with pytest.raises(NotFoundError, match="lora"):
        load_recipe("nonexistent")
