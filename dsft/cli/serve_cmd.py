"""``dsft serve``: an OpenAI-compatible HTTP server for a base and its domain adapters."""
from __future__ import annotations

import typer

from dsft.base.presets import DEFAULT_BASE
from dsft.cli.common import err_console, guarded


@guarded
def serve_command(
    base: str = typer.Option(DEFAULT_BASE, "--base", "-b", help="Preset name, model directory or hub id."),
    adapter: list[str] = typer.Option(None, "--adapter", "-a", help="Adapter ref to attach at start (repeatable); more can be attached with POST /v1/adapters."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    api_key: str = typer.Option(None, "--api-key", envvar="DSFT_API_KEY", show_envvar=True,
                                help="Require 'Authorization: Bearer KEY' on every /v1 request."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Most requests run together in one batch."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="How long a request waits for others to batch with."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Most tokens one request may ask for."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    registry: str = typer.Option(None, "--registry", envvar="DSFT_REGISTRY_URL", help="Registry SQLAlchemy URL."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code shipped with the base to run."),
) -> None:
    """Serve a base and its adapters over an OpenAI-compatible API (model = adapter ref or base name).

    Example: dsft serve --adapter finance --adapter legal --port 8000
    """
    from dsft.extras import require

    require("serve", "dsft serve")
    from dsft.serve.app import Limits
    from dsft.serve.server import serve

    def ready(url: str) -> None:
        err_console.print(f"dsft serving [bold]{base}[/] with {', '.join(adapter or []) or 'no adapters'} on {url} "
                          f"(POST /v1/completions, /v1/chat/completions; GET /v1/models)"
                          + ("; API key required" if api_key else ""), highlight=False)

    serve(base, adapter or (), host=host, port=port, api_key=api_key, device=device, registry=registry,
          max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, limits=Limits(max_tokens=max_tokens),
          trust_remote_code=trust_remote_code, on_ready=ready)
