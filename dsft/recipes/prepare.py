"""Step 1 of :func:`dsft.train`: every check before any weights load, resolved into one :class:`RunPlan`.

A run that is refused here (bad recipe, data, output, teacher or base) has loaded nothing and written nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.adapter_format import MANIFEST_FILE
from dsft.base.loading import BaseRef
from dsft.errors import UsageError
from dsft.recipes.checkpoint import RunKey, runs_dir
from dsft.recipes.run_checks import check_max_steps, check_output, check_seed, check_seq_len
from dsft.recipes.schema import Recipe, load_recipe


@dataclass(frozen=True)
class RunPlan:
    """What :func:`prepare` checked and resolved: everything a run needs before its weights load."""

    pack: Any
    """The domain pack (:class:`dsft.domains.DomainPack`)."""
    recipe: Recipe
    base: BaseRef
    """The base, resolved once; every later step uses this, never the name again."""
    base_fingerprint: dict[str, Any]
    seed: int
    max_steps: int | None
    user_records: Any
    """The user's data (:class:`dsft.data.user_data.UserData`): the domain's files and ``--data``, split into
    training records per source and the held-out records that never train."""
    output: Path | None
    registry: Any
    owns_registry: bool
    """``registry`` was opened by :func:`prepare` (from a URL or the default), so the run closes it."""
    key: RunKey
    runs_root: Path
    checkpoint_every: int

    def close(self) -> None:
        """Close the registry if this plan opened it (one passed in stays open for its owner)."""
        if self.owns_registry:
            self.registry.close()


def prepare(domain: str, base: str, recipe: str | None, data: Sequence[str | Path], overrides: Sequence[str],
            seed: int | None, max_steps: int | None, output: str | Path | None, registry: Any, checkpoint_every: int,
            runs_root: str | Path | None, trust_remote_code: bool = False, eval_data: Sequence[str | Path] = (),
            generated: bool = False) -> RunPlan:
    """Every check :func:`train` makes before loading any weights (so a refused run, or --resume, writes
    nothing); the arguments are :func:`train`'s.

    Raises:
        NotFoundError, UsageError, DataError: as :func:`train`.
    """
    from dsft.base.loading import fingerprint_for, read_config, resolve_base
    from dsft.data.files import as_sources
    from dsft.data.user_data import load_user_data
    from dsft.domains import resolve_domain
    from dsft.recipes.sources import user_recipe
    from dsft.registry import open_registry

    check_max_steps(max_steps)
    check_seed(seed)
    pack = resolve_domain(domain)
    rec: Recipe = load_recipe(recipe or pack.default_recipe, overrides)
    seed = rec.seed if seed is None else seed
    check_seed(seed, "seed")
    if checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
    data_files = as_sources(data)  # DataSource objects: paths, directories, globs, cached hub ids
    # the domain's own files (domain.user) and --data (user), less a held-out split (or --eval-data): data/user_data.py
    eval_files = as_sources(eval_data)
    user_records = load_user_data(pack.data_sources(), data_files, eval_files, generated or user_recipe(recipe))
    out = Path(output) if output else None
    _check_output(out)
    owns = not hasattr(registry, "transaction")
    reg = open_registry(registry) if owns else registry
    try:
        check_output(out, reg.adapters_root, [r.path for r in reg.list_adapters()])
        _check_teachers(rec, pack.name, reg)
        ref = resolve_base(base)
        _, _, fingerprint = fingerprint_for(ref, trust_remote_code)
        check_seq_len([(f"stages[{i}].seq_len", s.seq_len) for i, s in enumerate(rec.stages) if s.seq_len is not None],
                      read_config(ref, trust_remote_code), base)
    except BaseException:
        if owns:
            reg.close()
        raise
    key = RunKey.build(pack.name, rec.to_data(), base, fingerprint["id"], seed, max_steps,
                       data_files + pack.data_sources() + eval_files)
    return RunPlan(pack, rec, ref, fingerprint, seed, max_steps, user_records, out, reg, owns, key,
                   Path(runs_root) if runs_root else runs_dir(), checkpoint_every)


def _check_output(output: Path | None) -> None:
    if output is not None and output.exists() and not (output / MANIFEST_FILE).exists():
        if output.is_dir() and not any(output.iterdir()):
            return
        raise UsageError(f"--output {output} exists and is not a dsft adapter; choose a new directory or remove it")


def _check_teachers(rec: Recipe, domain: str, reg) -> None:
    """Fail before any work when a distill stage names a teacher adapter that is not registered."""
    for s in rec.stages:
        if s.kind_spec.teacher and s.distill_settings.teacher is not None:
            from dsft.errors import NotFoundError

            ref = s.distill_settings.teacher.replace("{domain}", domain)
            try:
                reg.resolve(ref)
            except NotFoundError as exc:
                raise NotFoundError(f"stage {s.name}: distill teacher {ref!r} not found ({exc}); train it first "
                                    f"(dsft train --domain {domain} --recipe lora) or set distill.teacher") from None
