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
    assert "stages[0].kind: must be one of 'cpt' | 'sft' | 'esft' | 'distill', got 'dance'" in text
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


def _load(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(str(path))


def _problems(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    return "\n".join(err.value.problems)


CURRICULUM = """
name: curriculum
description: phases, unfreezing and replay
stages:
  - name: one
    kind: cpt
    phases:
      - {name: general, fraction: 0.5, data: [{source: general.raw}]}
      - {name: domain, fraction: 0.5, data: [{source: domain.raw, weight: 3}, {source: domain.instruct, weight: 1}]}
    replay: 0.25
    train:
      unfreeze: [{at: 0.0, top_layers: 0.25}, {at: 0.5, top_layers: 1.0}]
    lr: 1.0e-3
    steps: 10
"""


def test_phases_unfreezing_and_replay_load_and_resolve():
    from dsft.recipes.sources import phase_steps, phase_weights

    rec = load_recipe("progressive")
    stage = rec.stages[0]
    assert [p.name for p in stage.phases] == ["general", "domain", "longtail"]
    assert list(phase_steps(stage, 200).values()) == [100, 60, 40]
    assert [stage.train.top_layers_at(s, 200) for s in (0, 99, 100, 159, 160)] == [0.34, 0.34, 0.67, 0.67, 1.0]
    # replay rescales the phase's own weights to 80% and gives 20% to general text
    w = phase_weights(stage, stage.phases[1], False)
    assert w == pytest.approx({"domain.raw": 0.4, "domain.instruct": 0.4, "general.raw": 0.2})
    w = phase_weights(stage, stage.phases[0], False)
    assert w == pytest.approx({"general.raw": 1.0})


def test_curriculum_problems_are_named_by_path(tmp_path):
    assert _load(tmp_path, CURRICULUM).stages[0].replay == 0.25
    text = (CURRICULUM.replace("fraction: 0.5, data: [{source: domain.raw, weight: 3}", "fraction: 0.4, data: [{source: domain.raw, weight: -3}")
            .replace("replay: 0.25", "replay: 1.5").replace("{at: 0.5, top_layers: 1.0}", "{at: 0.5, top_layers: 0.1}"))
    problems = _problems(tmp_path, text)
    assert "stages[0].phases[1].data[0].weight: must be > 0, got -3" in problems
    assert "stages[0].phases: fractions must sum to 1, got 0.9" in problems
    assert "stages[0].replay: must be in [0, 1), got 1.5" in problems
    assert "stages[0].train.unfreeze: top_layers must not shrink" in problems
    both = _problems(tmp_path, CURRICULUM.replace("    replay: 0.25", "    replay: 0.25\n    data: [{source: domain.raw}]"))
    assert "stages[0].phases: give either data or phases, not both" in both


def test_esft_and_distill_settings_are_checked(tmp_path):
    esft = GOOD.replace("kind: sft", "kind: esft")
    assert "stages[0].train.lora: an esft stage trains the selected experts only" in _problems(tmp_path, esft)
    ok = _load(tmp_path, esft.replace("steps: 10", "steps: 10\n    train: {lora: [], terms: false}\n    esft: {method: gate}"))
    assert ok.stages[0].esft_settings.threshold == 0.1 and ok.uses_esft  # the paper's default p for ESFT-Gate
    problems = _problems(tmp_path, esft.replace("steps: 10", "steps: 10\n    train: {lora: []}\n    esft: {method: top, p: 0}"))
    assert "stages[0].esft.method: must be one of 'gate' | 'token', got 'top'" in problems
    assert "stages[0].esft.p: must be in (0, 1], got 0" in problems
    problems = _problems(tmp_path, GOOD.replace("steps: 10", "steps: 10\n    esft: {p: 0.2}\n    distill: {alpha: 2}"))
    assert "stages[0].esft: only for kind esft; this stage is sft" in problems
    assert "stages[0].distill: only for kind distill" in problems
    distill = GOOD.replace("kind: sft", "kind: distill").replace("steps: 10", "steps: 10\n    distill: {teacher: null, alpha: 1.5}")
    problems = _problems(tmp_path, distill)
    assert "stages[0].distill.teacher: set a teacher adapter, a teacher_base, or both" in problems
    assert "stages[0].distill.alpha: must be in [0, 1], got 1.5" in problems


def test_a_recipe_cannot_mix_esft_with_lora_stages(tmp_path):
    two = GOOD + """  - name: two
    kind: esft
    data: [{source: domain.instruct}]
    train: {lora: []}
    lr: 1.0e-4
    steps: 10
"""
    assert "stages[0].train.lora: a recipe with an esft stage cannot also train LoRA" in _problems(tmp_path, two)
    fixed = two.replace("    steps: 10\n  - name: two", "    steps: 10\n    train: {lora: [], terms: true}\n  - name: two")
    assert [s.kind for s in _load(tmp_path, fixed).stages] == ["sft", "esft"]


def test_a_child_that_fails_to_build_is_reported_once(tmp_path):
    problems = _problems(tmp_path, GOOD.replace("steps: 10", "steps: 10\n    train: 5\n    phases: [7]"))
    assert "stages[0].train: must be a mapping, got 5" in problems
    assert "stages[0].phases[0]: must be a mapping, got 7" in problems


def test_a_stage_gives_steps_or_epochs(tmp_path, monkeypatch):
    import dsft.recipes.sources as sources
    from dsft.data.files import Record
    from tests.data.test_tokenize import make_tokenizer

    stage = _load(tmp_path, GOOD.replace("steps: 10", "epochs: 2\n    seq_len: 32\n    batch_size: 2")).stages[0]
    assert stage.steps is None and stage.epochs == 2
    monkeypatch.setenv("DSFT_HOME", str(tmp_path / "home"))
    user = [Record.instruction("q", f"answer {i}") for i in range(10)]  # 10 examples, two to a 40-token row
    monkeypatch.setattr(sources, "source_records", lambda name, pack, general, user_records, as_text: user_records)
    with_user = _load(tmp_path, GOOD.replace("steps: 10", "epochs: 2\n    seq_len: 40\n    batch_size: 2")
                      .replace("domain.instruct", "user")).stages[0]
    assert sources.stage_steps(with_user, None, None, make_tokenizer(), user) == 2 * 5 // 2  # 2 epochs x 5 rows / 2 per step

    assert "give either steps or epochs" in _problems(tmp_path, GOOD.replace("steps: 10", "steps: 10\n    epochs: 1"))
    assert "give either steps or epochs" in _problems(tmp_path, GOOD.replace("    steps: 10\n", ""))
    assert "stages[0].epochs: must be a number > 0, got 0" in _problems(tmp_path, GOOD.replace("steps: 10", "epochs: 0"))
