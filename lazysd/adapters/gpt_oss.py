"""GPT-OSS (``gpt_oss``): experts already grouped ``[E, in, out]`` with gate/up interleaved.

HF layout (BF16 checkpoints), confirmed against transformers'
``src/transformers/models/gpt_oss/modeling_gpt_oss.py`` (``GptOssExperts``: ``gate_up_proj``
[E, D, 2I] used as ``x @ gate_up_proj[e] + gate_up_proj_bias[e]``, gate = ``[..., ::2]``,
up = ``[..., 1::2]``, ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``,
``(up + 1) * gate * sigmoid(alpha * gate)`` with alpha 1.702, limit 7.0; ``down_proj``
[E, I, D] + ``down_proj_bias``; ``GptOssTopKRouter`` ``weight`` [E, D] + ``bias`` [E];
attention q/k/v/o with biases and per-head ``sinks``)::

    model.layers.L.mlp.router.{weight,bias}            [E, D], [E]
    model.layers.L.mlp.experts.gate_up_proj            [E, D, 2I] interleaved
    model.layers.L.mlp.experts.gate_up_proj_bias       [E, 2I]
    model.layers.L.mlp.experts.down_proj               [E, I, D];  .down_proj_bias [E, D]

Native, as NeMo Automodel's ``nemo_automodel/components/models/gpt_oss/state_dict_adapter.py``
maps it: renames only, tensors unchanged (the interleaving stays: the native GPT-OSS
activation reads gate and up with the same ``::2`` / ``1::2`` strides)::

    mlp.router.weight -> mlp.gate.weight        mlp.experts.gate_up_proj -> mlp.experts.gate_and_up_projs
    mlp.router.bias   -> mlp.gate.bias          mlp.experts.down_proj    -> mlp.experts.down_projs
    mlp.experts.{gate_up,down}_proj_bias        unchanged

The official releases store experts as MXFP4 (``*_blocks`` uint8 [E, out, in/32, 16] and
``*_scales`` uint8 [E, out, in/32]). lazysd does not dequantize MXFP4: such checkpoints fail
with :class:`~lazysd.errors.UnsupportedFormatError` naming the keys; use a BF16 release
(or dequantize once with transformers) instead.
"""

from ..rules import Adapter, Part, Rule
from ._common import decoder_rules, moe_checks

L = "model.layers.{layer}"

RULES = (
    *decoder_rules(L),
    Rule(L + ".self_attn.{proj:q_proj|k_proj|v_proj|o_proj}.{p:weight|bias}", kind="attention"),
    Rule(L + ".self_attn.sinks", kind="attention"),
    Rule(L + ".mlp.gate.{p:weight|bias}", parts=(Part(L + ".mlp.router.{p}"),), kind="router"),
    Rule(L + ".mlp.experts.gate_and_up_projs", parts=(Part(L + ".mlp.experts.gate_up_proj"),), kind="experts"),
    Rule(L + ".mlp.experts.down_projs", parts=(Part(L + ".mlp.experts.down_proj"),), kind="experts"),
    Rule(L + ".mlp.experts.{p:gate_up_proj_bias|down_proj_bias}", kind="experts"),
)

CHECKS = moe_checks(L + ".mlp", "num_local_experts", "intermediate_size")

MXFP4 = "MXFP4 expert weights (*_blocks / *_scales) are not dequantized by lazysd; use a BF16 checkpoint of the model"

ADAPTER = Adapter(
    name="gpt_oss",
    model_types=("gpt_oss",),
    rules=RULES,
    checks=CHECKS,
    refuse=((L + ".mlp.experts.{p:gate_up_proj|down_proj}_{q:blocks|scales}", MXFP4),),
)
