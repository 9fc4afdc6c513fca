"""``dsft recipes``: list, show and validate recipes."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dsft.base.presets import DEFAULT_BASE
from dsft.cli.common import console, err_console, guarded, print_json

app = typer.Typer(name="recipes", help="Training recipes: list, show, validate, compare.\n\nExample: dsft recipes show lora", no_args_is_help=True)


@app.command("list")
@guarded
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the built-in recipes.

    Example: dsft recipes list
    """
    from dsft.recipes.schema import builtin_recipes, load_recipe

    rows = [load_recipe(n) for n in builtin_recipes()]
    if json_out:
        print_json([{"name": r.name, "description": r.description, "stages": [s.name for s in r.stages]} for r in rows])
        return
    table = Table("recipe", "stages", "description")
    for r in rows:
        table.add_row(r.name, " -> ".join(s.name for s in r.stages), r.description)
    console.print(table)


@app.command("show")
@guarded
def show_cmd(name: str = typer.Argument(..., help="Built-in recipe name or YAML file.")) -> None:
    """Print a recipe's YAML, with its comments.

    Example: dsft recipes show lora
    """
    from dsft.recipes.schema import recipe_path

    typer.echo(recipe_path(name).read_text(), nl=False)


@app.command("validate")
@guarded
def validate_cmd(file: Path = typer.Argument(..., help="Recipe YAML file."),
                 overrides: list[str] = typer.Argument(None, help="Dotted overrides to apply first."),
                 json_out: bool = typer.Option(False, "--json", help="Print the resolved recipe as JSON.")) -> None:
    """Check a recipe file; every problem is listed with its dotted path.

    Example: dsft recipes validate my-recipe.yaml stages.0.lr=1e-4
    """
    from dsft.recipes.schema import load_recipe

    recipe = load_recipe(str(file), overrides or ())
    if json_out:
        print_json(recipe.to_data())
    else:
        console.print(f"[green]ok[/]: {recipe.name} with {len(recipe.stages)} stage(s)")


@app.command("compare")
@guarded
def compare_cmd(
    domain: str = typer.Option("finance", "--domain", "-d", help="Domain name or domain YAML file."),
    base: str = typer.Option(DEFAULT_BASE, "--base", "-b", help="Preset, local model directory or hub id."),
    recipes: list[str] = typer.Option(None, "--recipe", "-r", help="Recipes to compare (repeatable; default: every built-in one)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Cap every stage at this many steps."),
    seed: int = typer.Option(None, "--seed", help="Random seed for every run (default: each recipe's)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Train the domain with each recipe (in a scratch registry) and compare held-out domain loss,
    general loss (forgetting), trainable parameters and wall time.

    Example: dsft recipes compare --domain finance --max-steps 30
    """
    from dsft.recipes.compare import compare_recipes, markdown_table

    def progress(kind, payload):
        if kind == "recipe" and not json_out:
            err_console.print(f"training with recipe [bold]{payload['recipe']}[/] ...")

    rows = compare_recipes(domain=domain, base=base, recipes=recipes or None, max_steps=max_steps, seed=seed, on_event=progress)
    if json_out:
        print_json(rows)
        return
    if markdown:
        typer.echo(markdown_table(rows))
        return
    table = Table("recipe", "domain loss", "general loss", "trainable params", "routed experts trained", "steps", "wall time")
    for r in rows:
        share = f"{100 * r['routed_expert_share']:.1f}%" if r["routed_expert_share"] is not None else "all (LoRA)"
        table.add_row(r["recipe"] + (f" (teacher {r['teacher']})" if r.get("teacher") else ""),
                      f"{r['domain_loss_before']:.3f} -> {r['domain_loss']:.3f}",
                      f"{r['general_loss_before']:.3f} -> {r['general_loss']:.3f}",
                      f"{r['trainable_params']:,}", share, str(r["steps"]), f"{r['wall_seconds']:.0f} s")
    console.print(table)
