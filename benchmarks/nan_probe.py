"""Where a packed bf16 step goes non-finite on a GPU: the grouped GEMM's weight gradient with empty groups, SDPA with a block-diagonal mask (MLA head dims), then a
small DeepseekV2 (random weights) forward + backward with packed ``position_ids`` vs a plain causal batch.

    python benchmarks/nan_probe.py            # prints one JSON line per check
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F


def segments(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    pos = torch.zeros(b, n, dtype=torch.long)
    for r in range(b):
        at = 0
        while at < n:
            length = int(torch.randint(1, 200, (1,), generator=gen))
            length = min(length, n - at)
            pos[r, at:at + length] = torch.arange(length)
            at += length
    return pos


def block_mask(pos: torch.Tensor) -> torch.Tensor:
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    seg = starts.long().cumsum(1)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(pos.shape[1], pos.shape[1], dtype=torch.bool).tril()
    return (same & causal)[:, None]


def check(name: str, tensors: dict[str, torch.Tensor | None]) -> None:
    # a bool tensor is a condition (true when it holds everywhere); any other tensor is checked to be finite
    out = {k: (None if t is None else bool(t.all()) if t.dtype == torch.bool else bool(torch.isfinite(t).all())) for k, t in tensors.items()}
    print(json.dumps({"check": name, "finite": out}), flush=True)


def empty_group_wgrad(dev: str, dt: torch.dtype) -> None:
    """The weight gradient of a grouped GEMM with empty groups (experts no token chose), after the caching
    allocator has been handed a NaN-filled block of the output's size: raw ``torch._grouped_mm`` vs dsft's op."""
    from dsft.kernels.grouped_mm import gmm_wgrad

    g, k, n = 64, 2048, 16
    offs = torch.tensor([0 if e % 4 == 0 else 1 for e in range(g)], device=dev).cumsum(0).to(torch.int32) * 16
    rows = int(offs[-1])
    x, dy = torch.randn(rows, k, device=dev, dtype=dt), torch.randn(rows, n, device=dev, dtype=dt)
    for label, fn in (("raw torch._grouped_mm", lambda: torch._grouped_mm(x.t(), dy, offs=offs)), ("dsft gmm_wgrad", lambda: gmm_wgrad(x, dy, offs))):
        poison = torch.full((g, k, n), float("nan"), device=dev, dtype=dt)
        del poison  # the next allocation of this size reuses the NaN block
        dw = fn()
        check(f"wgrad with empty groups, {label}", {"dw": dw, "empty groups zero": dw[::4].float().abs().sum() == 0})


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    empty_group_wgrad(dev, dt)
    gen = torch.Generator().manual_seed(0)
    pos = segments(2, 1024, gen)
    mask = block_mask(pos).to(dev)
    for dv in (192, 128):
        q = torch.randn(2, 16, 1024, 192, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(2, 16, 1024, 192, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(2, 16, 1024, dv, device=dev, dtype=dt, requires_grad=True)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o.float().square().mean().backward()
        check(f"sdpa block mask, v dim {dv}", {"out": o, "dq": q.grad, "dk": k.grad, "dv": v.grad})

    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1,
                           n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=64,
                           q_lora_rank=None, qk_rope_head_dim=32, v_head_dim=64, qk_nope_head_dim=64,
                           max_position_embeddings=4096)
    for impl in ("sdpa", "eager"):
        cfg._attn_implementation = impl
        torch.manual_seed(0)
        model = DeepseekV2ForCausalLM(cfg).to(dev, dt)
        ids = torch.randint(0, 1000, (2, 1024), generator=gen).to(dev)
        for label, kw in (("packed position_ids", {"position_ids": pos.to(dev), "attention_mask": None}),
                          ("plain causal", {"attention_mask": torch.ones_like(ids)})):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, use_cache=False, **kw)
            loss = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, 1000), ids[:, 1:].reshape(-1))
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            check(f"DeepseekV2 {impl} {label}", {"loss": loss.detach(), "grads": torch.cat([g.float().flatten() for g in grads])})
    print(json.dumps({"torch": torch.__version__, "device": dev}), file=sys.stderr)


if __name__ == "__main__":
    main()
