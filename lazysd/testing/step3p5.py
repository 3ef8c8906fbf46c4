"""The Step3p5 model family as data: its spec, ``config.json``, and tensor keys, dtypes and shapes.

:class:`Step3p5Spec` sizes a model (``tiny()`` for tests, ``flash()`` for Step-3.5-Flash);
:func:`hf_tensor_specs` lists the Hugging Face layout of Step-3.5-Flash (documented in
:mod:`lazysd.adapters.step3p5`): grouped experts ``moe.{gate,up}_proj.weight`` [E, I, D] and
``moe.down_proj.weight`` [E, D, I], an fp32 ``moe.router_bias``, MTP layers after the main
ones; :func:`native_state_dict` is the eager reference conversion to the native layout.
:mod:`lazysd.testing.checkpoints` writes these tensors to disk.

Shape legend: E experts, D hidden, I expert intermediate, S shared-expert intermediate,
V vocabulary, nh query heads of the layer, hd head dim.

Example:
    >>> spec = Step3p5Spec.tiny()
    >>> [(k, tuple(s)) for k, _, s in hf_tensor_specs(spec) if k.endswith("1.moe.gate_proj.weight")]
    [('model.layers.1.moe.gate_proj.weight', (8, 16, 32))]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = [
    "Step3p5Spec",
    "checkpoint_nbytes",
    "config_dict",
    "hf_tensor_specs",
    "native_state_dict",
    "native_tensor_specs",
]

Entry = tuple[str, torch.dtype, tuple[int, ...]]


@dataclass(frozen=True, kw_only=True)
class Step3p5Spec:
    """Sizes of a Step3p5 model; the defaults are the tiny test model.

    Layers ``0..num_hidden_layers-1`` are the main decoder, the ``num_nextn_predict_layers`` MTP
    layers follow. Full-attention layers are those with ``L % 4 == 0`` (``num_attention_heads``
    query heads), the others use sliding attention (``sliding_num_attention_heads``).

    Example:
        >>> spec = Step3p5Spec.tiny()
        >>> spec.moe_layers, spec.mtp_layers
        ((1, 2, 3), (4,))
        >>> Step3p5Spec.flash().moe_layers[:3]
        (3, 4, 5)
    """

    num_hidden_layers: int = 4  # main decoder layers
    num_nextn_predict_layers: int = 1  # MTP layers stored after the main ones
    first_dense_layers: int = 1  # layers 0..first_dense_layers-1 use a dense mlp
    moe_layers: tuple[int, ...] | None = None  # None: first_dense_layers..num_hidden_layers-1
    moe_num_experts: int = 8
    moe_top_k: int = 2
    moe_intermediate_size: int = 16
    share_expert_dim: int = 16
    hidden_size: int = 32
    intermediate_size: int = 64  # dense and MTP layers
    num_attention_heads: int = 4  # full-attention layers
    num_attention_groups: int = 2  # kv heads, all layers
    sliding_num_attention_heads: int = 6  # attention_other_setting.num_attention_heads
    head_dim: int = 8
    vocab_size: int = 64
    sliding_window: int = 4
    rms_norm_eps: float = 1e-5
    moe_router_scaling_factor: float = 1.0  # multiplies the normalised routing weights

    def __post_init__(self) -> None:
        if self.moe_layers is None:
            layers = tuple(range(self.first_dense_layers, self.num_hidden_layers))
            object.__setattr__(self, "moe_layers", layers)
        else:
            object.__setattr__(self, "moe_layers", tuple(sorted(set(self.moe_layers))))
        assert self.moe_layers is not None
        if any(not 0 <= L < self.num_hidden_layers for L in self.moe_layers):
            raise ValueError(
                f"moe_layers {self.moe_layers} must lie in 0..{self.num_hidden_layers - 1} "
                "(MTP layers are always dense)"
            )
        if not 0 < self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} needs 1..moe_num_experts={self.moe_num_experts}")
        for heads in (self.num_attention_heads, self.sliding_num_attention_heads):
            if heads % self.num_attention_groups:
                raise ValueError(f"{heads} query heads do not split into {self.num_attention_groups} groups")

    @classmethod
    def tiny(cls, **overrides: object) -> Step3p5Spec:
        """4 main layers (1 dense + 3 MoE), 1 MTP layer, 8 experts, hidden 32: a few hundred KB."""
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def flash(cls) -> Step3p5Spec:
        """The real Step-3.5-Flash sizes (~199 B parameters, ~399 GB in bf16)."""
        return cls(
            num_hidden_layers=45,
            num_nextn_predict_layers=3,
            first_dense_layers=3,
            moe_num_experts=288,
            moe_top_k=8,
            moe_intermediate_size=1280,
            share_expert_dim=1280,
            hidden_size=4096,
            intermediate_size=11264,
            num_attention_heads=64,
            num_attention_groups=8,
            sliding_num_attention_heads=96,
            head_dim=128,
            # Public config.json files of the release say 128896 (a multiple of 128).
            vocab_size=128896,
            sliding_window=512,
            moe_router_scaling_factor=3.0,
        )

    @classmethod
    def sized(cls, total_bytes: int) -> Step3p5Spec:
        """A Flash-shaped model (3 dense layers, MoE after) of roughly ``total_bytes`` in bf16.

        Hidden size 1024 and expert width 512 are fixed; the expert count (a multiple of 8) is
        chosen to hit the size, and layers are doubled while one expert tensor would exceed
        256 MiB, so benchmarks read many medium tensors rather than a few huge ones.

        Example:
            >>> spec = Step3p5Spec.sized(2 * 10**9)
            >>> abs(checkpoint_nbytes(spec) / 2e9 - 1) < 0.1
            True
        """
        base = cls(
            num_hidden_layers=8,
            num_nextn_predict_layers=1,
            first_dense_layers=3,
            moe_num_experts=8,
            moe_top_k=4,
            moe_intermediate_size=512,
            share_expert_dim=512,
            hidden_size=1024,
            intermediate_size=2816,
            num_attention_heads=8,
            num_attention_groups=2,
            sliding_num_attention_heads=12,
            head_dim=128,
            vocab_size=32768,
            sliding_window=128,
        )
        while True:
            fixed = checkpoint_nbytes(base)
            per_8_experts = checkpoint_nbytes(replace(base, moe_num_experts=16)) - fixed
            experts = 8 * max(1, 1 + round((total_bytes - fixed) / per_8_experts))
            expert_tensor = experts * base.moe_intermediate_size * base.hidden_size * 2
            if expert_tensor <= 256 * 2**20:
                return replace(base, moe_num_experts=experts)
            base = replace(base, num_hidden_layers=2 * base.num_hidden_layers)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, where: str = "config.json") -> Step3p5Spec:
        """The spec of a Step3p5 ``config.json`` (as :func:`config_dict` writes it, or a real one).

        Raises:
            ConfigError: a field the reference model needs is missing, or the config asks for
                something it does not build (attention layer types other than ``L % 4``).

        Example:
            >>> Step3p5Spec.from_config(config_dict(Step3p5Spec.tiny())) == Step3p5Spec.tiny()
            True
        """
        from ..errors import ConfigError

        def field(name: str, default: Any = None) -> Any:
            node: Any = config
            for part in name.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is None and default is None:
                raise ConfigError(f"{where}: {name} is missing; the Step3p5 reference model needs it")
            return default if node is None else node

        layers = field("num_hidden_layers")
        mtp = field("num_nextn_predict_layers", 0)
        enum = field("moe_layers_enum", "")
        moe = tuple(int(x) for x in str(enum).split(",") if x.strip()) if enum else None
        spec = cls(
            num_hidden_layers=layers,
            num_nextn_predict_layers=mtp,
            first_dense_layers=min(moe) if moe else layers,
            moe_layers=tuple(L for L in moe if L < layers) if moe else (),
            moe_num_experts=field("moe_num_experts"),
            moe_top_k=field("moe_top_k"),
            moe_intermediate_size=field("moe_intermediate_size"),
            share_expert_dim=field("share_expert_dim"),
            hidden_size=field("hidden_size"),
            intermediate_size=field("intermediate_size"),
            num_attention_heads=field("num_attention_heads"),
            num_attention_groups=field("num_attention_groups"),
            sliding_num_attention_heads=field(
                "attention_other_setting.num_attention_heads", field("num_attention_heads")
            ),
            head_dim=field("head_dim"),
            vocab_size=field("vocab_size"),
            sliding_window=field("sliding_window"),
            rms_norm_eps=field("rms_norm_eps", 1e-5),
            moe_router_scaling_factor=field("moe_router_scaling_factor", 1.0),
        )
        types = config.get("layer_types")
        if isinstance(types, list):
            expected = [
                "full_attention" if spec.is_full_attention(L) else "sliding_attention" for L in range(len(types))
            ]
            if types != expected:
                raise ConfigError(
                    f"{where}: layer_types differ from the reference model's full attention every 4th layer"
                )
        return spec

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """Indices of the MTP layers (after the main ones)."""
        return tuple(range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers))

    def is_moe(self, layer: int) -> bool:
        assert self.moe_layers is not None
        return layer in self.moe_layers

    def is_full_attention(self, layer: int) -> bool:
        return layer % 4 == 0

    def num_heads(self, layer: int) -> int:
        """Query heads of ``layer``: full layers and sliding layers differ."""
        return self.num_attention_heads if self.is_full_attention(layer) else self.sliding_num_attention_heads


def config_dict(spec: Step3p5Spec) -> dict[str, object]:
    """The ``config.json`` of a checkpoint with ``spec``'s sizes.

    Example:
        >>> cfg = config_dict(Step3p5Spec.tiny())
        >>> cfg["model_type"], cfg["moe_layers_enum"], "num_key_value_heads" in cfg
        ('step3p5', '1,2,3', False)
    """
    assert spec.moe_layers is not None
    n_layers = spec.num_hidden_layers + spec.num_nextn_predict_layers
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_nextn_predict_layers": spec.num_nextn_predict_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_attention_groups": spec.num_attention_groups,
        "head_dim": spec.head_dim,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": spec.sliding_num_attention_heads,
            "num_attention_groups": spec.num_attention_groups,
            "head_dim": spec.head_dim,
        },
        "layer_types": [
            "full_attention" if spec.is_full_attention(L) else "sliding_attention" for L in range(n_layers)
        ],
        "sliding_window": spec.sliding_window,
        "use_head_wise_attn_gate": True,
        "use_qk_norm": True,
        "zero_centered": True,
        "rms_norm_eps": spec.rms_norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "rope_theta": 10000.0,
        "use_moe": True,
        "moe_layers_enum": ",".join(str(L) for L in spec.moe_layers),
        "moe_num_experts": spec.moe_num_experts,
        "moe_top_k": spec.moe_top_k,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "share_expert_dim": spec.share_expert_dim,
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": spec.moe_router_scaling_factor,
        "use_moe_router_bias": True,
        "norm_expert_weight": True,
        "need_fp32_gate": True,
    }


def _layer_specs(spec: Step3p5Spec, L: int, *, native: bool) -> list[Entry]:
    bf16, D, hd, p = torch.bfloat16, spec.hidden_size, spec.head_dim, f"model.layers.{L}."
    nh, kv = spec.num_heads(L), spec.num_attention_groups
    out: list[Entry] = [
        (p + "input_layernorm.weight", bf16, (D,)),
        (p + "self_attn.q_proj.weight", bf16, (nh * hd, D)),
        (p + "self_attn.k_proj.weight", bf16, (kv * hd, D)),
        (p + "self_attn.v_proj.weight", bf16, (kv * hd, D)),
        (p + "self_attn.o_proj.weight", bf16, (D, nh * hd)),
        (p + "self_attn.g_proj.weight", bf16, (nh, D)),
        (p + "self_attn.q_norm.weight", bf16, (hd,)),
        (p + "self_attn.k_norm.weight", bf16, (hd,)),
        (p + "post_attention_layernorm.weight", bf16, (D,)),
    ]
    if spec.is_moe(L):
        E, I, S = spec.moe_num_experts, spec.moe_intermediate_size, spec.share_expert_dim
        if native:
            out += [
                (p + "moe.gate.weight", bf16, (E, D)),
                (p + "moe.gate.e_score_correction_bias", torch.float32, (E,)),
                (p + "moe.experts.gate_and_up_projs", bf16, (E, D, 2 * I)),
                (p + "moe.experts.down_projs", bf16, (E, I, D)),
            ]
        else:
            out += [
                (p + "moe.gate.weight", bf16, (E, D)),
                (p + "moe.router_bias", torch.float32, (E,)),
                (p + "moe.gate_proj.weight", bf16, (E, I, D)),
                (p + "moe.up_proj.weight", bf16, (E, I, D)),
                (p + "moe.down_proj.weight", bf16, (E, D, I)),
            ]
        out += [
            (p + "share_expert.gate_proj.weight", bf16, (S, D)),
            (p + "share_expert.up_proj.weight", bf16, (S, D)),
            (p + "share_expert.down_proj.weight", bf16, (D, S)),
        ]
    else:
        F = spec.intermediate_size
        out += [
            (p + "mlp.gate_proj.weight", bf16, (F, D)),
            (p + "mlp.up_proj.weight", bf16, (F, D)),
            (p + "mlp.down_proj.weight", bf16, (D, F)),
        ]
    if L >= spec.num_hidden_layers:  # MTP layer
        out += [
            (p + "enorm.weight", bf16, (D,)),
            (p + "hnorm.weight", bf16, (D,)),
            (p + "eh_proj.weight", bf16, (D, 2 * D)),
            (p + "transformer.shared_head.norm.weight", bf16, (D,)),
            (p + "transformer.shared_head.output.weight", bf16, (spec.vocab_size, D)),
        ]
    return out


def _model_specs(spec: Step3p5Spec, *, native: bool, mtp: bool) -> list[Entry]:
    bf16, V, D = torch.bfloat16, spec.vocab_size, spec.hidden_size
    n_layers = spec.num_hidden_layers + (spec.num_nextn_predict_layers if mtp else 0)
    out: list[Entry] = [("model.embed_tokens.weight", bf16, (V, D))]
    for L in range(n_layers):
        out += _layer_specs(spec, L, native=native)
    out += [("model.norm.weight", bf16, (D,)), ("lm_head.weight", bf16, (V, D))]
    return out


def hf_tensor_specs(spec: Step3p5Spec, *, mtp: bool = True) -> list[Entry]:
    """Every HF key with dtype and shape, in file order (embed, layers, MTP layers, norm, head).

    ``mtp=False`` leaves out the MTP layers, giving the keys of the main model.

    Example:
        >>> specs = dict((k, (d, s)) for k, d, s in hf_tensor_specs(Step3p5Spec.flash()))
        >>> specs["model.layers.3.moe.down_proj.weight"]
        (torch.bfloat16, (288, 4096, 1280))
        >>> specs["model.layers.1.self_attn.q_proj.weight"][1]  # sliding layer: 96 heads
        (12288, 4096)
    """
    return _model_specs(spec, native=False, mtp=mtp)


def native_tensor_specs(spec: Step3p5Spec) -> list[Entry]:
    """The native (grouped-experts) state dict of the main model: no MTP layers.

    MoE layers hold ``moe.experts.gate_and_up_projs`` [E, D, 2I], ``moe.experts.down_projs``
    [E, I, D], ``moe.gate.weight`` and the fp32 ``moe.gate.e_score_correction_bias``; every other
    key is the HF key unchanged.

    Example:
        >>> specs = {k: s for k, _, s in native_tensor_specs(Step3p5Spec.tiny())}
        >>> specs["model.layers.1.moe.experts.gate_and_up_projs"]
        (8, 32, 32)
    """
    return _model_specs(spec, native=True, mtp=False)


def checkpoint_nbytes(spec: Step3p5Spec) -> int:
    """Bytes of tensor data in the HF checkpoint (the index's ``total_size``)."""
    return sum(d.itemsize * math.prod(s) for _, d, s in hf_tensor_specs(spec))


def native_state_dict(hf: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The native layout of Step3p5 HF tensors (:mod:`lazysd.adapters.step3p5`), converted eagerly with torch ops.

    The reference conversion tests compare with: layers ``>= num_layers`` (MTP) are left out,
    each MoE layer's ``gate_and_up_projs`` is ``cat([gate.transpose(1, 2), up.transpose(1, 2)],
    -1)``, ``down_projs`` is ``down.transpose(1, 2)`` (a view) and ``router_bias`` becomes
    ``gate.e_score_correction_bias``; every other key is kept as it is. Keys may carry any
    prefix before ``layers.N.`` (Step-3.7's ``model.language_model.``).

    Example:
        >>> import tempfile
        >>> from lazysd.testing import load_hf_tensors, make_checkpoint
        >>> spec = Step3p5Spec.tiny()
        >>> hf = load_hf_tensors(make_checkpoint(tempfile.mkdtemp(), spec, layout="single"))
        >>> native_state_dict(hf, spec.num_hidden_layers).keys() == {k for k, _, _ in native_tensor_specs(spec)}
        True
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= num_layers:
            continue
        if key.endswith("moe.gate_proj.weight"):
            p = key.removesuffix("gate_proj.weight")
            out[p + "experts.gate_and_up_projs"] = torch.cat(
                [t.transpose(1, 2), hf[p + "up_proj.weight"].transpose(1, 2)], dim=-1
            )
        elif key.endswith("moe.down_proj.weight"):
            out[key.removesuffix("down_proj.weight") + "experts.down_projs"] = t.transpose(1, 2)
        elif key.endswith("moe.router_bias"):
            out[key.removesuffix("router_bias") + "gate.e_score_correction_bias"] = t
        elif not key.endswith("moe.up_proj.weight"):
            out[key] = t
    return out
