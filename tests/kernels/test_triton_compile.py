"""dsft's Triton kernels compile for a Hopper GPU (sm_90) on a machine without one.

The interpreter tests (test_moe_gemm.py) check what the kernels compute; they do not compile them, and a kernel
that the compiler refuses turns itself off on the GPU (with a warning), so a decode falls back to torch's slower
path without failing. Here each variant the runtime launches goes through Triton's compiler for sm_90 ahead of
time (to PTX and, with the ptxas Triton ships, to a cubin): what would fail on the H200 fails here first.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_for_hopper(fn, types, consts, **options):
        signature = {name: ("constexpr" if p.is_constexpr else types.get(name, "i32"))
                     for name, p in zip(fn.arg_names, fn.params)}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 3, **options})
        return 1
""")
"""``compile_for_hopper(kernel, pointer and float argument types, constexprs)``: the rest of a signature is i32."""


def compiled(tmp_path, script: str) -> subprocess.CompletedProcess:
    """``script`` after :data:`HOPPER`, in a fresh process with its own Triton cache (so every kernel compiles)."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no CUDA backend")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run([sys.executable, "-c", HOPPER + script], env=env, capture_output=True, text=True, timeout=600)


COMPILE = textwrap.dedent("""
    from dsft.kernels import moe_triton

    bf16 = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "offs_ptr": "*i32", "tok_ptr": "*i64",
            "mask_ptr": "*bf16", "add_ptr": "*bf16", "scale_ptr": "*fp32", "v_ptr": "*bf16"}
    fp8 = {**bf16, "w_ptr": "*fp8e4nv"}
    off = dict(GATHER=False, MASK=False, ADD=False, GLU=False, SCALE=False, F16=False, A8=False, SECOND=False)
    variants = [  # (types, flags, BLOCK_M, BLOCK_N, BLOCK_K): the calls of a decode step and of a prefill in place
        (bf16, dict(GATHER=True), 16, 64, 128),                          # [W; A] of gate_up on the tokens' rows
        (bf16, dict(GATHER=True, GLU=True), 16, 64, 128),                # gate_up without LoRA, through SwiGLU
        (bf16, dict(MASK=True, ADD=True, GLU=True), 16, 256, 64),        # LoRA up-projection + base + SwiGLU
        (bf16, dict(MASK=True, ADD=True), 16, 256, 64),                  # down's LoRA up-projection + base
        (fp8, dict(GATHER=True, SCALE=True), 16, 32, 256),               # one FP8 decode row
        (fp8, dict(GATHER=True, SCALE=True, GLU=True), 16, 64, 128),
        (fp8, dict(GATHER=True, SCALE=True, F16=True), 16, 64, 128),     # DSFT_FP8_DOT=f16
        (fp8, dict(GATHER=True, SCALE=True, A8=True), 16, 64, 128),      # DSFT_FP8_DOT=fp8
        (fp8, dict(GATHER=True, SCALE=True, SECOND=True), 16, 64, 128),  # FP8 W and the adapters' A in one launch
        # prefills reading FP8 experts in place: the row blocks config() picks as the pairs grow
        (fp8, dict(GATHER=True, SCALE=True, SECOND=True), 32, 64, 128),
        (fp8, dict(GATHER=True, SCALE=True, SECOND=True), 64, 128, 128),
        (fp8, dict(GATHER=True, SCALE=True, SECOND=True), 128, 64, 64),
        (fp8, dict(GATHER=True, SCALE=True, GLU=True), 128, 64, 64),
        (fp8, dict(SCALE=True), 128, 64, 64),
        (bf16, dict(MASK=True, ADD=True, GLU=True), 64, 128, 64),
    ]
    for types, flags, bm, bn, bk in variants:
        compile_for_hopper(moe_triton.moe_gemm_kernel, types, {**off, **flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
    compile_for_hopper(moe_triton.moe_route_kernel, {"ids_ptr": "*i64", "token_ptr": "*i64", "expert_ptr": "*i64",
                                                     "offs_ptr": "*i32", "pos_ptr": "*i32"}, {"BLOCK": 64, "BLOCK_E": 64})
    compile_for_hopper(moe_triton.moe_combine_kernel, {"y_ptr": "*bf16", "pos_ptr": "*i32", "weight_ptr": "*fp32",
                                                       "out_ptr": "*bf16"}, {"BLOCK_N": 256})
    print("ok", len(variants) + 2)
""")


def test_the_routed_experts_kernels_compile_for_a_hopper_gpu(tmp_path):
    done = compiled(tmp_path, COMPILE)
    assert done.returncode == 0 and done.stdout.strip() == "ok 17", done.stderr[-3000:]


DECODE = textwrap.dedent("""
    from dsft.kernels import fp8_triton, lora_up_triton, mla_absorb_triton, mla_triton, rms_norm_triton, router_triton

    # DeepSeek-V2-Lite's decode at 32 rows, the constexprs as the wrappers pick them (dsft/kernels/*.py)
    bf = "*bf16"
    n = 0
    n += compile_for_hopper(rms_norm_triton.rms_norm_kernel, {"x_ptr": bf, "w_ptr": bf, "out_ptr": bf, "eps": "fp32"},
                            {"BLOCK": 2048})
    n += compile_for_hopper(fp8_triton.dequantize_kernel, {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "out_ptr": bf},
                            {"ROWS": 8, "BLOCK_K": 256})
    n += compile_for_hopper(router_triton.router_logits_kernel, {"x_ptr": bf, "w_ptr": bf, "partial_ptr": "*fp32"},
                            {"BLOCK_T": 32, "BLOCK_E": 16, "BLOCK_H": 64})
    n += compile_for_hopper(router_triton.router_topk_kernel, {"partial_ptr": "*fp32", "logits_ptr": "*fp32",
                            "weights_ptr": "*fp32", "index_ptr": "*i64", "scale": "fp32"}, {"K": 6, "BLOCK_T": 16, "BLOCK_E": 64})
    for mask in (True, False):
        n += compile_for_hopper(lora_up_triton.lora_up_kernel, {"h_ptr": bf, "mask_ptr": bf, "b_ptr": bf, "y_ptr": bf},
                                {"MASK": mask, "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 64})
        n += compile_for_hopper(lora_up_triton.swiglu_up_kernel, {k: bf for k in ("g_ptr", "hg_ptr", "bg_ptr", "u_ptr",
                                "hu_ptr", "bu_ptr", "mask_ptr", "out_ptr")}, {"MASK": mask, "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 64})
        n += compile_for_hopper(mla_absorb_triton.absorb_query_kernel, {k: bf for k in ("q_ptr", "w_ptr", "b_ptr", "a_ptr",
                                "m_ptr", "out_ptr")}, {"LORA": True, "MASK": mask, "BLOCK_B": 32, "BLOCK_C": 128, "BLOCK_D": 64,
                                "BLOCK_R": 64})
        n += compile_for_hopper(mla_absorb_triton.absorb_output_kernel, {k: bf for k in ("o_ptr", "w_ptr", "b_ptr", "a_ptr",
                                "m_ptr", "out_ptr")}, {"LORA": True, "MASK": mask, "BLOCK_B": 32, "BLOCK_V": 128, "BLOCK_C": 64,
                                "BLOCK_R": 64})
    n += compile_for_hopper(mla_triton.mla_prologue_kernel, {"q_ptr": bf, "kv_ptr": bf, "w_ptr": bf, "f_ptr": "*fp32",
                            "lat_ptr": bf, "rope_ptr": bf, "write_ptr": "*i64", "qpe_ptr": bf, "eps": "fp32"},
                            {"DR": 64, "BLOCK_H": 16, "BLOCK_C": 512})
    for split in (True, False):
        n += compile_for_hopper(mla_triton.mla_attend_kernel, {"ql_ptr": bf, "qp_ptr": bf, "lat_ptr": bf, "rope_ptr": bf,
                                "mask_ptr": "*u8", "out_ptr": bf, "part_ptr": "*fp32", "ml_ptr": "*fp32", "scaling": "fp32"},
                                {"C": 512, "DR": 64, "BLOCK_H": 16, "BLOCK_W": 32, "SPLIT": split}, num_warps=8)
    n += compile_for_hopper(mla_triton.mla_combine_kernel, {"part_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": bf},
                            {"C": 512, "BLOCK_S": 8, "BLOCK_C": 128})
    print("ok", n)
""")


def test_the_decode_kernels_compile_for_a_hopper_gpu(tmp_path):
    """The rest of a decode step's kernels (norms, FP8 widening, router, LoRA up-projections, MLA absorb and attention)
    at the lite shape's decode sizes."""
    done = compiled(tmp_path, DECODE)
    assert done.returncode == 0 and done.stdout.strip() == "ok 16", done.stderr[-3000:]
