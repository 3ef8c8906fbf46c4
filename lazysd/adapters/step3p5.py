"""Step3p5 (Step-3.5-Flash): grouped MoE experts stored ``[E, out, in]``.

HF layout (all projections ``[out, in]``, no biases)::

    model.layers.L.moe.gate_proj.weight   [E, I, D]      model.layers.L.moe.router_bias  [E] fp32
    model.layers.L.moe.up_proj.weight     [E, I, D]      model.layers.L.moe.gate.weight  [E, D]
    model.layers.L.moe.down_proj.weight   [E, D, I]

Native layout (grouped experts computed as ``x @ W[e]``)::

    model.layers.L.moe.experts.gate_and_up_projs     [E, D, 2I] = cat([gate.mT, up.mT], -1)
    model.layers.L.moe.experts.down_projs            [E, I, D]  = down.mT
    model.layers.L.moe.gate.e_score_correction_bias  [E] fp32   = router_bias

Everything else keeps its key and its tensor. Layers ``>= num_hidden_layers`` are MTP layers.
Layout confirmed against the public Step3p5 state-dict adapter documentation of NeMo Automodel
and the Step3p5 config class (``moe_num_experts``, ``moe_intermediate_size``, ``share_expert_dim``).
"""

import torch

from ..rules import Adapter, Part, Rule
from ._common import decoder_rules, moe_checks

L = "model.layers.{layer}"
MT = (0, 2, 1)  # [E, out, in] -> [E, in, out]

RULES = (
    *decoder_rules(L),
    Rule(L + ".self_attn.{proj:q_proj|k_proj|v_proj|o_proj|g_proj|q_norm|k_norm}.weight", kind="attention"),
    Rule(L + ".mlp.{proj:gate_proj|up_proj|down_proj}.weight", kind="mlp"),
    Rule(L + ".share_expert.{proj:gate_proj|up_proj|down_proj}.weight", kind="shared_expert"),
    Rule(L + ".moe.gate.weight", kind="router"),
    Rule(
        L + ".moe.gate.e_score_correction_bias",
        parts=(Part(L + ".moe.router_bias"),),
        dtype=torch.float32,
        kind="router",
    ),
    Rule(
        L + ".moe.experts.gate_and_up_projs",
        parts=(Part(L + ".moe.gate_proj.weight", dims=MT), Part(L + ".moe.up_proj.weight", dims=MT)),
        cat_dim=2,
        kind="experts",
    ),
    Rule(L + ".moe.experts.down_projs", parts=(Part(L + ".moe.down_proj.weight", dims=MT),), kind="experts"),
    # MTP layers (index >= num_hidden_layers) add these on top of a dense decoder layer.
    Rule(L + ".{norm:enorm|hnorm}.weight", kind="mtp"),
    Rule(L + ".eh_proj.weight", kind="mtp"),
    Rule(L + ".transformer.shared_head.{name:norm|output}.weight", kind="mtp"),
)

CHECKS = moe_checks(L + ".moe", "moe_num_experts", "moe_intermediate_size")

ADAPTER = Adapter(name="step3p5", model_types=("step3p5",), rules=RULES, checks=CHECKS)
