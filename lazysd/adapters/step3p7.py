"""Step-3.7 (``step3p7``): the Step3p5 text model under ``model.language_model.*``, a vision tower.

HF layout, confirmed against vLLM's ``vllm/model_executor/models/step3p7.py``
(``Step3p7ForConditionalGeneration.hf_to_vllm_mapper``: checkpoint prefixes
``model.vision_model.``, ``model.vit_large_projector``, ``model.language_model.`` and
``lm_head.``; the language model is built from the nested ``config.text_config``)::

    model.language_model.{embed_tokens,norm}.weight
    model.language_model.layers.L.*          exactly the Step3p5 layer keys (see step3p5.py)
    lm_head.weight
    model.vision_model.**, model.vit_large_projector.*      vision tower: passed through

Native: the Step3p5 transformation under the same prefix
(``model.language_model.layers.L.moe.experts.gate_and_up_projs`` ...), vision keys
unchanged. Layers ``>= text_config.num_hidden_layers`` are MTP layers, exposed as
``model.language_model.mtp.layers.{i}.*`` with ``include_mtp=True``.
"""

from dataclasses import replace

from ..rules import Adapter, Part, Rule
from .step3p5 import CHECKS as STEP3P5_CHECKS
from .step3p5 import RULES as STEP3P5_RULES

PREFIX = "model.language_model."


def _nest(key: str) -> str:
    """``model.X`` -> ``model.language_model.X``; ``lm_head.weight`` stays at the top level."""
    return PREFIX + key.removeprefix("model.") if key.startswith("model.") else key


def _prefixed(rule: Rule) -> Rule:
    return replace(rule, native=_nest(rule.native), parts=tuple(Part(_nest(p.hf), p.dims) for p in rule.parts))


RULES = (
    *(_prefixed(r) for r in STEP3P5_RULES),
    Rule("model.vision_model.{path:**}", kind="other"),
    Rule("model.vit_large_projector.{path:**}", kind="other"),
)

CHECKS = tuple(replace(c, key=_nest(c.key)) for c in STEP3P5_CHECKS)

ADAPTER = Adapter(
    name="step3p7",
    model_types=("step3p7",),
    rules=RULES,
    checks=CHECKS,
    layer_prefix=PREFIX + "layers.{layer}.",
    mtp_prefix=PREFIX + "mtp.layers.{index}.",
    text_config="text_config",
)
