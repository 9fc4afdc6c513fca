"""Every training run leaves a JSONL + TensorBoard log in its adapter; `dsft logs` reads it back."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from dsft.cli.main import app
from dsft.eval.logs import plot_loss, read_training_log, summarize


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted((run_dir / "tracking").glob("*/events.out.tfevents.*"))
    assert logs, f"no TensorBoard events under {run_dir / 'tracking'}"
    acc = EventAccumulator(str(logs[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_training_writes_a_log_that_dsft_logs_summarises_and_plots(home, tmp_path):
    """The adapter's own log (JSONL + TensorBoard), and the live tracking of the run (--report-to tensorboard,
    the default): events on disk while it trains."""
    import dsft

    seen = {}

    def on_event(kind, payload):
        if kind == "step" and payload["info"].step == 2:  # mid-run: steps 1 and 2 are on disk, 3 and 4 to come
            (run_dir,) = (home / "runs").iterdir()
            seen.update(_scalars(run_dir))

    result = dsft.train(domain="medical", max_steps=4, on_event=on_event)
    assert [s for s, _ in seen["train/loss"]] == [1, 2]
    live = _scalars(home / "runs" / result.metrics["run"])
    assert [s for s, _ in live["train/loss"]] == [1, 2, 3, 4]
    assert all(v > 0 for _, v in live["train/grad_norm"]) and len(live["train/lr"]) == 4
    assert {"eval/domain_loss_before", "eval/domain_loss", "eval/general_loss"} <= set(live)
    records = read_training_log(result.path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["imbalance"] >= 1.0 and r["tokens_per_s"] > 0 for r in records)
    assert any((result.path / "tensorboard").glob("events.out.tfevents.*"))
    out = CliRunner().invoke(app, ["logs", result.adapter, "--json", "--plot", str(tmp_path / "loss.png")])
    assert out.exit_code == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["stages"][0]["steps"] == 4 and len(shown["steps"]) == 4
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_takes_first_and_last_losses_per_stage(tmp_path):
    records = [{"stage": s, "step": i, "loss": float(10 - i), "lr": 1e-3, "tokens_per_s": 100.0, "aux_loss": 1.0,
                "imbalance": 2.0} for s, n in (("cpt", 6), ("sft", 2)) for i in range(1, n + 1)]
    summary = summarize(records)
    assert [(s["stage"], s["steps"]) for s in summary] == [("cpt", 6), ("sft", 2)]
    assert summary[0]["loss_first"] == 7.0 and summary[0]["loss_last"] == 6.0  # means of steps 1-5 and 2-6
    assert plot_loss(records, tmp_path / "p.png").exists()
    assert "heldout" not in summary[0]
    # eval_every's held-out losses ride on their steps' records: listed per stage, plotted as points
    records[2]["heldout"] = {"domain_loss": 5.5, "general_loss": 3.0}
    records[7]["heldout"] = {"domain_loss": 5.0, "general_loss": 3.1}
    summary = summarize(records)
    assert summary[0]["heldout"] == [{"step": 3, "domain_loss": 5.5, "general_loss": 3.0}]
    assert summary[1]["heldout"] == [{"step": 2, "domain_loss": 5.0, "general_loss": 3.1}]
    assert plot_loss(records, tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
