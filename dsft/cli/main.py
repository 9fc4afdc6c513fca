"""The ``dsft`` command: Typer sub-apps over the Python API."""
from __future__ import annotations

import os
import warnings

import typer

from dsft.cli import domains_cmd, experts_cmd, recipes_cmd, registry_cmd
from dsft.cli.eval_cmd import eval_command
from dsft.cli.export_cmd import export_command
from dsft.cli.generate_cmd import generate_command
from dsft.cli.logs_cmd import logs_command
from dsft.cli.plan_cmd import plan_command
from dsft.cli.serve_cmd import serve_command
from dsft.cli.train_cmd import train_command
from dsft.cli.ui_cmd import ui_command

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
    else:
        # Library deprecation notices say nothing actionable to a dsft user; --debug shows them.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")


app.command("train", context_settings={"allow_extra_args": False})(train_command)
app.add_typer(domains_cmd.app)
app.add_typer(recipes_cmd.app)
app.add_typer(experts_cmd.app)
app.add_typer(registry_cmd.app, name="registry")
app.command("generate")(generate_command)
app.command("serve")(serve_command)
app.command("ui")(ui_command)
app.command("export")(export_command)
app.command("logs")(logs_command)
app.command("eval")(eval_command)
app.command("plan")(plan_command)


def run() -> None:
    app()


if __name__ == "__main__":
    run()
