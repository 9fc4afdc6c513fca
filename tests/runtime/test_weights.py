"""Reading adapters for the runtime: the learned key map (fast path) against PEFT's own load, and block-hashed files."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsft
from dsft.adapter_format import PEFT_WEIGHTS_FILE, digests
from dsft.errors import IntegrityError
from dsft.runtime import weights as weights_mod
from dsft.runtime.weights import read_adapter


@pytest.fixture(scope="module")
def config():
    from dsft.base import load_base

    return load_base("tiny-deepseek-v2", device="cpu").model.config


def record(ref: str):
    from dsft.registry import open_registry

    with open_registry() as reg:
        rec = reg.resolve(ref)
    return Path(rec.path), rec.parsed_manifest()


def read(path: Path, manifest, config):
    return read_adapter(path, manifest, config, device="cpu", dtype=torch.float32)


def assert_same(got, want) -> None:
    assert got.linear.keys() == want.linear.keys() and got.experts.keys() == want.experts.keys()
    assert len(got.tensors()) == len(want.tensors())
    for a, b in zip(got.tensors(), want.tensors(), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.fixture
def peft_calls(monkeypatch):
    """Fresh skeletons for the test, and a count of PEFT's loads."""
    import peft

    monkeypatch.setattr(weights_mod, "_SKELETONS", type(weights_mod._SKELETONS)())
    calls = []
    load = peft.set_peft_model_state_dict

    def counted(*args, **kwargs):
        calls.append(1)
        return load(*args, **kwargs)

    monkeypatch.setattr(peft, "set_peft_model_state_dict", counted)
    return calls


def test_the_second_adapter_of_a_config_skips_peft_and_gets_the_same_factors(refs, config, peft_calls):
    (fin, fin_m), (legal, legal_m) = record(refs["finance"]), record(refs["legal"])
    first = read(fin, fin_m, config)
    (skeleton,) = weights_mod._SKELETONS.values()
    assert skeleton.key_map is not None and not skeleton.peft_only  # PEFT only renamed the keys
    fast = read(legal, legal_m, config)
    assert len(peft_calls) == 1
    weights_mod._SKELETONS.clear()
    assert_same(fast, read(legal, legal_m, config))  # a fresh skeleton: PEFT's own load
    assert_same(read(fin, fin_m, config), first)
    assert len(peft_calls) == 2


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_a_file_that_does_not_match_its_config_is_refused_on_the_fast_path(refs, config, peft_calls, tmp_path, change):
    path, manifest = record(refs["finance"])
    read(path, manifest, config)  # learns the key map
    copy = tmp_path / "adapter"
    shutil.copytree(path, copy)
    state = load_file(copy / PEFT_WEIGHTS_FILE)
    key = sorted(k for k in state if "lora_B" in k)[0]
    if change == "missing":
        del state[key]
    elif change == "extra":
        state[key.replace("lora_B", "lora_C")] = state[key].clone()
    else:
        state[key] = state[key][:-1].clone()
    save_file(state, copy / PEFT_WEIGHTS_FILE)
    changed = replace(manifest, **digests(copy, list(manifest.files)))
    want = {"missing": f"missing {key}", "extra": "unexpected .*lora_C", "shape": f"{key} of shape"}[change]
    with pytest.raises(IntegrityError, match=want):
        read(copy, changed, config)
    assert len(peft_calls) == 1


def test_a_block_hashed_adapter_attaches_and_a_changed_block_is_refused(rt_home, monkeypatch):
    import dsft.adapter_format as fmt
    from dsft.base import load_base as load_plain
    from dsft.testing.adapters import make_adapter

    monkeypatch.setattr(fmt, "BLOCK_BYTES", 4096)
    loaded = load_plain("tiny-deepseek-v2", device="cpu")
    recs = [make_adapter(loaded, "blocked", seed=s, max_terms=2) for s in (11, 12, 13)]
    blocks = recs[0].parsed_manifest().blocks(PEFT_WEIGHTS_FILE)
    assert blocks is not None and blocks[0] == 4096 and len(blocks[1]) > 2
    for rec, damage in zip(recs[1:], ("second block", "truncated"), strict=True):
        weights = Path(rec.path) / PEFT_WEIGHTS_FILE
        data = bytearray(weights.read_bytes())
        if damage == "truncated":
            del data[-4096:]
        else:
            data[4096 + 100] ^= 0x01
        weights.write_bytes(bytes(data))
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    assert base.attach(recs[0].ref).ref == recs[0].ref
    for rec in recs[1:]:
        with pytest.raises(IntegrityError, match=f"{PEFT_WEIGHTS_FILE} does not match its recorded sha256"):
            base.attach(rec.ref)
    assert list(base.adapters) == [recs[0].ref]
    base.close()
