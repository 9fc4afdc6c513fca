"""Loading a base straight into FSDP2 shards (dsft/base/shard_load.py): the meta model filled from a checkpoint
equals ``from_pretrained``'s; two gloo processes that each read only their own shard (with term rows and LoRA
attached before sharding) hold, gathered, exactly the single-process model, and compute its loss; no rank
reads a whole tensor of the size it shards."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsft.base.presets import TOKENIZER_VOCAB, _tiny_deepseek_v2, _tiny_mixtral, _tiny_qwen3_moe
from dsft.base.shard_load import CheckpointWeights, RandomWeights, materialize, meta_model, preset_config
from dsft.errors import UsageError

REPO = Path(__file__).resolve().parents[2]


def _saved(make, directory: Path, tokenizer_from: Path | None = None) -> Path:
    """A tiny model saved by transformers 5 itself (per-expert checkpoint layout), with a tokenizer."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make(TOKENIZER_VOCAB))
    model.save_pretrained(directory)
    if tokenizer_from is not None:
        for f in tokenizer_from.glob("tokenizer*"):
            shutil.copy(f, directory / f.name)
    return directory


@pytest.mark.parametrize("make", [_tiny_deepseek_v2, _tiny_mixtral, _tiny_qwen3_moe], ids=lambda m: m.__name__)
def test_a_meta_model_filled_from_the_checkpoint_is_the_from_pretrained_model(make, tmp_path):
    import transformers

    directory = _saved(make, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model = meta_model(type(ref).__name__, transformers.AutoConfig.from_pretrained(directory), torch.float32)
    weights = CheckpointWeights(directory)
    materialize(model, weights, "cpu")
    for mine, theirs in ((model.named_parameters(), ref.named_parameters()), (model.named_buffers(), ref.named_buffers())):
        a, b = dict(mine), dict(theirs)
        assert a.keys() == b.keys()
        for k in a:  # rotary inv_freq and friends included: the modules built them
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # One tensor (or one expert's matrices) read at a time: never more than the largest parameter
    assert weights.max_read <= max(p.numel() * p.element_size() for p in model.parameters())


def test_other_checkpoint_layouts_are_refused_with_the_fix(tmp_path):
    import transformers

    directory = _saved(_tiny_qwen3_moe, tmp_path)
    tensors = load_file(str(directory / "model.safetensors"))
    renamed = {k.replace(".experts.", ".moe_experts."): v for k, v in tensors.items()}
    save_file(renamed, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model = meta_model("Qwen3MoeForCausalLM", transformers.AutoConfig.from_pretrained(directory), torch.float32)
    with pytest.raises(UsageError, match="save_pretrained it with transformers 5, or use --backend ddp"):
        materialize(model, CheckpointWeights(directory), "cpu")


def test_random_rows_are_the_same_whatever_the_split():
    w = RandomWeights(seed=3, std=0.02)
    whole = w.rows("model.layers.0.mlp.experts.gate_up_proj", (5, 6, 4), 0, 5, torch.float32, torch.device("cpu"))
    parts = [w.rows("model.layers.0.mlp.experts.gate_up_proj", (5, 6, 4), lo, hi, torch.float32, torch.device("cpu"))
             for lo, hi in ((0, 3), (3, 5))]
    assert torch.equal(torch.cat(parts), whole)
    assert 0.01 < float(whole.std()) < 0.03
    assert torch.equal(w.rows("model.norm.weight", (4,), 0, 4, torch.float32, torch.device("cpu")), torch.ones(4))


def _two_ranks(*pairs: tuple[Path, Path]) -> list[dict]:
    """Two gloo ranks (one torchrun launch) load each (model directory, output directory) pair in turn."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "dsft.testing.shard_worker", *(str(p) for pair in pairs for p in pair)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / "result.json").read_text()) for _, out in pairs]


def _random_preset(directory: Path, tokenizer_from: Path) -> Path:
    """A tiny random preset as `build_preset` writes a generated one: config (with its init tag) and tokenizer.
    Odd sizes on dim 0 (7 experts, 383 and 95 rows): FSDP2 gives the two ranks unequal shards."""
    directory.mkdir()
    config = _tiny_deepseek_v2(TOKENIZER_VOCAB)
    config.n_routed_experts, config.intermediate_size, config.moe_intermediate_size = 7, 383, 95
    (directory / "config.json").write_text(json.dumps(preset_config(config, 0, "DeepseekV2ForCausalLM")))
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy(f, directory / f.name)
    return directory


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_base_dir) -> dict[str, tuple[Path, Path, dict]]:
    """Both kinds of base loaded by two ranks in one launch (its start-up is most of its time): per kind, the
    model directory, the ranks' output directory and their result."""
    root = tmp_path_factory.mktemp("shard_load")
    for kind in ("checkpoint", "random"):
        (root / kind / "out").mkdir(parents=True)
    dirs = {"checkpoint": _saved(_tiny_deepseek_v2, root / "checkpoint" / "base", tiny_base_dir),
            "random": _random_preset(root / "random" / "base", tiny_base_dir)}
    results = _two_ranks(*((d, root / kind / "out") for kind, d in dirs.items()))
    return {kind: (d, root / kind / "out", r) for (kind, d), r in zip(dirs.items(), results)}


@pytest.mark.parametrize("kind", ["checkpoint", "random"])
def test_two_ranks_loading_their_own_shards_hold_the_single_process_model(kind, sharded):
    from dsft.eval.losses import lm_loss
    from dsft.testing.shard_worker import batch, build_reference

    model_dir, out, result = sharded[kind]
    reference = build_reference(model_dir)
    gathered = load_file(str(out / "params.safetensors"))
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    assert gathered.keys() == expected.keys()
    for name, value in expected.items():  # base weights, term rows and LoRA factors: bit for bit
        assert torch.equal(gathered[name], value), name
    with torch.no_grad():
        single = float(lm_loss(reference, batch(reference.config.vocab_size)))
    assert result["loss"] == pytest.approx(single, rel=1e-5)
    # Structurally: a rank read at most one of its rows at a time and held no more than its shards.
    largest = max(p.numel() * p.element_size() for p in reference.parameters())
    for rank in result["ranks"]:
        assert rank["local_max"] <= -(-largest // 2) + 4096
        assert rank["max_read"] <= rank["local_max"]


def test_the_glm_4_5_air_shape_preset_is_larger_than_one_h200_and_plans_per_gpu(home):
    from typer.testing import CliRunner

    from dsft.base.presets import PRESETS, TOKENIZER_VOCAB
    from dsft.cli.main import app
    from dsft.eval.plan import _meta_model

    preset = PRESETS["glm-4.5-air-shape"]
    assert preset.random_weights and not preset.cpu_ok
    config = preset.make_config(TOKENIZER_VOCAB)
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts, config.num_experts_per_tok) == (4096, 46, 128, 8)
    params = sum(p.numel() for p in _meta_model(config, torch.bfloat16).parameters())
    assert params * 2 > 141e9, params  # bf16 weights alone exceed one H200
    out = CliRunner().invoke(app, ["plan", "--base", "glm-4.5-air-shape", "--num-gpus", "2", "--gpu-mem", "141"])
    assert out.exit_code == 0, out.output
    assert "per GPU of 2 (FSDP2)" in out.output and "fits in 141 GiB" in out.output
    with pytest.raises(UsageError, match="GPU benchmarks"):  # no CPU run of it here
        from dsft.base import load_base

        load_base("glm-4.5-air-shape", device="cpu")


def test_glm4_moe_takes_dsft_lora_and_router_probe():
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.base.arch import ARCHITECTURES, supports_fused_experts
    from dsft.base.router import RouterProbe
    from dsft.eval.losses import lm_loss

    cfg = Glm4MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model, spec = Glm4MoeForCausalLM(cfg), ARCHITECTURES["glm4_moe"]
    assert supports_fused_experts(model.model.layers[1].mlp.experts)
    probe = RouterProbe(model, spec)
    ids = torch.randint(0, 300, (2, 12))
    model(input_ids=ids)
    assert float(probe.aux_loss()) > 0
    probe.close()
    peft = attach_lora(model, spec, LoraSettings(r=4, alpha=8, targets=("attention", "shared_experts", "routed_experts")))
    names = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in names) and any("shared_experts" in n for n in names)
    assert any("experts.lora_A" in n or "experts.base_layer.lora_A" in n for n in names)
    lm_loss(peft, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}).backward()


def test_a_random_weights_preset_is_written_without_weights_and_generated_on_load(home, monkeypatch):
    from dsft.base import load_base
    from dsft.base.presets import PRESETS, Preset

    name = "tiny-random-deepseek-v2"
    monkeypatch.setitem(PRESETS, name, Preset(name, "test", "DeepseekV2ForCausalLM", _tiny_deepseek_v2, random_weights=True))
    first = load_base(name, device="cpu")
    assert not list(first.ref.path.glob("*.safetensors")) and first.fingerprint["architecture"] == "DeepseekV2ForCausalLM"
    again = load_base(name, device="cpu")  # the same weights every time, drawn row by row
    for (n, a), b in zip(first.model.named_parameters(), again.model.parameters()):
        assert torch.equal(a, b), n
    w = RandomWeights(0, first.model.config.initializer_range)
    q = first.model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(q[3], w.rows("model.layers.1.mlp.experts.gate_up_proj", tuple(q.shape), 3, 4, q.dtype, q.device)[0])
