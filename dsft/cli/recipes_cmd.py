"""``dsft recipes``: list, show and validate recipes."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dsft.cli.common import console, guarded, print_json

app = typer.Typer(name="recipes", help="Training recipes: list, show, validate.\n\nExample: dsft recipes show lora", no_args_is_help=True)


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
