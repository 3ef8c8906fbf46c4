"""Mixtral (``mixtral``): one HF tensor per expert under ``block_sparse_moe``, w1/w3/w2 names.

HF layout (projections ``[out, in]``), confirmed against transformers'
``src/transformers/models/mixtral/modeling_mixtral.py`` (``MixtralSparseMoeBlock``: ``gate``
= ``nn.Linear(D, E, bias=False)``; ``MixtralBlockSparseTop2MLP``: ``w1`` gate [I, D], ``w3``
up [I, D], ``w2`` down [D, I], ``w2(silu(w1(x)) * w3(x))``)::

    model.layers.L.block_sparse_moe.gate.weight                 [E, D]
    model.layers.L.block_sparse_moe.experts.{e}.{w1,w3}.weight  [I, D];  .w2.weight [D, I]

Native, as NeMo Automodel's ``nemo_automodel/components/models/mixtral/state_dict_adapter.py``
maps it (``block_sparse_moe`` becomes ``mlp``, like every other grouped-experts family)::

    model.layers.L.mlp.gate.weight                 [E, D]   = block_sparse_moe.gate.weight
    model.layers.L.mlp.experts.gate_and_up_projs   [E, D, 2I] = stack_e cat([w1_e.T, w3_e.T], -1)
    model.layers.L.mlp.experts.down_projs          [E, I, D]  = stack_e w2_e.T
"""

from ..rules import Adapter, Part, Rule
from ._common import decoder_rules, moe_checks, stacked_experts

L = "model.layers.{layer}"

RULES = (
    *decoder_rules(L),
    Rule(L + ".self_attn.{proj:q_proj|k_proj|v_proj|o_proj}.weight", kind="attention"),
    *stacked_experts(
        L + ".mlp.experts", L + ".block_sparse_moe.experts.{expert}", "w1.weight", "w3.weight", "w2.weight"
    ),
    Rule(L + ".mlp.gate.weight", parts=(Part(L + ".block_sparse_moe.gate.weight"),), kind="router"),
)

CHECKS = moe_checks(L + ".mlp", "num_local_experts", "intermediate_size")

ADAPTER = Adapter(name="mixtral", model_types=("mixtral",), rules=RULES, checks=CHECKS)
