"""``dsft registry``: adapter versions, base versions and which fits which.

Thin: each command opens the registry, calls one API function and prints (a rich table, or JSON
with ``--json``). Errors become one red line and the error's exit code (see ``dsft.cli.common``).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dsft.cli.common import console, guarded, print_json
from dsft.errors import DsftError, IncompatibleError, IntegrityError
from dsft.registry import AdapterRecord, CompatRecord, Registry, open_registry

app = typer.Typer(
    name="registry",
    help="Adapter versions and their compatibility with base-model versions.\n\n"
         "Example: dsft registry check finance@production --base tiny-deepseek-v2",
    no_args_is_help=True,
)

RegistryUrl = Annotated[str | None, typer.Option(
    "--registry", envvar="DSFT_REGISTRY_URL", show_envvar=True, metavar="URL",
    help="SQLAlchemy URL of the registry (default: sqlite at $DSFT_HOME/registry.db).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
RefArg = Annotated[str, typer.Argument(metavar="REF", help="DOMAIN, DOMAIN@VERSION or DOMAIN@TAG.")]
BaseOpt = Annotated[str, typer.Option("--base", metavar="BASE", help="Preset name, model directory or hub id.")]

_MAX_REASONS = 20


@contextmanager
def _registry(url: str | None) -> Iterator[Registry]:
    reg = open_registry(url)
    try:
        yield reg
    finally:
        reg.close()


def _fingerprint(base: str) -> tuple[str, str, dict[str, Any]]:
    """(name, source, fingerprint) of a base, from dsft.base (imported here: it pulls in torch)."""
    try:
        from dsft.base import fingerprint_for
    except ImportError as err:
        raise DsftError(f"cannot resolve base {base!r}: dsft.base is unavailable ({err}); "
                        "reinstall dsft with its dependencies") from None
    return fingerprint_for(base)


def _architecture_mismatch(adapter: AdapterRecord, base: str) -> CompatRecord | None:
    """An ``incompatible`` answer when the adapter's architecture differs from the base's config's, else None."""
    from dsft.registry.compat import architecture_mismatch

    try:
        from dsft.base import base_architecture
    except ImportError:  # dsft.base unavailable: the full check below says why
        return None
    arch = base_architecture(base)
    if arch is None:
        return None
    why = architecture_mismatch(adapter.manifest, arch)
    return None if why is None else CompatRecord(ref=adapter.ref, base_id=None, base_name=base, status="incompatible",
                                                 reasons=[why])


def _short(h: str | None) -> str:
    return (h or "")[:12]


def _metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items())[:4])


_STYLE = {"verified": "bold green", "compatible": "green", "incompatible": "bold red"}


def _print_compat(rec: CompatRecord, base_label: str) -> None:
    console.print(f"{rec.ref} on {base_label}: [{_STYLE[rec.status]}]{rec.status}[/]", highlight=False)
    for r in rec.reasons[:_MAX_REASONS]:
        console.print(f"  - {r}", highlight=False, markup=False, soft_wrap=True)
    if len(rec.reasons) > _MAX_REASONS:
        console.print(f"  ... and {len(rec.reasons) - _MAX_REASONS} more (--json lists all)", highlight=False)
    if rec.metrics:
        console.print(f"  metrics: {_metrics(rec.metrics)}", highlight=False, markup=False)


def _adapter_summary(rec: AdapterRecord) -> dict[str, Any]:
    j = rec.to_json()
    j.pop("manifest")
    j.pop("recipe")
    return j


@app.command("list")
@guarded
def list_cmd(domain: Annotated[str | None, typer.Option("--domain", help="Only this domain.")] = None,
             registry: RegistryUrl = None, json_out: Json = False) -> None:
    """List registered adapter versions, oldest to newest per domain.

    Example: dsft registry list --domain finance
    """
    with _registry(registry) as reg:
        recs = reg.list_adapters(domain)
    if json_out:
        print_json([_adapter_summary(r) for r in recs])
        return
    if not recs:
        console.print("no adapters registered yet: dsft train --domain D, or dsft registry import DIR --domain D")
        return
    table = Table("ref", "kind", "tags", "trained on", "created", "metrics")
    table.columns[0].no_wrap = True
    for r in recs:
        table.add_row(r.ref, r.kind, ", ".join(r.tags), r.base.name if r.base else "(imported)",
                      r.created_at.strftime("%Y-%m-%d"), _metrics(r.metrics))
    console.print(table)


@app.command("show")
@guarded
def show_cmd(ref: RefArg, registry: RegistryUrl = None, json_out: Json = False) -> None:
    """Show one adapter version: files, base, metrics and its compatibility with each base version.

    Example: dsft registry show finance@production
    """
    with _registry(registry) as reg:
        rec = reg.resolve(ref)
        rows = reg.compat_rows(rec.ref)
    if json_out:
        print_json({**rec.to_json(), "compatibility": [c.to_json() for c in rows]})
        return
    console.print(f"[bold]{rec.ref}[/] ({rec.kind})" + (f"  tags: {', '.join(rec.tags)}" if rec.tags else ""),
                  highlight=False)
    console.print(f"path: {rec.path}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"created: {rec.created_at:%Y-%m-%d %H:%M:%S} UTC; parent: {rec.parent or '-'}; "
                  f"manifest sha256: {_short(rec.manifest_sha256)}", highlight=False)
    if rec.base:
        console.print(f"trained on: {rec.base.name} [{rec.base.architecture}] {_short(rec.base.id)} "
                      f"({rec.base.source})", highlight=False, markup=False)
    else:
        console.print("trained on: unknown (imported without --base)")
    if rec.metrics:
        console.print(f"metrics: {_metrics(rec.metrics)}", highlight=False, markup=False)
    if rows:
        table = Table("base", "id", "status", "checked", "why")
        for c in rows:
            table.add_row(c.base_name or "", _short(c.base_id), f"[{_STYLE[c.status]}]{c.status}[/]",
                          c.checked_at.strftime("%Y-%m-%d %H:%M") if c.checked_at else "",
                          (c.reasons[0] if c.reasons else "")
                          + (f" (+{len(c.reasons) - 1})" if len(c.reasons) > 1 else ""))
        console.print(table)


@app.command("check")
@guarded
def check_cmd(ref: RefArg, base: BaseOpt, registry: RegistryUrl = None, json_out: Json = False) -> None:
    """Say whether an adapter fits a base model version, with every reason. Exits 0 only when it does
    (and its files match their manifest: a changed file is refused first, as generate and serve refuse it).

    Example: dsft registry check finance@0.2.0 --base tiny-deepseek-v2
    """
    with _registry(registry) as reg:
        adapter = reg.resolve(ref, verify_files=True)  # IntegrityError (exit 6) names the changed file
    mismatch = _architecture_mismatch(adapter, base)
    if mismatch is not None:  # decided from the base's config alone: no preset built, no weights hashed
        if json_out:
            print_json({**mismatch.to_json(), "base_source": None})
        else:
            _print_compat(mismatch, base)
        raise typer.Exit(IncompatibleError.exit_code)
    name, source, fp = _fingerprint(base)
    with _registry(registry) as reg:
        rec = reg.check(adapter.ref, base_fingerprint=fp, verify_files=False)  # hashed above; the version hashed
    if json_out:
        print_json({**rec.to_json(), "base_name": rec.base_name or name, "base_source": source})
    else:
        _print_compat(rec, f"{name} ({_short(fp['id'])})")
    if not rec.ok:
        raise typer.Exit(IncompatibleError.exit_code)


@app.command("add-base")
@guarded
def add_base_cmd(base: Annotated[str, typer.Argument(metavar="BASE", help="Preset name, model directory or hub id.")],
                 registry: RegistryUrl = None, json_out: Json = False) -> None:
    """Register a base model version and compute its compatibility with every adapter of its architecture.

    Example: dsft registry add-base ./my-deepseek-v2-continued
    """
    name, source, fp = _fingerprint(base)
    with _registry(registry) as reg:
        rec, rows = reg.add_base(name=name, source=source, fingerprint=fp)
    if json_out:
        print_json({"base": rec.to_json(), "compatibility": [c.to_json() for c in rows]})
        return
    console.print(f"base [bold]{rec.name}[/] {_short(rec.id)} [{rec.architecture}] registered", highlight=False)
    if not rows:
        console.print("no adapters of this architecture yet")
    for c in rows:
        _print_compat(c, rec.name)


@app.command("tag")
@guarded
def tag_cmd(ref: RefArg, tag: Annotated[str, typer.Argument(metavar="TAG", help="e.g. production, staging.")],
            registry: RegistryUrl = None, json_out: Json = False) -> None:
    """Point DOMAIN@TAG at a version (moving it atomically if it pointed elsewhere).

    Example: dsft registry tag finance@0.2.0 production
    """
    with _registry(registry) as reg:
        move = reg.tag(ref, tag)
    if json_out:
        print_json(move.to_json())
    else:
        was = f" (was {move.previous})" if move.previous and move.previous != move.version else ""
        console.print(f"{move.domain}@{move.tag} -> {move.version}{was}", highlight=False)


@app.command("untag")
@guarded
def untag_cmd(ref: Annotated[str, typer.Argument(metavar="DOMAIN@TAG", help="The tag to remove.")],
              registry: RegistryUrl = None, json_out: Json = False) -> None:
    """Remove a tag (the version it pointed at stays).

    Example: dsft registry untag finance@staging
    """
    from dsft.registry import parse_ref

    parsed = parse_ref(ref)
    if parsed.tag is None:
        raise DsftError(f"{ref} names no tag; write DOMAIN@TAG, e.g. finance@staging")
    with _registry(registry) as reg:
        reg.untag(parsed.domain, parsed.tag)
    if json_out:
        print_json({"removed_tag": str(parsed)})
    else:
        console.print(f"removed tag {parsed}", highlight=False)


@app.command("rm")
@guarded
def rm_cmd(ref: RefArg,
           force: Annotated[bool, typer.Option(
               "--force", help="Remove even while tags point at it (they go too).")] = False,
           registry: RegistryUrl = None, json_out: Json = False) -> None:
    """Delete an adapter version: its registry rows and its files, together or not at all.

    Example: dsft registry rm finance@0.1.0
    """
    with _registry(registry) as reg:
        rec, deleted = reg.remove(ref, force=force)
    if json_out:
        print_json({"removed": rec.ref, "deleted_path": str(deleted) if deleted else None,
                    "tags_removed": list(rec.tags)})
        return
    where = (f"; deleted {deleted}" if deleted else
             f"; files at {rec.path} left in place (outside $DSFT_HOME/adapters, or missing)")
    console.print(f"removed {rec.ref}{where}", highlight=False, markup=False)


@app.command("import")
@guarded
def import_cmd(
    directory: Annotated[Path, typer.Argument(
        metavar="DIR", help="The adapter directory (as save_pretrained wrote it).")],
    domain: Annotated[str, typer.Option("--domain", help="Domain to register it under.")],
    version: Annotated[str | None, typer.Option("--version", help="Its version (default: the next one).")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Its kind (default: from adapter_config.json).")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", metavar="BASE", help="The base it was trained on, if known.")] = None,
    registry: RegistryUrl = None, json_out: Json = False,
) -> None:
    """Register an adapter trained elsewhere (e.g. a plain PEFT directory); the directory is copied, not moved.

    Example: dsft registry import ./lora-out --domain finance
    """
    fp = _fingerprint(base) if base else None
    with _registry(registry) as reg:
        rec = reg.import_dir(directory, domain=domain, version=version, kind=kind, base=fp)
        rows = reg.compat_rows(rec.ref)
    if json_out:
        print_json({**_adapter_summary(rec), "compatibility": [c.to_json() for c in rows]})
        return
    console.print(f"imported {rec.ref} ({rec.kind}, {len(rec.parsed_manifest().files)} files) -> {rec.path}",
                  highlight=False, markup=False)
    for c in rows:
        _print_compat(c, c.base_name or _short(c.base_id))


@app.command("verify")
@guarded
def verify_cmd(registry: RegistryUrl = None, json_out: Json = False) -> None:
    """Re-hash every registered adapter's files and list directories no entry explains. Never deletes.

    Example: dsft registry verify
    """
    with _registry(registry) as reg:
        report = reg.verify()
    if json_out:
        print_json(report.to_json())
    else:
        for f in report.findings:
            style = "red" if f.problem else "yellow"
            label = f"{f.ref}: " if f.ref else ""
            console.print(f"[{style}]{f.kind}[/] {escape(label + f.path)}: {escape(f.detail)}", highlight=False,
                          soft_wrap=True)
        n = len(report.problems)
        console.print(f"checked {report.checked} adapters: " + ("[green]all files match[/]" if report.ok else
                      f"[red]{n} problem{'s' if n != 1 else ''}[/]"), highlight=False)
        leftovers = [f for f in report.findings if f.kind == "leftover"]
        if leftovers:
            console.print(f"{len(leftovers)} leftover{'s' if len(leftovers) != 1 else ''} of interrupted work: "
                          "`dsft registry gc` removes those whose process is gone", highlight=False)
    if not report.ok:
        raise typer.Exit(IntegrityError.exit_code)


@app.command("gc")
@guarded
def gc_cmd(dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
           resumable: Annotated[bool, typer.Option("--resumable", help="Also remove unfinished runs that still have a "
                                                   "checkpoint (dsft train --resume could continue them).")] = False,
           older_than: Annotated[float, typer.Option("--older-than", metavar="SECONDS", min=0,
                                                     help="Age past which a leftover that records no process is "
                                                     "removed.")] = 3600,
           json_out: Json = False) -> None:
    """Remove what killed dsft processes left: staging directories (*.partial), directories of an interrupted
    `registry rm`, an interrupted registry creation, and runs marked running whose process is gone.

    Only leftovers whose process is gone (or, when none is recorded, older than --older-than) are removed;
    registered adapters are never touched.

    Example: dsft registry gc --dry-run
    """
    from dsft.home import adapters_dir
    from dsft.registry.gc import find_leftovers, remove
    from dsft.registry.placing import pending

    if pending(adapters_dir()):  # an rm killed before its commit: its trash is put back first (on open), not removed
        open_registry().close()
    found = find_leftovers(min_age_s=older_than, resumable=resumable)
    removed = [] if dry_run else remove(found)
    if json_out:
        print_json({"found": [f.to_json() for f in found], "removed": [f.path for f in removed], "dry_run": dry_run})
        return
    gone = {f.path for f in removed}
    for f in found:
        state = "removed" if f.path in gone else "would remove" if dry_run and f.removable else "kept"
        console.print(f"{state} {escape(f.path)}: {escape(f.reason)}", highlight=False, soft_wrap=True)
    console.print(f"{len(removed)} leftover{'s' if len(removed) != 1 else ''} removed" if not dry_run else
                  f"{sum(f.removable for f in found)} would be removed (dry run)", highlight=False)
