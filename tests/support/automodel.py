"""NeMo Automodel's real Step3p5 model over a lazysd test checkpoint (Automodel must be installed).

Shared by the Checkpointer tests and ``benchmarks/bench_automodel.py``, so both build the very
model the comparison is about.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def step3p5_config(path: str) -> Any:
    """The checkpoint's config.json as the ``PretrainedConfig`` Automodel's model takes."""
    from transformers import PretrainedConfig

    d = json.loads(Path(path, "config.json").read_text())
    d["layer_types"] = d["layer_types"][: d["num_hidden_layers"]]  # the MTP layer's entry is not a decoder layer
    d["rope_parameters"] = {"rope_theta": d["rope_theta"], "rope_type": "default"}
    return PretrainedConfig(**d)


def automodel_step3p5(path: str, mesh: Any, *, swap: bool, fill: float) -> torch.nn.Module:
    """Automodel's ``Step3p5ForCausalLM`` on CPU, experts sharded over ``mesh`` by its ``ExpertParallel``.

    Every parameter is set to ``fill`` (its pages touched, as after init). With ``swap`` the model
    holds lazysd's adapter in place of Automodel's: what the one-import swap changes.
    """
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.step3p5.model import Step3p5ForCausalLM
    from nemo_automodel.components.moe.parallelizer import ExpertParallel
    from torch.distributed.tensor.parallel import parallelize_module

    from lazysd.automodel import Step3p5StateDictAdapter

    backend = BackendConfig(
        attn="sdpa",
        linear="torch",
        rms_norm="torch",
        experts="torch",
        dispatcher="torch",
        enable_hf_state_dict_adapter=True,
    )
    with torch.device("meta"):
        model = Step3p5ForCausalLM(step3p5_config(path), backend=backend)
    if mesh is not None:
        for layer in model.model.layers.values():
            if getattr(layer, "moe", None) is not None:  # dense layers hold moe = None
                parallelize_module(layer.moe.experts, mesh, ExpertParallel())
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            (t.to_local() if hasattr(t, "to_local") else t).fill_(fill)
    if swap:
        own = model.state_dict_adapter
        model.state_dict_adapter = Step3p5StateDictAdapter(own.config, own.moe_config, own.backend, dtype=own.dtype)
    return model
