"""``dsft domains``: list, show and create domain packs."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from dsft.cli.common import DATA_HELP, FIELD_HELP, console, data_sources, guarded, print_json

app = typer.Typer(name="domains", help="Domain packs: list, show, create.\n\nExample: dsft domains show finance", no_args_is_help=True)


@app.command("list")
@guarded
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the built-in and user-defined domains.

    Example: dsft domains list
    """
    from dsft.domains import list_domains

    packs = list_domains()
    if json_out:
        print_json([{"name": p.name, "description": p.description, "terms": len(p.terms), "builtin": p.builtin} for p in packs])
        return
    table = Table("domain", "terms", "source", "description")
    for p in packs:
        table.add_row(p.name, str(len(p.terms)), "built-in" if p.builtin else str(p.source), p.description)
    console.print(table)


@app.command("show")
@guarded
def show_cmd(name: str = typer.Argument(..., help="Domain name or YAML file."),
             json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show a domain: description, default recipe, LoRA targets, what text it trains on (its data files with
    record counts, or generated template text) and its terms.

    Example: dsft domains show legal
    """
    from dsft.domains import data_records, resolve_domain

    p = resolve_domain(name)
    files = [{"path": str(f), "records": data_records(f, p.data_fields)} for f in p.data_files]
    text = ("its data files (source domain.user); generated template text only with --generated or a recipe naming it"
            if files else "generated from the pack's templates (domain.raw, domain.instruct, domain.longtail)")
    info = {"name": p.name, "description": p.description, "default_recipe": p.default_recipe,
            "lora_targets": list(p.lora_targets), "terms": [t for t, _ in p.terms], "source": str(p.source),
            "data_files": files, "training_text": text, "terms_without_definition": sum(1 for _, d in p.terms if not d)}
    if json_out:
        print_json(info)
        return
    console.print(f"[bold]{p.name}[/]: {p.description}")
    console.print(f"default recipe: {p.default_recipe}; LoRA targets: {', '.join(p.lora_targets)}; {len(p.terms)} terms")
    console.print(f"training text: {text}")
    for f in files:
        console.print(f"  {f['path']}: {f['records']:,} records")
    console.print(", ".join(info["terms"][:40]) + (" ..." if len(p.terms) > 40 else ""))


@app.command("new")
@guarded
def new_cmd(
    name: str = typer.Argument(..., help="Name of the new domain: lowercase letters, digits, - and _."),
    more_data: list[str] = typer.Argument(None, help="More data paths (what a shell glob after --data expands to).",
                                          show_default=False),
    terms: Path = typer.Option(..., "--terms", help="Text file: one term per line, optionally 'term: definition'."),
    data: list[str] = typer.Option(None, "--data", help=DATA_HELP + " Trains whenever the domain trains, instead of generated text."),
    field: list[str] = typer.Option(None, "--field", help=FIELD_HELP),
    description: str = typer.Option("", "--description", help="One line about the domain."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Create a user-defined domain in $DSFT_HOME/domains/.

    Example: dsft domains new insurance --terms terms.txt --data claims.jsonl --data notes/

    Example (your column names): dsft domains new support --terms t.txt --data tickets.csv --field response=reply
    """
    from dsft.domains import new_domain
    from dsft.errors import UsageError

    if (more_data or field) and not data:
        what = f"unexpected argument {more_data[0]!r}" if more_data else "--field"
        raise UsageError(f"{what}: data comes with --data, e.g. --data {more_data[0] if more_data else 'qa.jsonl'}")
    sources = data_sources([*data, *(more_data or ())] if data else [], field)
    path = new_domain(name, terms, [s.location for s in sources] or None, description=description,
                      fields=sources[0].fields if sources else ())
    if json_out:
        print_json({"domain": name, "path": str(path)})
    else:
        console.print(f"created domain [bold]{name}[/] at {escape(str(path))}; train it with: dsft train --domain {name}")
