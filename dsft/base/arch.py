"""What dsft needs to know about each MoE architecture, in one table.

Everything that depends on module names (LoRA targets, where the routed experts and the router
live, which config fields give the expert counts) is looked up here, never spelled out elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsft.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Module names and config fields of one transformers MoE architecture.

    Names are module-name suffixes as PEFT matches them (``target_modules``); routed experts
    are fused 3-D parameters (``<experts>.gate_up_proj`` / ``<experts>.down_proj``) in transformers v5.
    """

    model_type: str
    architecture: str
    attention: tuple[str, ...]
    """Linear projections of the attention block."""
    shared_experts: tuple[str, ...]
    """Module-name regex fragments of the shared (always-on) expert MLP projections; empty if none."""
    experts_attr: str = "mlp.experts"
    """Path from a decoder layer to the routed experts module (holds gate_up_proj / down_proj)."""
    router_attr: str = "mlp.gate"
    """Path from a decoder layer to the router (returns logits, top-k weights, top-k indices)."""
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"
    aux_loss_coef_field: str | None = "router_aux_loss_coef"
    default_aux_loss_coef: float = 0.001
    decoder_layer: str = ""
    """Class name of a decoder layer: the unit that FSDP2 shards and all-gathers as one (multi-GPU training)."""
    router_scores: str = "softmax"
    """How the router turns logits into expert affinities: ``softmax``, or ``sigmoid`` (DeepSeek-V3, whose
    per-expert sigmoid scores dsft normalises to sum 1 per token wherever it needs probabilities)."""


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        # DeepSeek-V2 / V2-Lite: MLA attention; first_k_dense_replace dense layers, then shared + routed experts.
        ArchSpec(
            model_type="deepseek_v2",
            architecture="DeepseekV2ForCausalLM",
            decoder_layer="DeepseekV2DecoderLayer",
            attention=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            shared_experts=("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"),
            aux_loss_coef_field=None,  # the HF config has no coefficient; DeepSeek-V2 used alpha1 = 0.001 (arXiv 2405.04434)
        ),
        ArchSpec(
            model_type="deepseek_v3",
            architecture="DeepseekV3ForCausalLM",
            decoder_layer="DeepseekV3DecoderLayer",
            attention=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            shared_experts=("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"),
            num_experts_field="n_routed_experts",
            aux_loss_coef_field=None,
            default_aux_loss_coef=0.0001,  # V3 is aux-loss-free apart from a tiny sequence-wise term
            router_scores="sigmoid",
        ),
        # GLM-4.5 / 4.5-Air: DeepSeek-V3's sigmoid router (aux-loss-free bias), GQA attention with biases, one shared expert.
        ArchSpec(
            model_type="glm4_moe",
            architecture="Glm4MoeForCausalLM",
            decoder_layer="Glm4MoeDecoderLayer",
            attention=("q_proj", "k_proj", "v_proj", "o_proj"),
            shared_experts=("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"),
            num_experts_field="n_routed_experts",
            aux_loss_coef_field=None,
            default_aux_loss_coef=0.0001,
            router_scores="sigmoid",
        ),
        ArchSpec(
            model_type="qwen2_moe",
            architecture="Qwen2MoeForCausalLM",
            decoder_layer="Qwen2MoeDecoderLayer",
            attention=("q_proj", "k_proj", "v_proj", "o_proj"),
            shared_experts=("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"),
        ),
        ArchSpec(
            model_type="qwen3_moe",
            architecture="Qwen3MoeForCausalLM",
            decoder_layer="Qwen3MoeDecoderLayer",
            attention=("q_proj", "k_proj", "v_proj", "o_proj"),
            shared_experts=(),
        ),
        ArchSpec(
            model_type="mixtral",
            architecture="MixtralForCausalLM",
            decoder_layer="MixtralDecoderLayer",
            attention=("q_proj", "k_proj", "v_proj", "o_proj"),
            shared_experts=(),
            num_experts_field="num_local_experts",
        ),
        ArchSpec(
            model_type="olmoe",
            architecture="OlmoeForCausalLM",
            decoder_layer="OlmoeDecoderLayer",
            attention=("q_proj", "k_proj", "v_proj", "o_proj"),
            shared_experts=(),
        ),
    )
}


def supported() -> str:
    return ", ".join(f"{s.architecture} ({s.model_type})" for s in ARCHITECTURES.values())


def spec_for(model_type: str | None, architectures: list[str] | None = None) -> ArchSpec:
    """The table entry for a config's ``model_type``.

    Raises:
        UnsupportedModelError: the model is not an MoE architecture dsft knows, with the list of supported ones.
    """
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    name = (architectures or [model_type or "unknown"])[0]
    raise UnsupportedModelError(
        f"{name} is not a supported MoE architecture; dsft supports {supported()} "
        "(use one of these bases or a preset from `dsft train --help`)"
    )


def num_experts(spec: ArchSpec, config) -> int:
    return int(getattr(config, spec.num_experts_field))


def top_k(spec: ArchSpec, config) -> int:
    return int(getattr(config, spec.top_k_field))


def aux_loss_coef(spec: ArchSpec, config) -> float:
    if spec.aux_loss_coef_field and getattr(config, spec.aux_loss_coef_field, None) is not None:
        return float(getattr(config, spec.aux_loss_coef_field))
    return spec.default_aux_loss_coef


def supports_fused_experts(experts: object) -> bool:
    """Whether an experts module holds the fused layout dsft's expert kernels compute.

    That is transformers v5's ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (3-D, not transposed,
    gate and up concatenated), no biases, and an ``act_fn``. ESFT slices, the fast expert LoRA and the
    runtime's multi-adapter experts all ask this one question; any other layout keeps the plain forward.
    Torch-free: a tensor is recognised by its ``ndim``.
    """
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (
        getattr(gate_up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(experts, "act_fn")
        and not getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True)
        and getattr(experts, "has_gate", True) and not getattr(experts, "has_bias", False)
        and getattr(experts, "gate_up_proj_bias", None) is None and getattr(experts, "down_proj_bias", None) is None
    )
