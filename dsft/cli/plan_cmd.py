"""``dsft plan``: will this run fit, how fast will it go, and what is the largest batch x sequence that fits."""
from __future__ import annotations

import typer
from rich.table import Table

from dsft.cli.common import console, guarded, print_json
from dsft.errors import UsageError
from dsft.eval.plan_request import GIB, METHODS, OPTIMIZERS


@guarded
def plan_command(
    base: str = typer.Option("tiny-deepseek-v2", "--base", "-b", help="Preset name, model directory or cached hub id."),
    method: str = typer.Option("lora", "--method", "-m", help=f"What trains: {' | '.join(METHODS)}."),
    seq: int = typer.Option(2048, "--seq", help="Sequence length (tokens)."),
    batch: int = typer.Option(4, "--batch", help="Sequences per step."),
    gpu_mem: float = typer.Option(None, "--gpu-mem", help="GPU memory in GiB (default: this machine's GPU, else 80)."),
    checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                       help="Recompute each decoder layer in backward (what dsft train does on CUDA)."),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    new_terms: int = typer.Option(200, "--new-terms", help="Domain terms added as tokens (their rows train)."),
    device: str = typer.Option("cuda", "--device", help="cuda (bf16 weights) or cpu (fp32, no CUDA overhead)."),
    num_gpus: int = typer.Option(1, "--num-gpus", help="GPUs sharing the run through FSDP2 (as dsft train --num-gpus); "
                                 "memory is per GPU and --batch is each GPU's rows."),
    optimizer: str = typer.Option("adamw", "--optimizer", help=f"{' | '.join(OPTIMIZERS)} (as dsft train --optimizer): "
                                  "adamw8bit keeps AdamW's moments in 8 bits."),
    measure: bool = typer.Option(False, "--measure", help="Also run two real training steps here and show the measured peak."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Estimate peak GPU memory and tokens/s of a training run from the base's config (no weights read).

    Example: dsft plan --base deepseek-ai/DeepSeek-V2-Lite --method lora --seq 4096 --batch 2 --gpu-mem 80

    Example (2 GPUs, FSDP2, 8 rows a GPU): dsft plan --base deepseek-ai/DeepSeek-V2-Lite --num-gpus 2 --batch 8

    Example (8-bit optimizer moments): dsft plan --base deepseek-ai/DeepSeek-V2-Lite --optimizer adamw8bit
    """
    from dsft.eval.plan import PlanRequest, plan

    req = PlanRequest(base=base, method=method, seq=seq, batch=batch, checkpointing=checkpointing, gpu_mem_gib=gpu_mem,
                      device=device, lora_r=lora_r, new_terms=new_terms, num_gpus=num_gpus,
                      optimizer=optimizer)
    if measure and num_gpus > 1:
        raise UsageError("--measure runs one process on this machine; leave out --num-gpus to compare with it")
    p = plan(req)
    measured = None
    if measure:
        from dsft.eval.plan_measure import compare

        measured = compare(req)
    if json_out:
        print_json({**p.to_json(), "measured": measured})
        return
    m = p.memory
    table = Table("component", "GiB", title=f"{base}, {method}, batch {batch} x {seq}"
                  f"{', checkpointing' if checkpointing else ''} ({device})"
                  + (f", per GPU of {num_gpus} (FSDP2)" if num_gpus > 1 else ""))
    rows = [("weights", m.weights), ("trainable parameters", m.trainable), ("gradients", m.gradients),
            ("optimizer state", m.optimizer), ("kept activations", m.activations),
            ("loss chunk / layer backward", m.transient), ("peak allocated", m.peak_allocated),
            ("CUDA context + allocator margin", m.overhead), ("total", m.total)]
    for name, value in rows:
        table.add_row(name, f"{value / GIB:,.2f}")
    console.print(table)
    console.print(f"trainable parameters: {p.trainable_params:,}")
    if p.tokens_per_s:
        console.print(f"estimated speed: {p.tokens_per_s:,.0f} tokens/s (every layer recomputed)")
    if p.kept_layers:
        console.print(f"dsft train (--keep-layers auto) keeps {p.kept_layers} of {p.layers} layers' activations here "
                      f"instead of recomputing them: ~{p.kept_layers * p.kept_layer_gib:,.1f} GiB more, faster steps"
                      + (" (their attention's inputs recomputed, to fit more)" if p.attention_recomputed else ""))
    verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
    console.print(f"{verdict} in {p.gpu_mem_gib:g} GiB ({m.total / GIB:,.1f} GiB needed)")
    if p.suggestion:
        b, s = p.suggestion
        console.print(f"largest that fits: --batch {b} --seq {s} ({b * s:,} tokens per step)")
    else:
        console.print("[red]nothing fits[/]: try --method qlora, a shorter --seq, or a GPU with more memory")
    for note in p.notes:
        console.print(f"note: {note}")
    if measured:
        console.print(f"measured: {measured['measured_gib']:.2f} GiB vs predicted {measured['predicted_gib']:.2f} GiB "
                      f"({measured['error']:+.1%})" + (" (CPU: memory beyond weights and trainable parameters)" if device == "cpu" else ""))
