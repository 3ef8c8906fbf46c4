"""Qwen3-MoE (``qwen3_moe``): one HF tensor per expert, softmax router, no shared expert.

HF layout (projections ``[out, in]``), confirmed against transformers'
``src/transformers/models/qwen3_moe/modeling_qwen3_moe.py`` (``Qwen3MoeSparseMoeBlock``:
``gate`` = ``nn.Linear(D, E, bias=False)``, ``experts`` a list of ``Qwen3MoeMLP``; attention
with ``q_norm``/``k_norm``; dense ``mlp`` in ``mlp_only_layers`` or when
``decoder_sparse_step`` skips a layer) and NeMo Automodel's
``nemo_automodel/components/models/qwen3_moe/state_dict_adapter.py``::

    model.layers.L.self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight
    model.layers.L.mlp.gate.weight                         [E, D]
    model.layers.L.mlp.experts.{e}.{gate,up}_proj.weight   [I, D];  .down_proj.weight [D, I]
    model.layers.L.mlp.{gate,up,down}_proj.weight          dense layers

Native: ``mlp.experts.gate_and_up_projs`` [E, D, 2I], ``mlp.experts.down_projs`` [E, I, D];
every other key unchanged.
"""

from ..rules import Adapter, Rule
from ._common import decoder_rules, moe_checks, stacked_experts

L = "model.layers.{layer}"

RULES = (
    *decoder_rules(L),
    Rule(L + ".self_attn.{proj:q_proj|k_proj|v_proj|o_proj|q_norm|k_norm}.weight", kind="attention"),
    *stacked_experts(
        L + ".mlp.experts", L + ".mlp.experts.{expert}", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
    ),
    Rule(L + ".mlp.gate.weight", kind="router"),
    Rule(L + ".mlp.{proj:gate_proj|up_proj|down_proj}.weight", kind="mlp"),
)

CHECKS = moe_checks(L + ".mlp", "num_experts", "moe_intermediate_size")

ADAPTER = Adapter(name="qwen3_moe", model_types=("qwen3_moe",), rules=RULES, checks=CHECKS)
