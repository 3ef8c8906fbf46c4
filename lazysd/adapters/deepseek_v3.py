"""DeepSeek-V3 (``deepseek_v3``): one HF tensor per routed expert, MLA attention, FP8 releases.

HF layout (projections ``[out, in]``), confirmed against transformers'
``src/transformers/models/deepseek_v3/modeling_deepseek_v3.py`` (``DeepseekV3TopkRouter``
with ``weight`` [E, D] and the ``e_score_correction_bias`` buffer; ``DeepseekV3MoE`` with
``experts`` and ``shared_experts``; MLA ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` or
``q_proj`` when ``q_lora_rank`` is null, ``kv_a_proj_with_mqa``/``kv_a_layernorm``/
``kv_b_proj``) and NeMo Automodel's ``nemo_automodel/components/models/deepseek_v3/
state_dict_adapter.py`` (per-expert keys, FP8 ``weight_scale_inv`` 128x128 blocks)::

    model.layers.L.mlp.{gate,up,down}_proj.weight                 dense layers (< first_k_dense_replace)
    model.layers.L.mlp.gate.weight                 [E, D]         router
    model.layers.L.mlp.gate.e_score_correction_bias [E] fp32
    model.layers.L.mlp.experts.{e}.{gate,up}_proj.weight [I, D];  .down_proj.weight [D, I]
    model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight
    *.weight_scale_inv  fp32 [ceil(out/128), ceil(in/128)]   next to each FP8 weight (official release)
    MTP layer L = num_hidden_layers (61): a full decoder layer plus
    model.layers.L.{embed_tokens,enorm,hnorm,eh_proj}.weight, model.layers.L.shared_head.{norm,head}.weight

Native: ``model.layers.L.mlp.experts.gate_and_up_projs`` [E, D, 2I] and ``.down_projs``
[E, I, D]; every other key unchanged. FP8 weights are dequantized on read by default
(``VirtualStateDict(path, fp8="keep")`` keeps them, with ``<native>_scale_inv`` scales).
"""

from ..rules import Adapter, Rule
from ._common import DEEPSEEK_MOE_CHECKS, decoder_rules, deepseek_moe_rules

L = "model.layers.{layer}"

RULES = (
    *decoder_rules(L),
    Rule(
        L + ".self_attn.{proj:q_proj|q_a_proj|q_a_layernorm|q_b_proj"
        "|kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj|o_proj}.weight",
        kind="attention",
    ),
    *deepseek_moe_rules(L),
)

CHECKS = DEEPSEEK_MOE_CHECKS

ADAPTER = Adapter(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    rules=RULES,
    checks=CHECKS,
    scale_suffix="_scale_inv",
)
