"""``dsft ui``: the registry as web pages (adapters, compatibility matrix, each version's metrics and recipe)."""
from __future__ import annotations

import json
import os

import typer

from dsft.cli.common import err_console, guarded


@guarded
def ui_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8765, "--port", "-p", help="Port to listen on."),
    api_key: str = typer.Option(None, "--api-key", envvar="DSFT_API_KEY", show_envvar=True,
                                help="Allow setting and removing tags from the pages by whoever types this key; "
                                     "without it the pages are read-only. Set it with the DSFT_API_KEY environment "
                                     "variable: on the command line other users see it in ps."),
    registry: str = typer.Option(None, "--registry", envvar="DSFT_REGISTRY_URL", show_envvar=True, metavar="URL",
                                 help="SQLAlchemy URL of the registry (default: sqlite at $DSFT_HOME/registry.db)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the address once listening is about "
                                                       "to start (for scripts), instead of the sentence."),
) -> None:
    """Browse the registry in a web browser: adapters with versions and tags, which base versions each fits
    (with the reasons), and each version's evaluation, training curve, data plan and recipe. No model is loaded.

    Example: dsft ui --port 8765   (then open http://127.0.0.1:8765/ui)
    """
    from dsft.extras import require

    require("serve", "dsft ui")
    from dsft.serve.ui.app import serve_ui

    if api_key and os.environ.get("DSFT_API_KEY") != api_key:
        err_console.print("warning: --api-key is visible to every user of this machine (ps); "
                          "set DSFT_API_KEY in the environment instead", style="yellow", markup=False, highlight=False)

    def ready(url: str) -> None:
        if as_json:
            print(json.dumps({"url": url, "read_only": not api_key}), flush=True)
        else:
            err_console.print(f"dsft registry pages on {url} ("
                              + ("tags editable with the API key" if api_key else "read-only") + "); Ctrl-C stops",
                              markup=False, highlight=False)

    serve_ui(host=host, port=port, api_key=api_key, registry=registry, on_ready=ready)
