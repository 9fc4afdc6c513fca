"""``dsft generate``: one completion from a base (with an adapter), streamed to the terminal."""
from __future__ import annotations

import sys
import time

import typer

from dsft.cli.common import err_console, guarded, print_json


@guarded
def generate_command(
    prompt: str = typer.Argument(..., help="The prompt (an instruction, unless --raw)."),
    adapter: str = typer.Option(None, "--adapter", "-a", help=("Adapter ref: DOMAIN (its production tag, else its newest version), DOMAIN@VERSION or DOMAIN@TAG "
                                                                   "(default: the plain base).")),
    base: str = typer.Option(None, "--base", "-b", help="Preset name, model directory or hub id (default: the adapter's training base, else the default preset)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy (reproducible); higher = more random."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    raw: bool = typer.Option(False, "--raw", help="Continue the prompt as plain text instead of answering it as an instruction."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    fp8_experts: bool = typer.Option(False, "--fp8-experts", help="Hold the routed experts' weights in FP8 (as dsft serve "
                                     "--fp8-experts)."),
    registry: str = typer.Option(None, "--registry", envvar="DSFT_REGISTRY_URL", help="Registry SQLAlchemy URL."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON at the end instead of streaming."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No status lines on stderr."),
) -> None:
    """Generate text with a domain adapter, streaming tokens as they come.

    Example: dsft generate --adapter finance "What is a collateralized debt obligation?"
    """
    from dsft.recipes.run_checks import check_device
    from dsft.runtime.base import load_base
    from dsft.runtime.export import training_base

    check_device(device)
    check_flags(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if base is None and adapter is not None:
        from dsft.registry import open_registry
        from dsft.runtime.refs import choose

        with open_registry(registry) as reg:
            # the version attach will take (production tag, else newest) decides the base to load
            base = training_base(choose(reg, adapter)[0].parsed_manifest())
    runtime = load_base(base, device=device, registry=registry, fp8_experts=fp8_experts)
    info = runtime.attach(adapter) if adapter else None
    if not quiet and not json_out:
        if info is not None and info.via:  # the version a bare domain or a tag took
            err_console.print(f"{adapter} -> {info.ref} ({info.via})", style="dim", markup=False, highlight=False)
        err_console.print(f"{runtime.name}" + (f" + {info.ref} ({info.status})" if info else ""),
                          style="dim", markup=False, highlight=False)

    def show(_: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    result = runtime.generate(prompt, adapter=info.ref if info else None, raw=raw, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed, on_text=None if json_out else show)
    seconds = time.perf_counter() - t0
    if json_out:
        print_json({"adapter": result.adapter, "base": runtime.name, "text": result.text, "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens})
        return
    sys.stdout.write("\n")
    if not quiet:
        err_console.print(f"[dim]{result.completion_tokens} tokens in {seconds:.2f}s "
                          f"({result.completion_tokens / max(seconds, 1e-9):.1f} tokens/s), finish: {result.finish_reason}[/]")


def check_flags(**sampling) -> None:
    """The runtime's sampling checks, before a base is loaded (seconds to minutes), with the flag named.

    Raises:
        UsageError: e.g. ``--temperature must be 0 (greedy) or >= 0.01 ..., got 1e-45``.
    """
    from dsft.errors import UsageError
    from dsft.runtime.generation import check_sampling

    try:
        check_sampling(**sampling)
    except UsageError as exc:  # its message starts with the setting's name: say it as the flag
        name, _, rest = str(exc).partition(" ")
        raise UsageError(f"--{name.replace('_', '-')} {rest}") from None
