"""The pieces of multi-process training that need no second process: how a global batch is split, how the
ranks' losses add up to the global one, the accelerate config a launch writes, and what a launch runs.
(Two real processes training together: tests/cli/test_multiprocess_train.py.)"""
from __future__ import annotations

import importlib

import pytest
import torch
import yaml

from dsft.base.arch import ARCHITECTURES
from dsft.data.tokenize import Examples
from dsft.recipes.distributed import Dist, StepSync, split_rows
from dsft.recipes.launch import LaunchSettings, accelerate_config, config_text
from dsft.recipes.sources import StageData, stage_batches


def _examples(n: int = 10, seq: int = 6) -> Examples:
    ids = torch.arange(n * seq).view(n, seq)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[3, :] = -100  # a row without targets
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return Examples(ids, labels, mask)


@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (5, 3), (2, 4)])
def test_a_global_batch_splits_into_contiguous_near_equal_rank_shares(n, world):
    parts = [split_rows(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_the_ranks_batches_together_are_the_single_process_batch():
    data = StageData(_examples(), {}, {})
    whole = stage_batches(data, 4, "cpu")
    for step in range(2):
        shards = [stage_batches(data, 4, "cpu", (r, 2))(step) for r in range(2)]
        for key, value in whole(step).items():
            assert torch.equal(torch.cat([s[key] for s in shards]), value)


def test_rank_weighted_means_average_to_the_global_batch_mean():
    ex = _examples()
    per_row = torch.rand(len(ex), ex.labels.shape[1] - 1)  # a stand-in for per-token losses
    counted = ex.labels[:, 1:] != -100
    for step in range(2):
        rows = slice(4 * step, 4 * step + 4)
        single = (per_row[rows] * counted[rows]).sum() / counted[rows].sum()
        averaged = 0.0
        for rank in range(2):
            sync = StepSync(Dist(rank=rank, world=2), ex, 4)
            _, mine = sync._rows(step)
            rank_mean = (per_row[mine] * counted[mine]).sum() / counted[mine].sum().clamp(min=1)
            averaged += rank_mean * sync.loss_weight(step) / 2  # gradients are averaged over the 2 ranks
        torch.testing.assert_close(averaged, single)


def test_held_out_shares_are_padded_with_rows_that_count_no_tokens():
    ex = _examples(5).to_dict()
    shares = [Dist(rank=r, world=2).eval_share(ex) for r in range(2)]
    assert [s["input_ids"].shape[0] for s in shares] == [3, 3]  # the same forwards on every rank
    assert torch.equal(torch.cat([shares[0]["labels"], shares[1]["labels"][:2]]), ex["labels"])
    assert (shares[1]["labels"][2] == -100).all()


def test_the_router_loss_from_global_loads_equals_the_plain_one_in_one_process(tiny_base_dir):
    from dsft.base import load_base
    from dsft.base.router import RouterProbe

    loaded = load_base("tiny-deepseek-v2", device="cpu")
    probe = RouterProbe(loaded.model, loaded.spec, global_stats=True)
    ids = torch.randint(0, 1000, (3, 16))
    loaded.model(input_ids=ids)
    torch.testing.assert_close(probe.aux_loss_global(lambda t: t), probe.aux_loss())
    probe.close()


@pytest.mark.parametrize("spec", list(ARCHITECTURES.values()), ids=lambda s: s.model_type)
def test_fsdp_config_wraps_each_architectures_decoder_layer(spec):
    module = importlib.import_module(f"transformers.models.{spec.model_type}.modeling_{spec.model_type}")
    assert hasattr(module, spec.decoder_layer), spec.decoder_layer
    cfg = accelerate_config(LaunchSettings(num_processes=2, backend="fsdp", decoder_layer=spec.decoder_layer))
    assert cfg["distributed_type"] == "FSDP" and cfg["num_processes"] == 2
    assert cfg["fsdp_config"]["fsdp_version"] == 2
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == spec.decoder_layer


def test_multi_node_and_other_backend_configs():
    s = LaunchSettings(num_processes=8, backend="ddp", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                       main_process_port=29500, decoder_layer="DeepseekV2DecoderLayer")
    cfg = yaml.safe_load(config_text(s))  # the file a user edits parses back to the same settings
    assert cfg == accelerate_config(s)
    assert (cfg["distributed_type"], cfg["num_processes"], cfg["num_machines"], cfg["machine_rank"]) == ("MULTI_GPU", 16, 2, 1)
    assert (cfg["main_process_ip"], cfg["main_process_port"]) == ("10.0.0.1", 29500)
    ds = accelerate_config(LaunchSettings(num_processes=2, backend="deepspeed"))
    assert ds["distributed_type"] == "DEEPSPEED" and ds["deepspeed_config"]["zero_stage"] == 3


@pytest.mark.parametrize("settings,message", [
    (dict(backend="megatron"), "--backend must be one of fsdp, ddp, deepspeed"),
    (dict(num_machines=2), "--num-machines > 1 needs --main-process-ip"),
    (dict(num_machines=2, machine_rank=2, main_process_ip="h"), "--machine-rank must be in 0..1"),
    (dict(num_processes=0), "--num-gpus and --num-machines must be >= 1"),
])
def test_impossible_launch_settings_are_refused(settings, message):
    from dsft.errors import UsageError

    with pytest.raises(UsageError, match=message):
        LaunchSettings(**settings).check()


def test_esft_gradient_mask_after_backward_matches_the_hook(tiny_base_dir):
    from dsft.adapters.esft import expert_mask, mask_expert_grad_

    for shape, dim in [((8, 6, 4), 0), ((16, 4), 0), ((5, 24), -1)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape)
        idx = torch.tensor([1, 6])
        expected = p.grad * expert_mask(p.detach(), 8, idx, dim)
        mask_expert_grad_(p, 8, idx, dim)
        assert torch.equal(p.grad, expected)


def test_a_world_of_one_asked_for_cuda_gets_an_indexed_device(monkeypatch):
    # torch.cuda.set_device("cuda") raises; a single process (or torchrun with one rank) must get "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Dist().device("cuda") == "cuda:0"
    assert Dist(rank=1, world=2, local_rank=1).device(None) == "cuda:1"
    assert Dist().device(None) is None  # no launcher: the caller's default device
    assert Dist().device("cpu") == "cpu"
