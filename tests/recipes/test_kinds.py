"""The stage-kinds table: every kind validates, has a loss and its settings field; unknown kinds name the known ones."""
from __future__ import annotations

import dataclasses
from typing import get_type_hints

import pytest

from dsft.errors import UsageError
from dsft.recipes.kinds import KINDS, StageKind, lm_loss, stage_kind
from dsft.recipes.schema import Recipe, Stage
from dsft.recipes.typed import ConfigError, load_tree


def _recipe(**stage) -> dict:
    return {"name": "r", "description": "d", "stages": [
        {"name": "one", "data": [{"source": "domain.instruct"}], "lr": 1e-4, "steps": 2, **stage}]}


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_validates_reads_known_data_and_has_a_loss(name):
    kind = KINDS[name]
    train = {"lora": []} if kind.trains == "experts" else {}
    stage = load_tree(Recipe, _recipe(kind=name, train=train), "test").stages[0]
    assert stage.kind_spec is kind and kind.name == name
    assert kind.reads in ("text", "instruction") and kind.trains in ("lora", "experts")
    assert callable(kind.loss)
    if kind.settings is not None:  # its settings live in the stage field named after it
        assert get_type_hints(Stage)[name] == kind.settings | None
        assert dataclasses.is_dataclass(kind.settings) and hasattr(kind.settings(), "check")


def test_the_plain_kinds_minimise_the_lm_loss_without_a_teacher():
    from dsft.recipes.loop import default_loss

    stage = load_tree(Recipe, _recipe(kind="sft"), "test").stages[0]
    loss = stage.kind_spec.loss(stage, None)
    assert loss.fn is default_loss and loss.teacher is None


def test_a_distill_stage_asks_the_factory_for_its_teacher():
    stage = load_tree(Recipe, _recipe(kind="distill"), "test").stages[0]
    asked = []
    loss = stage.kind_spec.loss(stage, lambda s: asked.append(s.name) or "the teacher")
    assert asked == ["one"] and loss.teacher == "the teacher"
    with pytest.raises(UsageError, match="needs a teacher"):
        stage.kind_spec.loss(stage, None)


def test_unknown_kinds_fail_with_the_list_of_known_ones():
    with pytest.raises(UsageError, match="unknown stage kind 'dance'; known kinds: cpt, sft, esft, distill"):
        stage_kind("dance")
    with pytest.raises(ConfigError, match=r"stages\[0\].kind: must be one of 'cpt' \| 'sft' \| 'esft' \| 'distill', got 'dance'"):
        load_tree(Recipe, _recipe(kind="dance"), "test")


def test_a_new_kind_is_one_entry_and_its_source_rule_is_enforced(monkeypatch):
    monkeypatch.setitem(KINDS, "glossary", StageKind(name="glossary", summary="terms from a glossary", reads="text",
                                                     trains="lora", loss=lm_loss, sources=("domain.raw",)))
    ok = load_tree(Recipe, {**_recipe(kind="glossary"), "stages": [{**_recipe()["stages"][0], "kind": "glossary",
                                                                     "data": [{"source": "domain.raw"}]}]}, "test")
    assert ok.stages[0].kind_spec.reads == "text"
    with pytest.raises(ConfigError, match=r"stages\[0\].data\[0\].source: a glossary stage reads domain.raw, not 'domain.instruct'"):
        load_tree(Recipe, _recipe(kind="glossary"), "test")
