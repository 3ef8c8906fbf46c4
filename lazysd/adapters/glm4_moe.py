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

from ..rules import Adapter, Rule
from ._common import DEEPSEEK_MOE_CHECKS, decoder_rules, deepseek_moe_rules

L = "model.layers.{layer}"

RULES = (
    *decoder_rules(L),
    Rule(L + ".self_attn.{proj:q_proj|k_proj|v_proj}.{p:weight|bias}", kind="attention"),
    Rule(L + ".self_attn.{proj:o_proj|q_norm|k_norm}.weight", kind="attention"),
    *deepseek_moe_rules(L),
)

CHECKS = DEEPSEEK_MOE_CHECKS

ADAPTER = Adapter(name="glm4_moe", model_types=("glm4_moe",), rules=RULES, checks=CHECKS)
