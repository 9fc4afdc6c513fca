"""prepare(): a run's checks, with the base resolved once, and a registry closed only by whoever opened it."""
from __future__ import annotations

import pytest

from dsft.errors import NotFoundError
from dsft.recipes.prepare import prepare
from dsft.recipes.runner import check_run
from dsft.registry import open_registry
from dsft.registry.registry import Registry


def _args(**kw):
    args = dict(domain="finance", base="tiny-deepseek-v2", recipe="lora", data=(), overrides=(), seed=None,
                max_steps=2, output=None, registry=None, checkpoint_every=0, runs_root=None)
    return {**args, **kw}


@pytest.fixture
def closes(monkeypatch) -> list[Registry]:
    """The registries closed during the test."""
    closed: list[Registry] = []
    real = Registry.close
    monkeypatch.setattr(Registry, "close", lambda self: (closed.append(self), real(self))[1])
    return closed


def test_the_base_is_resolved_once_into_the_plan(home, tiny_base_dir):
    import torch

    from dsft.base.loading import fingerprint_for
    from dsft.eval.plan import count_model

    plan = prepare(**_args())
    try:
        assert plan.base.source == "preset:tiny-deepseek-v2" and plan.base.path.resolve() == tiny_base_dir.resolve()
        assert plan.base_fingerprint == fingerprint_for("tiny-deepseek-v2")[2] == fingerprint_for(plan.base)[2]
        assert plan.key.base_fingerprint == plan.base_fingerprint["id"] and plan.seed == plan.recipe.seed
        # --keep-layers auto counts the resolved base as it would count the name (a preset's config, in memory)
        assert count_model(plan.base, dtype=torch.float32) == count_model("tiny-deepseek-v2", dtype=torch.float32)
    finally:
        plan.close()


def test_a_registry_opened_by_the_run_is_closed_and_one_passed_in_stays_open(home, tiny_base_dir, closes):
    check_run(**_args())
    assert len(closes) == 1  # the default registry, opened from $DSFT_HOME
    with open_registry() as reg:
        check_run(**_args(registry=reg))
        assert len(closes) == 1 and reg.list_adapters() == []  # still usable
        with pytest.raises(NotFoundError, match="distill teacher"):  # refused: still open for its owner
            prepare(**_args(registry=reg, recipe="distill"))
        assert len(closes) == 1
    with pytest.raises(NotFoundError, match="distill teacher"):  # refused after opening one: closed all the same
        prepare(**_args(recipe="distill"))
    assert len(closes) == 3
