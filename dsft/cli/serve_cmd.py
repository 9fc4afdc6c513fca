"""``dsft serve``: an OpenAI-compatible HTTP server for a base and its domain adapters."""
from __future__ import annotations

import os

import typer

from dsft.base.presets import DEFAULT_BASE
from dsft.cli.common import err_console, guarded


@guarded
def serve_command(
    base: str = typer.Option(DEFAULT_BASE, "--base", "-b", help="Preset name, model directory or hub id."),
    adapter: list[str] = typer.Option(None, "--adapter", "-a", help=("Adapter ref to attach at start (repeatable): DOMAIN (its production tag, else its newest "
                                                                       "version), DOMAIN@VERSION or DOMAIN@TAG; more can be attached with POST /v1/adapters.")),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    api_key: str = typer.Option(None, "--api-key", envvar="DSFT_API_KEY", show_envvar=True,
                                help="Require 'Authorization: Bearer KEY' on every /v1 request and /metrics. Set it with the "
                                     "DSFT_API_KEY environment variable: on the command line other users see it in ps."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Most requests generating at once (continuous batching: requests join and leave between tokens)."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="The most a request that finds nothing running waits for others (it stops 2 ms after the latest arrival)."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Most completions waiting for the engine; beyond it "
                                                             "requests get HTTP 429 with Retry-After."),
    kv_memory: float = typer.Option(None, "--kv-memory", metavar="GIB",
                                    help="Most GiB the running requests' KV cache may take; requests beyond it wait, one "
                                         "that alone needs more is refused (default: on a GPU, half the memory free "
                                         "after loading; on a CPU, no limit)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Most tokens one request may ask for."),
    max_adapters: int = typer.Option(None, "--max-adapters", help="Most adapters resident at once; attaching another "
                                     "evicts the least recently used one no request is using (default: no limit)."),
    adapter_memory: float = typer.Option(None, "--adapter-memory", metavar="GIB",
                                         help="Most GiB of adapter weights resident at once; beyond it the least "
                                              "recently used adapters not in use are evicted (default: no limit)."),
    load_on_demand: bool = typer.Option(False, "--load-on-demand", help="A request naming a registry adapter that is "
                                        "not resident attaches it first (registry check and sha256, as attach does)."),
    access_log: str = typer.Option("-", "--access-log", metavar="FILE|-|off",
                                   help="Where the JSON access log goes, one line per request: - (stderr), a file "
                                        "(appended), or off."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    registry: str = typer.Option(None, "--registry", envvar="DSFT_REGISTRY_URL", help="Registry SQLAlchemy URL."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code shipped with the base to run."),
    fp8_experts: bool = typer.Option(False, "--fp8-experts", help="Hold the routed experts' weights in FP8 (a scale per "
                                     "output row): half their memory and of what a decode step reads; outputs move by "
                                     "FP8's rounding."),
    ui: bool = typer.Option(False, "--ui", help="Also serve the registry pages under /ui (as `dsft ui` does; "
                                                "tags editable only with the API key)."),
    warm_up: bool = typer.Option(None, "--warm-up/--no-warm-up",
                                 help="Generate two tokens for the base and each adapter before listening, so that the "
                                      "first client does not wait for kernels to compile and CUDA graphs to be captured "
                                      "(default: on a GPU)."),
) -> None:
    """Serve a base and its adapters over an OpenAI-compatible API (model = adapter ref or base name).

    Example: DSFT_API_KEY=... dsft serve --adapter finance --adapter legal@0.1.0 --port 8000 [--fp8-experts]
    """
    from dsft.extras import require

    require("serve", "dsft serve")
    from dsft.recipes.run_checks import check_device
    from dsft.serve.app import Limits
    from dsft.serve.server import serve

    check_device(device)  # before a base loads, not transformers' device_map error after

    if api_key and os.environ.get("DSFT_API_KEY") != api_key:
        err_console.print("warning: --api-key is visible to every user of this machine (ps); "
                          "set DSFT_API_KEY in the environment instead", style="yellow", markup=False, highlight=False)

    def ready(url: str, infos) -> None:
        for asked, info in zip(adapter or [], infos):
            how = f" ({info.via})" if info.via else ""
            err_console.print(f"{asked} -> {info.ref}{how}" if asked != info.ref else info.ref, markup=False, highlight=False)
        err_console.print(f"dsft serving {base} with {', '.join(i.ref for i in infos) or 'no adapters'} on {url} "
                          f"(POST /v1/completions, /v1/chat/completions; GET /v1/models: the refs clients may use; GET /metrics)"
                          + ("; API key required" if api_key else "") + (f"; registry pages at {url}/ui" if ui else "")
                          + ("; routed experts in FP8" if fp8_experts else ""),
                          markup=False, highlight=False)

    serve(base, adapter or (), host=host, port=port, api_key=api_key, device=device, registry=registry,
          max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_queue=max_queue, kv_memory_gib=kv_memory,
          max_adapters=max_adapters,
          adapter_memory_gib=adapter_memory, load_on_demand=load_on_demand, access_log=access_log,
          limits=Limits(max_tokens=max_tokens),
          trust_remote_code=trust_remote_code, fp8_experts=fp8_experts, ui=ui, warm_up=warm_up, on_ready=ready)
