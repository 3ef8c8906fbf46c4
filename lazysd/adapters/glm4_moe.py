"""GLM-4.5 / GLM-4.6 (``glm4_moe``): one HF tensor per expert, sigmoid router with correction
bias, a shared expert, dense first layers, attention with q/k/v biases, an MTP layer.

HF layout (projections ``[out, in]``), confirmed against transformers'
``src/transformers/models/glm4_moe/modeling_glm4_moe.py`` and ``configuration_glm4_moe.py``
(``Glm4MoeTopkRouter``: ``weight`` [E, D] and the ``e_score_correction_bias`` buffer;
``Glm4MoeMoE``: ``experts`` and ``shared_experts``; ``first_k_dense_replace`` dense layers;
``attention_bias`` on q/k/v; optional ``q_norm``/``k_norm`` with ``use_qk_norm``;
``n_routed_experts``) and NeMo Automodel's
``nemo_automodel/components/models/glm4_moe/state_dict_adapter.py``::

    model.layers.L.self_attn.{q,k,v}_proj.{weight,bias}, self_attn.o_proj.weight
    model.layers.L.mlp.gate.weight [E, D], mlp.gate.e_score_correction_bias [E] fp32
    model.layers.L.mlp.experts.{e}.{gate,up}_proj.weight [I, D];  .down_proj.weight [D, I]
    model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight
    MTP layer L = num_hidden_layers: a MoE decoder layer plus
    model.layers.L.{embed_tokens,enorm,hnorm,eh_proj}.weight, model.layers.L.shared_head.{norm,head}.weight

Native: ``mlp.experts.gate_and_up_projs`` [E, D, 2I], ``mlp.experts.down_projs`` [E, I, D];
every other key unchanged.
"""

import torch

from ..rules import Adapter, Rule
from ._common import decoder_rules, moe_checks, stacked_experts

L = "model.layers.{layer}"

RULES = (
    *decoder_rules(L),
    Rule(L + ".self_attn.{proj:q_proj|k_proj|v_proj}.{p:weight|bias}", kind="attention"),
    Rule(L + ".self_attn.{proj:o_proj|q_norm|k_norm}.weight", kind="attention"),
    *stacked_experts(L + ".mlp.experts", L + ".mlp.experts.{expert}", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    Rule(L + ".mlp.gate.weight", kind="router"),
    Rule(L + ".mlp.gate.e_score_correction_bias", dtype=torch.float32, kind="router"),
    Rule(L + ".mlp.shared_experts.{proj:gate_proj|up_proj|down_proj}.weight", kind="shared_expert"),
    Rule(L + ".mlp.{proj:gate_proj|up_proj|down_proj}.weight", kind="mlp"),
    Rule(L + ".{name:embed_tokens|enorm|hnorm|eh_proj}.weight", kind="mtp"),
    Rule(L + ".shared_head.{name:norm|head}.weight", kind="mtp"),
)

CHECKS = moe_checks(L + ".mlp", "n_routed_experts", "moe_intermediate_size")

ADAPTER = Adapter(name="glm4_moe", model_types=("glm4_moe",), rules=RULES, checks=CHECKS)
