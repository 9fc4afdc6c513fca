"""`dsft plan`: counts from the meta device equal the real model's, and the estimate lands within 15% of
what a real CPU training step takes (peak resident-set growth, each setting in a fresh process)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch
from typer.testing import CliRunner

from dsft.errors import UsageError
from dsft.eval.plan import (
    GIB,
    GPU_TFLOPS,
    MEASURED_TFLOPS_H100,
    PlanRequest,
    count_model,
    estimate_memory,
    flops_per_token,
    keep_plan,
    kept_layer_bytes,
    layers_to_keep,
    plan,
)


def test_meta_counts_equal_the_real_model_with_lora_attached(home):
    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.base import load_base

    counts = count_model("tiny-deepseek-v2", dtype=torch.float32)
    loaded = load_base("tiny-deepseek-v2", device="cpu")
    assert counts.params == sum(p.numel() for p in loaded.model.parameters())
    assert counts.layer_kinds == {"dense": 1, "moe": 3}
    peft = attach_lora(loaded.model, loaded.spec, LoraSettings(r=16, alpha=32))
    assert counts.lora_params == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert 0 < counts.expert_params < counts.params and counts.active_params < counts.params


def test_state_memory_follows_the_method():
    counts = count_model("tiny-qwen3-moe", dtype=torch.bfloat16)
    lora = estimate_memory(counts, PlanRequest("tiny-qwen3-moe", "lora", new_terms=0))[0]
    assert lora.optimizer == 2 * lora.gradients == 2 * lora.trainable == 8 * counts.lora_params  # fp32 AdamW
    qlora = estimate_memory(counts, PlanRequest("tiny-qwen3-moe", "qlora", new_terms=0))[0]
    assert qlora.weights < lora.weights and qlora.optimizer == lora.optimizer
    full = estimate_memory(counts, PlanRequest("tiny-qwen3-moe", "full", new_terms=0))[0]
    assert full.optimizer == 2 * 2 * counts.params  # two bf16 moments per weight
    ckpt = estimate_memory(counts, PlanRequest("tiny-qwen3-moe", "lora", seq=1024, checkpointing=True))[0]
    no_ckpt = estimate_memory(counts, PlanRequest("tiny-qwen3-moe", "lora", seq=1024, checkpointing=False))[0]
    assert ckpt.activations < no_ckpt.activations / 3


def test_8bit_adamw_counts_a_quarter_of_the_moments_and_keeps_more_layers():
    counts = count_model("deepseek-v2-lite-shape")
    req = PlanRequest("deepseek-v2-lite-shape", batch=4, seq=2048, gpu_mem_gib=45)
    small = PlanRequest(**{**req.__dict__, "optimizer": "adamw8bit"})
    full, eight = estimate_memory(counts, req), estimate_memory(counts, small)
    assert full[1] == eight[1]  # the same values train
    assert eight[0].optimizer == pytest.approx(full[0].optimizer / 4 * (1 + 4 / 256))
    assert eight[0].total < full[0].total and "adamw8bit" in " ".join(eight[2])
    assert plan(small, counts).kept_layers > plan(req, counts).kept_layers  # the moments' room goes to kept layers
    from dsft.cli.main import app

    r = CliRunner().invoke(app, ["plan", "--base", "tiny-deepseek-v2", "--optimizer", "adam", "--json"])
    assert r.exit_code != 0 and "--optimizer: must be one of adamw, adamw8bit, got 'adam'" in r.stderr


def test_the_suggestion_is_the_largest_setting_that_fits():
    p = plan(PlanRequest("tiny-deepseek-v2", "lora", seq=2048, batch=64, checkpointing=False, gpu_mem_gib=1.5))
    assert not p.fits and p.suggestion is not None
    b, s = p.suggestion
    counts = count_model("tiny-deepseek-v2")

    def fits(b: int, s: int) -> bool:
        req = PlanRequest("tiny-deepseek-v2", "lora", seq=s, batch=b, checkpointing=False)
        return estimate_memory(counts, req)[0].total <= 1.5 * GIB

    assert fits(b, s) and not fits(2 * b, s)


def test_tokens_per_second_is_the_measured_rate_over_the_flops_per_token_scaled_by_the_gpu():
    counts = count_model("tiny-deepseek-v2")
    req = PlanRequest("tiny-deepseek-v2", "lora", seq=512, batch=4)
    h100 = plan(req, counts, gpu_name="NVIDIA H100 80GB HBM3").tokens_per_s
    assert h100 == pytest.approx(MEASURED_TFLOPS_H100 * 1e12 / flops_per_token(counts, req))
    a100 = plan(req, counts, gpu_name="NVIDIA A100-SXM4-80GB").tokens_per_s
    assert a100 == pytest.approx(h100 * GPU_TFLOPS["A100"] / GPU_TFLOPS["H100"])
    full = plan(PlanRequest("tiny-deepseek-v2", "full", seq=512, batch=4), counts, gpu_name="NVIDIA H100").tokens_per_s
    assert full < h100  # full fine-tuning also computes every weight's gradient
    assert plan(PlanRequest("tiny-deepseek-v2", "lora", device="cpu"), counts).tokens_per_s is None


def test_layers_kept_out_of_checkpointing_use_the_spare_memory_and_no_more():
    """--keep-layers auto: each kept layer adds its saved activations (less the input checkpointing keeps);
    no room, no kept layers; more room, more of them, never more than the model has."""
    counts = count_model("tiny-deepseek-v2", dtype=torch.bfloat16)
    req = PlanRequest("tiny-deepseek-v2", "lora", seq=2048, batch=8, new_terms=0)
    ckpt = estimate_memory(counts, req)[0].total
    no_ckpt = estimate_memory(counts, PlanRequest(**{**req.__dict__, "checkpointing": False}))[0].total
    assert layers_to_keep(counts, req, ckpt) == 0  # the 10% margin is not there
    one_layer = (no_ckpt - ckpt) / counts.layers
    kept = [layers_to_keep(counts, req, (ckpt + n * one_layer) / 0.9) for n in range(counts.layers + 2)]
    assert kept == sorted(kept) and kept[-1] == counts.layers and 0 < kept[2] <= 2
    assert layers_to_keep(counts, PlanRequest(**{**req.__dict__, "device": "cpu"}), 1e15) == 0  # CPU: no checkpointing
    # Compiled layers are planned at COMPILED_KEPT_SHARE (0.55) of what the eager count says: room for 2.5 counted
    # layers keeps 2 eager ones, 4 compiled ones.
    room = (ckpt + 2.5 * one_layer) / 0.9
    assert layers_to_keep(counts, req, room) == 2 and layers_to_keep(counts, req, room, compiled=True) == 4


def test_train_refuses_a_bad_keep_layers_in_one_line(home):
    from dsft.cli.main import app

    result = CliRunner().invoke(app, ["train", "--keep-layers", "some", "--max-steps", "1"])
    assert result.exit_code != 0 and "--keep-layers must be a number >= 0 or auto" in result.stderr
    assert "Traceback" not in result.stderr


def _measure(method: str, batch: int, seq: int, home: str, out) -> None:
    os.environ["DSFT_HOME"] = home
    torch.set_num_threads(1)
    from dsft.eval.plan_measure import compare

    out.put(compare(PlanRequest("tiny-deepseek-v2", method, seq=seq, batch=batch, device="cpu", checkpointing=False)))


@pytest.mark.parametrize("method,batch,seq", [("lora", 4, 512), ("lora", 1, 2048), ("full", 2, 1024)])
def test_plan_is_within_15_percent_of_a_measured_cpu_step(home, monkeypatch, method, batch, seq):
    # Large blocks straight from mmap, so freed memory leaves the resident set at once.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_measure, args=(method, batch, seq, str(home), out))
    p.start()
    row = out.get(timeout=240)
    p.join(timeout=30)
    assert row["measured_gib"] > 0.15, row  # large enough that allocator noise does not decide
    assert abs(row["error"]) < 0.15, row


def test_plan_cli_prints_json_and_refuses_bad_input_in_one_line():
    from dsft.cli.main import app

    r = CliRunner().invoke(app, ["plan", "--base", "tiny-mixtral", "--method", "esft", "--seq", "512", "--gpu-mem", "24", "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["fits"] is True and data["memory_gib"]["total"] < 24 and data["suggestion"]["seq"] >= 512
    bad = CliRunner().invoke(app, ["plan", "--method", "dora"])
    assert bad.exit_code != 0 and "--method" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["plan", "--base", "no-such-base"])
    assert missing.exit_code != 0 and "unknown base" in missing.stderr


def test_fsdp2_holds_a_share_of_weights_and_state_per_gpu_plus_the_layer_it_runs():
    counts = count_model("tiny-qwen3-moe", dtype=torch.bfloat16)
    one = estimate_memory(counts, PlanRequest("tiny-qwen3-moe", "lora", seq=512, batch=4))[0]
    four = estimate_memory(counts, PlanRequest("tiny-qwen3-moe", "lora", seq=512, batch=4, num_gpus=4))[0]
    assert four.weights == pytest.approx(one.weights / 4 + counts.largest_layer_params * 2)
    assert (four.trainable, four.gradients, four.optimizer) == pytest.approx((one.trainable / 4, one.gradients / 4, one.optimizer / 4))
    assert four.activations == one.activations  # --batch is each GPU's rows
    with pytest.raises(UsageError, match="--num-gpus"):
        PlanRequest("tiny-qwen3-moe", num_gpus=0)


def test_fsdp2_plan_matches_the_2_h200_runs(home, monkeypatch):
    """Peaks measured by benchmarks/multi_gpu.py on 2 H200 (lite shape, seq 2048, compiled;
    benchmarks/results/2026-11-30-h200x2-multi-gpu.json) and the 1-GPU run beside them. The loss then ran in
    chunks of 4,096 positions (now :func:`dsft.kernels.chunked_ce.chunk_positions`): planned as they ran."""
    monkeypatch.setattr("dsft.eval.plan.chunk_positions", lambda vocab: 4096)
    counts = count_model("deepseek-v2-lite-shape")
    for gpus, rows, measured_gib in ((1, 8, 38.73), (2, 4, 21.81), (2, 8, 23.47)):
        req = PlanRequest("deepseek-v2-lite-shape", batch=rows, seq=2048, num_gpus=gpus, gpu_mem_gib=139.8)
        predicted = estimate_memory(counts, req)[0].peak_allocated / GIB
        assert 0 <= predicted / measured_gib - 1 < 0.08, (gpus, rows, predicted, measured_gib)  # never under, within 8%


def test_plan_cli_per_gpu_under_fsdp2():
    from dsft.cli.main import app

    r = CliRunner().invoke(app, ["plan", "--base", "tiny-mixtral", "--num-gpus", "2", "--batch", "8", "--gpu-mem", "24", "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["request"]["num_gpus"] == 2 and any("fsdp2 over 2 GPUs" in n for n in data["notes"])
    bad = CliRunner().invoke(app, ["plan", "--num-gpus", "2", "--measure"])
    assert bad.exit_code != 0 and "--measure" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_plan_says_how_many_layers_dsft_train_keeps_on_the_card(home):
    """The H200 runs of 2026-12-02 (lite shape, 4 x 2048): dsft train kept all 27 layers there, at 0.58 GiB each
    measured (benchmarks/results/2026-12-02-NVIDIA-H200-train-throughput.md); planned at no less."""
    from dsft.cli.main import app
    from dsft.eval.plan import plan

    counts = count_model("deepseek-v2-lite-shape")
    big = plan(PlanRequest("deepseek-v2-lite-shape", batch=4, seq=2048, gpu_mem_gib=139.8), counts)
    assert (big.kept_layers, big.layers) == (27, 27) and 0.58 <= big.kept_layer_gib < 0.8
    tight = plan(PlanRequest("deepseek-v2-lite-shape", batch=4, seq=2048, gpu_mem_gib=45), counts)
    assert 0 < tight.kept_layers < 27  # 45 GiB less 10%: room for a few over the 38 GiB needed
    assert plan(PlanRequest("deepseek-v2-lite-shape", batch=4, seq=2048, gpu_mem_gib=40), counts).kept_layers == 0
    assert plan(PlanRequest("deepseek-v2-lite-shape", "qlora", batch=1, seq=2048, gpu_mem_gib=139.8)).kept_layers == 0
    r = CliRunner().invoke(app, ["plan", "--base", "deepseek-v2-lite-shape", "--gpu-mem", "139.8", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["kept_layers"] == {"auto": 27, "of": 27, "gib_each": round(big.kept_layer_gib, 3),
                                                   "attention_recomputed": False}
    r = CliRunner().invoke(app, ["plan", "--base", "deepseek-v2-lite-shape", "--gpu-mem", "139.8"])
    assert "keeps 27 of 27 layers" in " ".join(r.stdout.split())


def test_where_not_every_layer_fits_plainly_kept_layers_recompute_their_attention_inputs_to_keep_more():
    """--keep-layers auto on a card that holds all 27 lite-shape layers keeps them plainly (recomputing would only
    cost); on a tighter card (80 GiB at 5 x 6,144) each kept layer leaves its attention's query, key and value for
    backward to recompute, and more layers keep than plainly would, enough more to pay for it."""
    counts = count_model("deepseek-v2-lite-shape")
    # MLA: 16 heads, query and key 192 wide, value 128, bf16
    assert counts.attention_inputs_per_token == (16 * 192 + 16 * (192 + 128)) * 2
    req = PlanRequest("deepseek-v2-lite-shape", batch=4, seq=2048)
    lean = kept_layer_bytes(counts, req, compiled=True, attention_recomputed=True)
    assert kept_layer_bytes(counts, req, compiled=True) - lean == counts.attention_inputs_per_token * 4 * 2048
    assert keep_plan(counts, req, 139.8 * GIB) == (27, False)

    tight = PlanRequest("deepseek-v2-lite-shape", batch=5, seq=6144)
    plain = layers_to_keep(counts, tight, 80 * GIB, compiled=True)
    kept, recomputed = keep_plan(counts, tight, 80 * GIB)
    assert recomputed and 0 < plain < kept == layers_to_keep(counts, tight, 80 * GIB, compiled=True, attention_recomputed=True)
    p = plan(PlanRequest("deepseek-v2-lite-shape", batch=5, seq=6144, gpu_mem_gib=80), counts)
    assert (p.kept_layers, p.attention_recomputed) == (kept, True) and p.kept_layer_gib == pytest.approx(lean * 5 * 6144 / (4 * 2048) / GIB)
    from dsft.cli.main import app

    r = CliRunner().invoke(app, ["plan", "--base", "deepseek-v2-lite-shape", "--gpu-mem", "80", "--batch", "5", "--seq", "6144"])
    assert r.exit_code == 0 and f"keeps {kept} of 27 layers" in " ".join(r.stdout.split())
    assert "their attention's inputs recomputed" in " ".join(r.stdout.split())
    # one layer short of all: recomputing to fit the last one would cost more than that layer gains
    one_short = estimate_memory(counts, req)[0].total + 26.5 * kept_layer_bytes(counts, req, compiled=True)
    assert keep_plan(counts, req, one_short / 0.9) == (26, False)


def test_a_config_head_width_counts_where_the_config_gives_one():
    """Qwen3-MoE sets head_dim apart from hidden / heads: attention's inputs are counted at that width."""
    from dsft.base.presets import PRESETS, TOKENIZER_VOCAB

    cfg = PRESETS["tiny-qwen3-moe"].make_config(TOKENIZER_VOCAB)
    counts = count_model("tiny-qwen3-moe")
    width = cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    assert counts.attention_inputs_per_token == width * 2
