"""RMSNorm in two kernels instead of eight (one on a GPU: :mod:`dsft.kernels.rms_norm`), for the runtime's steps.

transformers' RMSNorm (Llama's, copied into every MoE model this runtime serves) is

    weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)

which is eight ops, each a kernel on a GPU (two casts, pow, mean, add, rsqrt, two multiplies). A decode
step of one row is bound by kernel launches, not by arithmetic (DeepSeek-V2-Lite shape: 82 norms a step), so
the runtime computes the normalisation with ``F.rms_norm`` (one fused kernel on CUDA, accumulating in fp32)
and keeps the weight multiply as its own bf16 product, as transformers rounds it: the result is transformers'
up to the order of the fp32 reduction.

Only modules whose ``forward`` is exactly that code (the same bytecode as Llama's) are patched; a norm with
other math (Gemma's ``1 + weight``, a norm without weight) keeps its own forward.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn

from dsft.kernels import moe_gemm, rms_norm


@functools.cache
def _reference_code() -> types.CodeType:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def same_code(a: types.CodeType, b: types.CodeType) -> bool:
    return (a.co_code, a.co_names, a.co_consts, a.co_varnames) == (b.co_code, b.co_names, b.co_consts, b.co_varnames)


def _rms_norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if rms_norm.usable(x, module.weight) and x.stride(-1) == 1:  # on a GPU: one kernel (dsft.kernels.rms_norm)
        out = moe_gemm.or_none(rms_norm.rms_norm, x, module.weight, module.variance_epsilon)
        if out is not None:
            return out
    return rms_norm.rms_norm_reference(x, module.weight, module.variance_epsilon)


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes Llama's RMSNorm (a weight, ``variance_epsilon``, the same forward code)."""
    return (isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon")
            and same_code(type(module).forward.__code__, _reference_code()))


def fuse_rms_norms(model: nn.Module) -> list[nn.Module]:
    """Give every Llama-style RMSNorm of ``model`` the two-kernel forward; returns the modules patched (for
    :func:`restore_norms`)."""
    patched = []
    for module in model.modules():
        if is_llama_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
            patched.append(module)
    return patched


def restore_norms(modules: list[nn.Module]) -> None:
    """Give ``modules`` their own forward back."""
    for module in modules:
        module.__dict__.pop("forward", None)
