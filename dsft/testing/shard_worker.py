"""One rank of the sharded-loading test (tests/base/test_shard_load.py), run under ``torchrun`` on gloo.

``python -m torch.distributed.run --nproc-per-node N -m dsft.testing.shard_worker MODEL_DIR OUT [MODEL_DIR OUT ...]``
builds the model of MODEL_DIR on the meta device, attaches term rows and LoRA, shards it with FSDP2, fills each
rank's shard (:mod:`dsft.base.shard_load`) and writes to OUT (rank 0): every parameter gathered whole, the loss
of a fixed batch, and what each rank held (its largest read, its largest local tensor). Several pairs run one
after the other in the same launch (one process group: the ranks' start-up is most of a launch's time).
Also :func:`build_reference`: the same model loaded whole in one process, the way dsft did it before.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

PIECES = ((5, 6), (7,), (8, 9, 10))
SEED = 7
LORA = dict(r=4, alpha=8, targets=("attention", "shared_experts", "routed_experts"))


def batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 24), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _plan(vocab: int):
    from dsft.adapters.terms import TermPlan

    return TermPlan(("<t0>", "<t1>", "<t2>"), vocab, PIECES)


class _Tokenizer:
    """The two things extend_model asks of a tokenizer."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def add_tokens(self, tokens: list[str]) -> None:
        self.n += len(tokens)


def attach(model, spec, rows=None):
    """Term rows then LoRA, seeded, as :meth:`dsft.recipes.runner.Training.attach` does."""
    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.adapters.terms import extend_model

    vocab = model.config.vocab_size
    torch.manual_seed(SEED)
    extend_model(model, _Tokenizer(vocab), _plan(vocab), rows)
    return attach_lora(model, spec, LoraSettings(**LORA))  # type: ignore[arg-type]


def build_reference(model_dir: Path):
    """The whole model in one process: from_pretrained (or, for a random preset, generated whole), adapters attached."""
    from dsft.base.loading import BaseRef, load_base

    loaded = load_base(BaseRef(str(model_dir), f"path:{model_dir}", model_dir), device="cpu")
    return attach(loaded.model, loaded.spec)


def main(pairs: list[tuple[Path, Path]]) -> None:
    import torch.distributed as td

    td.init_process_group("gloo")
    for model_dir, out in pairs:
        load_sharded(model_dir, out)
    td.destroy_process_group()


def load_sharded(model_dir: Path, out: Path) -> None:
    import torch.distributed as td
    from safetensors.torch import save_file

    from dsft.base.loading import BaseRef, load_base
    from dsft.base.shard_load import adapters_off_meta, materialize, term_rows
    from dsft.base.sharding import full_tensor, shard_model
    from dsft.eval.losses import lm_loss

    rank = td.get_rank()
    loaded = load_base(BaseRef(str(model_dir), f"path:{model_dir}", model_dir), device="cpu", meta=True)
    model, spec, weights = loaded.model, loaded.spec, loaded.weights
    rows = term_rows(model, weights, _plan(model.config.vocab_size).pieces)
    with adapters_off_meta():
        peft = attach(model, spec, rows)
    shard_model(peft, spec)
    materialize(peft, weights, "cpu")
    local_max = max(p.to_local().numel() * p.element_size() for p in peft.parameters())
    loss = float(lm_loss(peft, batch(model.config.vocab_size)))
    whole = {n: full_tensor(p.detach()).contiguous() for n, p in peft.named_parameters()}
    held: dict[str, Any] = {"rank": rank, "max_read": getattr(weights, "max_read", 0), "local_max": local_max}
    everyone: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(everyone, held)
    if rank == 0:
        save_file(whole, str(out / "params.safetensors"))
        (out / "result.json").write_text(json.dumps({"loss": loss, "ranks": everyone}))
    td.barrier()


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    main(list(zip(args[::2], args[1::2])))
