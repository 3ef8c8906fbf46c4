"""Rule builders shared by the per-expert families (pure data in, rules out).

Shape legend: E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

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
