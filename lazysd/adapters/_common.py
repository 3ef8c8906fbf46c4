"""Rule builders shared by the per-expert families (pure data in, rules out).

Shape legend: E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import torch

from ..rules import ConfigCheck, Part, Rule


def decoder_rules(layer: str) -> tuple[Rule, ...]:
    """What every decoder family here stores alike: embeddings, final norm, untied head and
    the two per-layer norms (``layer`` is the per-layer key pattern, e.g. ``model.layers.{layer}``)."""
    return (
        Rule("model.embed_tokens.weight", kind="embedding"),
        Rule("model.norm.weight", kind="norm"),
        Rule("lm_head.weight", kind="head"),
        Rule(layer + ".{norm:input_layernorm|post_attention_layernorm}.weight", kind="norm"),
    )


def moe_checks(block: str, experts: str, intermediate: str) -> tuple[ConfigCheck, ...]:
    """config.json vs tensor shapes for a MoE family whose native experts live under ``block``
    (e.g. ``model.layers.{layer}.mlp``): expert count on the experts' and router's dim 0,
    expert intermediate size on ``down_projs`` dim 1, hidden size on the embeddings and
    ``down_projs`` dim 2. ``experts`` / ``intermediate`` are the family's config field names."""
    return (
        ConfigCheck((experts,), block + ".experts.gate_and_up_projs", 0),
        ConfigCheck((experts,), block + ".experts.down_projs", 0),
        ConfigCheck((experts,), block + ".gate.weight", 0),
        ConfigCheck((intermediate,), block + ".experts.down_projs", 1),
        ConfigCheck(("hidden_size",), "model.embed_tokens.weight", 1),
        ConfigCheck(("hidden_size",), block + ".experts.down_projs", 2),
    )


# One HF expert weight [out, in] -> a [1, in, out] slab of the native [E, in, out] tensor.
STACK_T = (None, 1, 0)


def stacked_experts(native: str, hf: str, gate: str, up: str, down: str) -> tuple[Rule, Rule]:
    """Native grouped experts from one HF tensor per expert and projection.

    ``native`` and ``hf`` are key prefixes (``hf`` contains ``{expert}``); ``gate``/``up``/
    ``down`` are the per-expert HF names. Builds::

        native.gate_and_up_projs [E, D, 2I] = stack_e cat([gate_e.T, up_e.T], -1)
        native.down_projs        [E, I, D]  = stack_e down_e.T

    Example:
        >>> rules = stacked_experts("model.layers.{layer}.mlp.experts", "model.layers.{layer}.mlp.experts.{expert}",
        ...                         "gate_proj.weight", "up_proj.weight", "down_proj.weight")
        >>> rules[0].native
        'model.layers.{layer}.mlp.experts.gate_and_up_projs'
    """
    return (
        Rule(
            native + ".gate_and_up_projs",
            parts=(Part(f"{hf}.{gate}", dims=STACK_T), Part(f"{hf}.{up}", dims=STACK_T)),
            cat_dim=2,
            kind="experts",
        ),
        Rule(native + ".down_projs", parts=(Part(f"{hf}.{down}", dims=STACK_T),), kind="experts"),
    )


def deepseek_moe_rules(layer: str) -> tuple[Rule, ...]:
    """The MLP and MTP rules DeepSeek-V3 and GLM-4.5 share (``layer`` as for :func:`decoder_rules`).

    Per-expert ``mlp.experts.{e}`` weights stacked into ``gate_and_up_projs``/``down_projs``,
    the sigmoid router and its fp32 ``e_score_correction_bias``, shared experts, the dense
    MLP of the first layers, and the extra tensors of MTP layers. Every pattern lies under
    ``layer + ".mlp."`` or names a non-attention MTP tensor, so none can claim an attention key.
    """
    return (
        *stacked_experts(
            layer + ".mlp.experts",
            layer + ".mlp.experts.{expert}",
            "gate_proj.weight",
            "up_proj.weight",
            "down_proj.weight",
        ),
        Rule(layer + ".mlp.gate.weight", kind="router"),
        Rule(layer + ".mlp.gate.e_score_correction_bias", dtype=torch.float32, kind="router"),
        Rule(layer + ".mlp.shared_experts.{proj:gate_proj|up_proj|down_proj}.weight", kind="shared_expert"),
        Rule(layer + ".mlp.{proj:gate_proj|up_proj|down_proj}.weight", kind="mlp"),
        # MTP layers (index >= num_hidden_layers) add these on top of a MoE decoder layer.
        Rule(layer + ".{name:embed_tokens|enorm|hnorm|eh_proj}.weight", kind="mtp"),
        Rule(layer + ".shared_head.{name:norm|head}.weight", kind="mtp"),
    )


#: config.json checks of the DeepSeek-style families (``model.layers.{layer}.mlp`` experts).
DEEPSEEK_MOE_CHECKS = moe_checks("model.layers.{layer}.mlp", "n_routed_experts", "moe_intermediate_size")
