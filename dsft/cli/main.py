"""The ``dsft`` command: Typer sub-apps over the Python API."""
from __future__ import annotations

import os

import typer

from dsft.cli import domains_cmd, recipes_cmd
from dsft.cli.train_cmd import train_command

app = typer.Typer(
    name="dsft",
    help="Domain-specialised fine-tuning for Mixture-of-Experts models.\n\nExample: dsft train --domain finance",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    if debug:
        os.environ["DSFT_DEBUG"] = "1"


app.command("train", context_settings={"allow_extra_args": False})(train_command)
app.add_typer(domains_cmd.app)
app.add_typer(recipes_cmd.app)
try:
    from dsft.cli.registry_cmd import app as registry_app

    app.add_typer(registry_app, name="registry")
except ImportError:  # pragma: no cover - the registry CLI is part of the package; this guards partial installs
    pass


def run() -> None:
    app()


if __name__ == "__main__":
    run()
