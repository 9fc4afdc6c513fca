"""DeepSeek-V2's multi-head latent attention (MLA) in decode steps, absorbed: attention over the cached latents.

transformers' ``DeepseekV2Attention`` caches each token's compressed latent (``kv_lora_rank`` + rope dims) but at
every step sends the whole cache back through ``kv_b_proj`` to make per-head keys and values (``[rows, heads,
width, 192 / 128]``) before SDPA: per layer and step, a GEMM over every cached position and copies many times the
cache's size. A decode step of 32 rows over 512-token prompts took 33.7 ms so (H200, lite shape), 13.9 absorbed.

Absorbed, as DeepSeek's own inference does: ``kv_b_proj``'s key half is folded into the query and its value half
into the output, and the heads attend over the latents themselves. Per head h, with ``W_UK[h]`` / ``W_UV[h]`` the
key / value rows of ``kv_b_proj`` and the runtime's per-row LoRA ``x W^T + ((x A^T) * m) B^T`` on it:

    q_lat[h] = q_nope[h] W_UK[h] + ((q_nope[h] B_UK[h]) * m) A          (the query in latent space)
    p        = softmax(scaling * (q_lat[h] K_lat^T + q_pe[h] K_pe^T))   (over the row's cached positions)
    o[h]     = (p K_lat) W_UV[h]^T + (((p K_lat) A^T) * m) B_UV[h]^T

which is the expanded attention's math exactly (everything is linear in the latents); only the rounding differs.
It does a fixed number of small GEMMs more than the expanded path and none that grows with the cache except the
two attention products, so :func:`absorb_wanted` picks it when rows x width is large enough (measured on the H200),
and on a GPU always: there its norm, rotary, cache writes and attention run in two Triton kernels a layer
(:mod:`dsft.kernels.mla_attention`) instead of ~30 small ops, and it is then the faster path at every size; the
query and output absorptions with their LoRA take one kernel each (:mod:`dsft.kernels.mla_absorb`, nine torch ops).

Only modules whose ``forward`` is exactly DeepSeek-V2's (the same bytecode) are patched, and only a decode step over
the runtime's :class:`~dsft.runtime.static_cache.SlotCache` takes the absorbed path; prefill keeps transformers' code.
The kernels run for a boolean mask (the slot decoder's), DeepSeek's complex rotary and a Llama-style latent norm;
otherwise the torch ops below do.
"""
from __future__ import annotations

import inspect
import sys
import types

import torch
from torch import nn

from dsft.kernels import mla_absorb, mla_attention, moe_gemm
from dsft.runtime.fused_norms import is_llama_rms_norm, same_code

ABSORB_FROM = 1024
"""A decode step attends absorbed from this many (row, cached position) pairs on (``rows x width``, the graph
bucket's); below it the expanded path's fewer kernels win. Measured on the H200 (lite shape, 4 adapters mixed,
``decode_profile.py --absorb-ab``, ms a step expanded -> absorbed): 1 x 64: 5.52 -> 5.95, 8 x 64: 9.70 -> 10.02,
32 x 64: 13.97 -> 13.35, 1 x 1024: 6.10 -> 6.12, 8 x 1024: 15.11 -> 10.22, 32 x 1024: 33.69 -> 13.90."""


ABSORB_FROM_KERNELS = 0
"""The same with the Triton kernels of :mod:`dsft.kernels.mla_attention` (two kernels a layer where the torch ops
took ~30): absorbed is the faster path at every size measured (H200, lite shape, ms a step expanded -> absorbed
with kernels, rows x prompt tokens, ``benchmarks/results/2026-12-01-h200-mla-absorb-kernels.md``): 1 x 16: 5.21 ->
4.98, 8 x 16: 9.30 -> 8.57, 32 x 16: 13.54 -> 11.81, 1 x 512: 5.85 -> 5.10, 8 x 512: 14.67 -> 8.90, 32 x 512: 33.12 -> 12.54."""


def absorb_wanted(rows: int, width: int, kernels: bool = False) -> bool:
    return rows * width >= (ABSORB_FROM_KERNELS if kernels else ABSORB_FROM)


def _reference_code() -> types.CodeType | None:
    try:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
    except ImportError:
        return None
    return inspect.unwrap(DeepseekV2Attention.forward).__code__  # the code under its deprecate_kwarg wrapper


def patch_mla(model: nn.Module, kv_b_lora, is_decode) -> list[nn.Module]:
    """Give every DeepSeek-V2 attention of ``model`` (without biases) the absorbed decode path.

    ``kv_b_lora(kv_b_proj, rows)`` returns the per-row LoRA of an attention's ``kv_b_proj`` for the current batch,
    ``(A [R, C], B [heads * (nope + v), R], mask [rows, R] or None)``, or None; ``is_decode(cache, seq_len)`` says
    whether this forward is a decode step over the runtime's slot cache. Returns the patched modules."""
    reference = _reference_code()
    patched = []
    for module in model.modules():
        if (reference is not None and same_code(inspect.unwrap(type(module).forward).__code__, reference)
                and getattr(module.kv_b_proj, "bias", None) is None):
            original = type(module).forward
            module.forward = types.MethodType(_forward(original, kv_b_lora, is_decode), module)
            patched.append(module)
    return patched


def restore_mla(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def _forward(original, kv_b_lora, is_decode):
    def forward(self, hidden_states, *args, **kwargs):
        # transformers' decoder layers pass everything by keyword; the cache's name changed across 5.x releases
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rows, seq = hidden_states.shape[:-1]
        mask = kwargs.get("attention_mask")
        if args or not is_decode(cache, seq) or not (mask is None or isinstance(mask, torch.Tensor)):
            return original(self, hidden_states, *args, **kwargs)  # (a flex BlockMask: transformers' own path too)
        kernels = _kernels_for(self, hidden_states, mask, cache, kwargs["position_embeddings"]) is not None
        if not absorb_wanted(rows, cache.width, kernels):
            return original(self, hidden_states, *args, **kwargs)
        return absorbed_decode(self, hidden_states, mask, cache, kwargs["position_embeddings"],
                               kv_b_lora(self.kv_b_proj, rows)), None
    return forward


_FP32_OUT: dict[torch.device, bool] = {}
"""Per device: whether ``torch.bmm(..., out_dtype=torch.float32)`` runs there (half-precision inputs on CUDA)."""


def _scores(q_lat: torch.Tensor, k_lat: torch.Tensor, q_pe: torch.Tensor, k_rope: torch.Tensor,
            scaling: float) -> torch.Tensor:
    """``scaling * (q_lat k_lat^T + q_pe k_rope^T)`` in fp32, as SDPA keeps its scores: from half-precision inputs,
    through GEMMs that write fp32 where torch has them (CUDA), else rounded once and widened."""
    if q_lat.dtype != torch.float32 and _FP32_OUT.get(q_lat.device, True):
        try:
            scores = torch.bmm(q_lat, k_lat.transpose(1, 2), out_dtype=torch.float32)
            scores = torch.baddbmm(scores, q_pe, k_rope.transpose(1, 2), out_dtype=torch.float32)
            _FP32_OUT[q_lat.device] = True
            return scores.mul_(scaling)
        except (RuntimeError, NotImplementedError, TypeError):  # no such kernel here: the first call finds out
            _FP32_OUT[q_lat.device] = False
    scores = torch.baddbmm(torch.bmm(q_lat, k_lat.transpose(1, 2)), q_pe, k_rope.transpose(1, 2))
    return scores.float().mul_(scaling)


def _kernels_for(attn: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                 position_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(latent cache [slots, columns, C], rope cache [slots, columns, dr], the rows' columns to attend [b, W] bool)``
    when this step can run in :mod:`dsft.kernels.mla_attention`'s kernels, else None (the torch ops below): a
    boolean mask, DeepSeek's complex rotary, a Llama-style latent norm, Triton usable for these sizes."""
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
            and torch.is_complex(position_embeddings) and is_llama_rms_norm(attn.kv_a_layernorm)):
        return None
    lat, rope = cache.keys[attn.layer_idx][:, 0], cache.values[attn.layer_idx][:, 0]
    if not mla_attention.usable(x, lat.shape[-1], rope.shape[-1], lat.dtype):
        return None
    return lat, rope, attention_mask[:, 0, -1, : cache.width]


def absorbed_decode(attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                    position_embeddings: torch.Tensor, lora) -> torch.Tensor:
    """One decode token per row ``hidden_states`` [b, 1, H] through ``attn`` (a DeepseekV2Attention), attending over
    ``cache`` absorbed (see the module's docstring); ``lora``: ``kv_b_proj``'s per-row LoRA or None."""
    b = hidden_states.shape[0]
    nh, dn, dr, dv, C = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    if attn.q_lora_rank is None:
        q = attn.q_proj(hidden_states)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(hidden_states)))
    kv = attn.kv_a_proj_with_mqa(hidden_states)
    fast = _kernels_for(attn, hidden_states, attention_mask, cache, position_embeddings)
    q_pe = None
    if fast is not None:  # the norm, rotary and cache writes in one kernel (dsft.kernels.mla_attention)
        lat, rope, columns = fast
        # None when it cannot compile for this GPU: the kernels are then off (a warning) and the torch ops run
        q_pe = moe_gemm.or_none(mla_attention.prologue, q.view(b, nh, dn + dr), kv.view(b, C + dr),
                                attn.kv_a_layernorm.weight, attn.kv_a_layernorm.variance_epsilon,
                                torch.view_as_real(position_embeddings).view(b, dr // 2, 2), lat, rope, cache.write, dn)
    in_kernels = q_pe is not None
    if in_kernels:
        q_nope = q.view(b, nh, dn + dr)[..., :dn]
        k_lat, k_rope = lat[:b, : cache.width], rope[:b, : cache.width]
    else:
        q = q.view(b, 1, nh, dn + dr).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [dn, dr], dim=-1)
        kv_nope, k_pe = torch.split(kv, [C, dr], dim=-1)
        k_nope = attn.kv_a_layernorm(kv_nope).view(b, 1, 1, C)
        rotary = sys.modules[type(attn).__module__].apply_rotary_emb  # transformers' own, as the expanded path uses
        q_pe, k_pe = rotary(q_pe, k_pe.view(b, 1, 1, dr), position_embeddings.to(q_pe.device))
        k_lat, k_rope = cache.update(k_nope, k_pe, attn.layer_idx)  # [b, 1, W, C], [b, 1, W, dr]
        k_lat, k_rope = k_lat.squeeze(1), k_rope.squeeze(1)

    w = attn.kv_b_proj.weight.view(nh, dn + dv, C)
    lora_q = lora_o = None
    if lora is not None:
        A, B, mask = lora
        Bh = B.view(nh, dn + dv, -1)
        lora_q, lora_o = (A, Bh[:, :dn], mask), (A, Bh[:, dn:], mask)
    q_nope = q_nope.reshape(b, nh, dn)
    # with the attention kernels, kv_b_proj's key half (and its LoRA) folds into the query in one kernel, and its
    # value half into the output in another (dsft.kernels.mla_absorb); None: they cannot compile here, torch ops
    absorb = in_kernels and mla_absorb.usable(q_nope)
    q_lat = moe_gemm.or_none(mla_absorb.absorb_query, q_nope, w[:, :dn], lora_q) if absorb else None
    if q_lat is None:
        q_lat = mla_absorb.absorb_query_reference(q_nope, w[:, :dn], lora_q)  # [nh, b, C]
    o_lat = (moe_gemm.or_none(mla_attention.attend, q_lat, q_pe, k_lat, k_rope, columns, attn.scaling)  # [nh, b, C]
             if in_kernels else None)
    if o_lat is None:
        scores = _scores(q_lat.transpose(0, 1), k_lat, q_pe.reshape(b, nh, dr), k_rope, attn.scaling)  # [b, nh, W]
        if attention_mask is not None:
            mask4 = attention_mask[:, 0, -1:, : scores.shape[-1]]  # [b, 1, W]
            scores = scores.masked_fill(~mask4, float("-inf")) if mask4.dtype == torch.bool else scores + mask4
        probs = torch.softmax(scores, dim=-1).to(k_lat.dtype)
        o_lat = torch.bmm(probs, k_lat).transpose(0, 1)  # [nh, b, C]
    out = moe_gemm.or_none(mla_absorb.absorb_output, o_lat, w[:, dn:], lora_o) if absorb else None
    if out is None:
        out = mla_absorb.absorb_output_reference(o_lat, w[:, dn:], lora_o)  # [b, nh * dv]
    return attn.o_proj(out.view(b, 1, nh * dv))
