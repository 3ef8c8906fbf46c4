"""Synthetic checkpoints for every registered family, an eager reference conversion, and
reference MoE layers in the HF and the native layout.

Each checkpoint has the family's real key names, orientations and dtypes (see the adapter
files in :mod:`lazysd.adapters` for the public sources): a dense/MoE layer mix where the
family has one, shared experts and fp32 router correction biases where it has them, an MTP
layer for DeepSeek-V3 and GLM-4.5, a vision tower for Step-3.7, and, with ``fp8=True``,
DeepSeek-V3's FP8 weights with ``weight_scale_inv`` 128 x 128 block scales (sizes chosen so
that edge blocks are ragged). Tensors go into two shards plus an index.

:func:`eager_native` is the straightforward conversion (whole tensors, loops, regexes) that
tests compare a :class:`~lazysd.VirtualStateDict` with; :func:`hf_moe` and
:func:`native_moe` compute one MoE layer from either layout: per-expert ``F.linear`` on HF
tensors, ``x @ W[e]`` and ``chunk(2, -1)`` on native ones.

Shape legend: E experts, D hidden, I expert intermediate, F dense intermediate, S shared
expert intermediate, V vocabulary.

Example:
    >>> import tempfile
    >>> spec = FamilySpec.tiny("mixtral")
    >>> path = make_family_checkpoint(tempfile.mkdtemp(), spec)
    >>> sorted(p.name for p in path.iterdir())[:2]
    ['config.json', 'model-00001-of-00002.safetensors']
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lazysd.testing.step3p5 import Step3p5Spec, native_state_dict
from lazysd.testing.step3p5 import config_dict as step3p5_config
from lazysd.testing.step3p5 import hf_tensor_specs as step3p5_specs
from lazysd.writer import save_file

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "ParamTree",
    "config_dict",
    "dequantize_reference",
    "eager_native",
    "hf_moe",
    "hf_tensor_specs",
    "make_family_checkpoint",
    "native_moe",
]

FAMILIES = ("deepseek_v3", "qwen3_moe", "glm4_moe", "mixtral", "gpt_oss", "step3p7")
Spec = tuple[str, torch.dtype, tuple[int, ...]]
BLOCK = 128
_PER_EXPERT = re.compile(
    r"^(.*)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """Sizes of a tiny model of ``family``; ``fp8`` only for ``deepseek_v3``.

    Example:
        >>> FamilySpec.tiny("deepseek_v3", fp8=True).hidden_size  # > 128: ragged FP8 blocks
        160
    """

    family: str
    num_hidden_layers: int = 3
    first_dense: int = 1  # leading dense layers (families that have them)
    num_experts: int = 4
    top_k: int = 2
    hidden_size: int = 32
    moe_intermediate_size: int = 16
    intermediate_size: int = 48  # dense layers (Mixtral/GPT-OSS: the experts' width)
    shared_intermediate_size: int = 16
    vocab_size: int = 64
    heads: int = 2
    head_dim: int = 8
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.fp8 and self.family != "deepseek_v3":
            raise ValueError("fp8=True is the DeepSeek-V3 release format; other families have no FP8 generator")

    @classmethod
    def tiny(cls, family: str, *, fp8: bool = False) -> FamilySpec:
        if fp8:  # 160 = 128 + 32 and 80 < 128: every FP8 weight has ragged edge blocks
            return cls(
                family=family,
                fp8=True,
                hidden_size=160,
                moe_intermediate_size=80,
                intermediate_size=144,
                shared_intermediate_size=80,
            )
        return cls(family=family)

    @classmethod
    def sized(
        cls, family: str, total_bytes: int, *, hidden_size: int = 1024, num_experts: int = 64, width: int = 512
    ) -> FamilySpec:
        """A bf16 model of ``family`` of roughly ``total_bytes``, for benchmarks: hidden size
        1024, 64 experts a layer of width 512 (2048 for Mixtral and GPT-OSS, whose experts
        are as wide as a dense MLP), every layer MoE, as many layers as it takes. Experts
        are per-expert tensors where the family's release has them (DeepSeek-V3, Qwen3-MoE,
        GLM-4.5, Mixtral): a load stacks hundreds of sources into each native tensor.
        ``hidden_size``, ``num_experts`` and ``width`` (the experts'; Mixtral's and GPT-OSS's
        are 4x it) give a release's own layer sizes: Qwen3-30B-A3B's are 2048, 128 and 768
        (layers of 1.2 GB).

        Example:
            >>> spec = FamilySpec.sized("qwen3_moe", 10**9)
            >>> spec.num_hidden_layers, spec.num_experts
            (4, 64)
        """
        if family == "step3p7":
            raise ValueError("step3p7's text model is Step3p5's: use Step3p5Spec.sized")
        base = cls(
            family=family,
            num_hidden_layers=1,
            first_dense=0,
            num_experts=num_experts,
            top_k=8,
            hidden_size=hidden_size,
            moe_intermediate_size=width,
            intermediate_size=4 * width,
            shared_intermediate_size=512,
            vocab_size=32768,
            heads=8,
            head_dim=128,
        )

        def nbytes(spec: FamilySpec) -> int:
            return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in hf_tensor_specs(spec))

        one, two = nbytes(base), nbytes(replace(base, num_hidden_layers=2))
        return replace(base, num_hidden_layers=max(1, 1 + round((total_bytes - one) / (two - one))))

    @property
    def expert_width(self) -> int:
        return self.intermediate_size if self.family in ("mixtral", "gpt_oss") else self.moe_intermediate_size

    @property
    def has_mtp(self) -> bool:
        return self.family in ("deepseek_v3", "glm4_moe")

    def is_moe(self, layer: int) -> bool:
        return self.family in ("mixtral", "gpt_oss") or layer >= self.first_dense


def _step_spec(spec: FamilySpec) -> Step3p5Spec:
    return Step3p5Spec.tiny(num_hidden_layers=spec.num_hidden_layers, moe_num_experts=spec.num_experts)


def config_dict(spec: FamilySpec) -> dict[str, object]:
    """config.json of the family with its real field names."""
    if spec.family == "step3p7":  # Step3p5 text config nested under text_config
        return {
            "model_type": "step3p7",
            "architectures": ["Step3p7ForConditionalGeneration"],
            "text_config": step3p5_config(_step_spec(spec)),
            "vision_config": {"width": 8, "layers": 1},
            "projector_bias": False,
        }
    base: dict[str, object] = {
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "torch_dtype": "bfloat16",
    }
    return base | _CONFIGS[spec.family](spec)


def _deepseek_v3_config(spec: FamilySpec) -> dict[str, object]:
    E = spec.num_experts
    config: dict[str, object] = {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "n_routed_experts": E,
        "num_experts_per_tok": spec.top_k,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "intermediate_size": spec.intermediate_size,
        "n_shared_experts": 1,
        "first_k_dense_replace": spec.first_dense,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
        "num_attention_heads": spec.heads,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
    }
    if spec.fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
        }
    return config


def _qwen3_moe_config(spec: FamilySpec) -> dict[str, object]:
    E = spec.num_experts
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts": E,
        "num_experts_per_tok": spec.top_k,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "intermediate_size": spec.intermediate_size,
        "mlp_only_layers": list(range(spec.first_dense)),
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": 1,
        "head_dim": spec.head_dim,
    }


def _glm4_moe_config(spec: FamilySpec) -> dict[str, object]:
    E = spec.num_experts
    return {
        "model_type": "glm4_moe",
        "architectures": ["Glm4MoeForCausalLM"],
        "n_routed_experts": E,
        "num_experts_per_tok": spec.top_k,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "intermediate_size": spec.intermediate_size,
        "n_shared_experts": 1,
        "first_k_dense_replace": spec.first_dense,
        "num_nextn_predict_layers": 1,
        "attention_bias": True,
        "use_qk_norm": False,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": 1,
        "head_dim": spec.head_dim,
        "norm_topk_prob": True,
    }


def _mixtral_config(spec: FamilySpec) -> dict[str, object]:
    E = spec.num_experts
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "num_local_experts": E,
        "num_experts_per_tok": spec.top_k,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": 1,
    }


def _gpt_oss_config(spec: FamilySpec) -> dict[str, object]:
    E = spec.num_experts
    return {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "num_local_experts": E,
        "num_experts_per_tok": spec.top_k,
        "experts_per_token": spec.top_k,
        "intermediate_size": spec.intermediate_size,
        "swiglu_limit": 7.0,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": 1,
        "head_dim": spec.head_dim,
    }


_CONFIGS = {
    "deepseek_v3": _deepseek_v3_config,
    "qwen3_moe": _qwen3_moe_config,
    "glm4_moe": _glm4_moe_config,
    "mixtral": _mixtral_config,
    "gpt_oss": _gpt_oss_config,
}


def _attention(spec: FamilySpec, p: str) -> list[Spec]:
    bf, D, h, hd = torch.bfloat16, spec.hidden_size, spec.heads, spec.head_dim
    if spec.family == "deepseek_v3":
        return [
            (p + "self_attn.q_a_proj.weight", bf, (16, D)),
            (p + "self_attn.q_a_layernorm.weight", bf, (16,)),
            (p + "self_attn.q_b_proj.weight", bf, (h * 12, 16)),
            (p + "self_attn.kv_a_proj_with_mqa.weight", bf, (16 + 4, D)),
            (p + "self_attn.kv_a_layernorm.weight", bf, (16,)),
            (p + "self_attn.kv_b_proj.weight", bf, (h * 16, 16)),
            (p + "self_attn.o_proj.weight", bf, (D, h * 8)),
        ]
    out = [
        (p + "self_attn.q_proj.weight", bf, (h * hd, D)),
        (p + "self_attn.k_proj.weight", bf, (hd, D)),
        (p + "self_attn.v_proj.weight", bf, (hd, D)),
    ]
    if spec.family in ("glm4_moe", "gpt_oss"):
        out += [
            (p + "self_attn.q_proj.bias", bf, (h * hd,)),
            (p + "self_attn.k_proj.bias", bf, (hd,)),
            (p + "self_attn.v_proj.bias", bf, (hd,)),
        ]
    out.append((p + "self_attn.o_proj.weight", bf, (D, h * hd)))
    if spec.family == "gpt_oss":
        out += [(p + "self_attn.o_proj.bias", bf, (D,)), (p + "self_attn.sinks", bf, (h,))]
    if spec.family == "qwen3_moe":
        out += [(p + "self_attn.q_norm.weight", bf, (hd,)), (p + "self_attn.k_norm.weight", bf, (hd,))]
    return out


def _mlp(spec: FamilySpec, p: str, layer: int) -> list[Spec]:
    bf, D, E, I, S, Fd = (
        torch.bfloat16,
        spec.hidden_size,
        spec.num_experts,
        spec.expert_width,
        spec.shared_intermediate_size,
        spec.intermediate_size,
    )
    f = spec.family
    if not spec.is_moe(layer):
        return [
            (p + "mlp.gate_proj.weight", bf, (Fd, D)),
            (p + "mlp.up_proj.weight", bf, (Fd, D)),
            (p + "mlp.down_proj.weight", bf, (D, Fd)),
        ]
    if f == "gpt_oss":
        return [
            (p + "mlp.router.weight", bf, (E, D)),
            (p + "mlp.router.bias", bf, (E,)),
            (p + "mlp.experts.gate_up_proj", bf, (E, D, 2 * I)),
            (p + "mlp.experts.gate_up_proj_bias", bf, (E, 2 * I)),
            (p + "mlp.experts.down_proj", bf, (E, I, D)),
            (p + "mlp.experts.down_proj_bias", bf, (E, D)),
        ]
    moe, names = (
        ("block_sparse_moe", ("w1", "w3", "w2")) if f == "mixtral" else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    )
    out = [(p + moe + ".gate.weight", bf, (E, D))]
    if f in ("deepseek_v3", "glm4_moe"):
        out.append((p + moe + ".gate.e_score_correction_bias", torch.float32, (E,)))
    for e in range(E):
        q = f"{p}{moe}.experts.{e}."
        out += [
            (q + names[0] + ".weight", bf, (I, D)),
            (q + names[1] + ".weight", bf, (I, D)),
            (q + names[2] + ".weight", bf, (D, I)),
        ]
    if f in ("deepseek_v3", "glm4_moe"):
        q = p + "mlp.shared_experts."
        out += [
            (q + "gate_proj.weight", bf, (S, D)),
            (q + "up_proj.weight", bf, (S, D)),
            (q + "down_proj.weight", bf, (D, S)),
        ]
    return out


def hf_tensor_specs(spec: FamilySpec) -> list[Spec]:
    """Every HF key with dtype and shape, in file order (before FP8 quantization)."""
    if spec.family == "step3p7":
        out = [
            (k if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model."), d, s)
            for k, d, s in step3p5_specs(_step_spec(spec))
        ]
        bf = torch.bfloat16
        return out + [
            ("model.vision_model.conv1.weight", bf, (8, 3, 2, 2)),
            ("model.vision_model.transformer.resblocks.0.attn.in_proj_weight", bf, (24, 8)),
            ("model.vision_model.transformer.resblocks.0.mlp.c_fc.weight", bf, (16, 8)),
            ("model.vit_large_projector.weight", bf, (spec.hidden_size, 32)),
        ]
    bf, D, V = torch.bfloat16, spec.hidden_size, spec.vocab_size
    out: list[Spec] = [("model.embed_tokens.weight", bf, (V, D))]
    layers = spec.num_hidden_layers + (1 if spec.has_mtp else 0)
    for L in range(layers):
        p = f"model.layers.{L}."
        out += [
            (p + "input_layernorm.weight", bf, (D,)),
            *_attention(spec, p),
            (p + "post_attention_layernorm.weight", bf, (D,)),
            *_mlp(spec, p, L),
        ]
        if L >= spec.num_hidden_layers:  # MTP layer
            out += [
                (p + "embed_tokens.weight", bf, (V, D)),
                (p + "enorm.weight", bf, (D,)),
                (p + "hnorm.weight", bf, (D,)),
                (p + "eh_proj.weight", bf, (D, 2 * D)),
                (p + "shared_head.norm.weight", bf, (D,)),
                (p + "shared_head.head.weight", bf, (V, D)),
            ]
    return out + [("model.norm.weight", bf, (D,)), ("lm_head.weight", bf, (V, D))]


def _quantized(key: str) -> bool:
    """DeepSeek-V3's FP8 release quantizes the linear layers, not norms, embeddings, head, router."""
    return key.endswith("_proj.weight") or key.endswith("kv_a_proj_with_mqa.weight")


def make_family_checkpoint(path: str | os.PathLike[str], spec: FamilySpec, *, seed: int = 0) -> Path:
    """Write config.json and two safetensors shards (plus index) of ``spec``'s family."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_dict(spec), indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, dtype, shape in hf_tensor_specs(spec):
        t = torch.randn(shape, generator=g) * (1e-3 if dtype == torch.float32 else 0.1)
        if spec.fp8 and _quantized(key):
            scale = torch.rand(-(-shape[0] // BLOCK), -(-shape[1] // BLOCK), generator=g) * 0.01 + 0.005
            tensors[key] = (t / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[key + "_scale_inv"] = scale
        else:
            tensors[key] = t.to(dtype)
    keys = list(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return path


def dequantize_reference(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``weight`` (FP8) times its inverse block scales, block by block, in fp32."""
    out = weight.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= scale_inv[i, j]
    return out


def eager_native(
    spec: FamilySpec, hf: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The native state dict of the main model (no MTP layers), converted eagerly and plainly."""
    if spec.family == "step3p7":  # Step3p5's grouped layout under model.language_model.
        return native_state_dict(hf, spec.num_hidden_layers)
    hf = dict(hf)
    for key in [k for k in hf if k + "_scale_inv" in hf]:
        hf[key] = dequantize_reference(hf[key], hf.pop(key + "_scale_inv")).to(dtype)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, t in hf.items():
        m = re.match(r"^model\.layers\.(\d+)\.", key)
        if m and int(m.group(1)) >= spec.num_hidden_layers:
            continue  # MTP layer
        pe = _PER_EXPERT.match(key)
        if pe:
            experts.setdefault(pe.group(1), {}).setdefault(_ROLE[pe.group(4)], {})[int(pe.group(3))] = t
            continue
        if spec.family == "mixtral":
            key = key.replace(".block_sparse_moe.gate.weight", ".mlp.gate.weight")
        if spec.family == "gpt_oss":
            key = key.replace(".mlp.router.", ".mlp.gate.")
            key = re.sub(
                r"\.mlp\.experts\.(gate_up_proj|down_proj)$",
                lambda m: (
                    ".mlp.experts." + {"gate_up_proj": "gate_and_up_projs", "down_proj": "down_projs"}[m.group(1)]
                ),
                key,
            )
        out[key] = t
    for prefix, roles in experts.items():
        E = len(roles["gate"])
        out[prefix + ".mlp.experts.gate_and_up_projs"] = torch.stack(
            [torch.cat([roles["gate"][e].T, roles["up"][e].T], dim=-1) for e in range(E)]
        )
        out[prefix + ".mlp.experts.down_projs"] = torch.stack([roles["down"][e].T for e in range(E)])
    return out


class ParamTree(nn.Module):
    """A module whose ``state_dict()`` has exactly the given keys, shapes and dtypes.

    Stands in for a native model in strict ``load_state_dict`` tests.

    Example:
        >>> m = ParamTree({"a.b.weight": ((2, 3), torch.bfloat16)})
        >>> list(m.state_dict()), m.a.b.weight.shape
        (['a.b.weight'], torch.Size([2, 3]))
    """

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        for key, (shape, dtype) in specs.items():
            *path, leaf = key.split(".")
            mod: nn.Module = self
            for name in path:
                if not hasattr(mod, name):
                    mod.add_module(name, nn.Module())
                mod = getattr(mod, name)
            mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))


# ---- reference MoE layers ----------------------------------------------------------------


def _route(
    spec: FamilySpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (weights [N, k], expert ids [N, k]) with the family's router."""
    logits = F.linear(x.float(), weight.float())
    if spec.family in ("deepseek_v3", "glm4_moe", "step3p7"):  # sigmoid scores, bias picks experts only
        scores = torch.sigmoid(logits)
        ids = (scores + bias.float()).topk(spec.top_k, dim=-1).indices
        w = scores.gather(-1, ids)
        return w / w.sum(-1, keepdim=True), ids
    if spec.family == "gpt_oss":  # softmax over the top-k logits
        top = (logits + bias.float()).topk(spec.top_k, dim=-1)
        return torch.softmax(top.values, dim=-1), top.indices
    top = torch.softmax(logits, dim=-1).topk(spec.top_k, dim=-1)
    return top.values / top.values.sum(-1, keepdim=True), top.indices


def _gpt_oss_glu(gate_up: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # interleaved, as stored
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _combine(
    spec: FamilySpec, x: torch.Tensor, router: tuple[torch.Tensor, torch.Tensor | None], expert
) -> torch.Tensor:  # noqa: ANN001
    w, ids = _route(spec, x, *router)
    out = torch.zeros_like(x)
    for e in range(spec.num_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            out.index_add_(0, tok, expert(e, x[tok]) * w[tok, slot, None].to(x.dtype))
    return out


def _shared(sd: Mapping[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    q = (
        p + "shared_experts."
        if p + "shared_experts.gate_proj.weight" in sd
        else p.removesuffix("moe.") + "share_expert."
    )
    if q + "gate_proj.weight" not in sd:
        return torch.zeros_like(x)
    return F.linear(
        F.silu(F.linear(x, sd[q + "gate_proj.weight"])) * F.linear(x, sd[q + "up_proj.weight"]),
        sd[q + "down_proj.weight"],
    )


def hf_moe(spec: FamilySpec, hf: Mapping[str, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
    """One MoE layer (routed + shared experts) from HF tensors, as the families' HF modeling code
    computes it: ``F.linear`` per expert (GPT-OSS: ``x @ gate_up_proj[e] + bias``, interleaved)."""
    f = spec.family
    if f == "step3p7":
        p = f"model.language_model.layers.{layer}.moe."
        router = (hf[p + "gate.weight"], hf[p + "router_bias"])

        def expert(e: int, t: torch.Tensor) -> torch.Tensor:
            gate, up = F.linear(t, hf[p + "gate_proj.weight"][e]), F.linear(t, hf[p + "up_proj.weight"][e])
            return F.linear(F.silu(gate) * up, hf[p + "down_proj.weight"][e])

        return _combine(spec, x, router, expert) + _shared(hf, p, x)
    if f == "gpt_oss":
        p = f"model.layers.{layer}.mlp."
        router = (hf[p + "router.weight"], hf[p + "router.bias"])

        def expert(e: int, t: torch.Tensor) -> torch.Tensor:
            h = _gpt_oss_glu(t @ hf[p + "experts.gate_up_proj"][e] + hf[p + "experts.gate_up_proj_bias"][e])
            return h @ hf[p + "experts.down_proj"][e] + hf[p + "experts.down_proj_bias"][e]

        return _combine(spec, x, router, expert)
    moe = "block_sparse_moe" if f == "mixtral" else "mlp"
    p = f"model.layers.{layer}.{moe}."
    g, u, d = ("w1", "w3", "w2") if f == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    router = (hf[p + "gate.weight"], hf.get(p + "gate.e_score_correction_bias"))
    ex = p + "experts.{}."

    def expert(e: int, t: torch.Tensor) -> torch.Tensor:
        q = ex.format(e)
        return F.linear(
            F.silu(F.linear(t, hf[q + g + ".weight"])) * F.linear(t, hf[q + u + ".weight"]), hf[q + d + ".weight"]
        )

    return _combine(spec, x, router, expert) + _shared(hf, p, x)


def native_moe(spec: FamilySpec, sd: Mapping[str, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
    """The same layer from native tensors: ``x @ gate_and_up_projs[e]`` then ``chunk(2, -1)``
    (GPT-OSS: interleaved halves, biases and its clamped activation), ``@ down_projs[e]``."""
    f = spec.family
    p = f"model.language_model.layers.{layer}.moe." if f == "step3p7" else f"model.layers.{layer}.mlp."
    router = (sd[p + "gate.weight"], sd.get(p + "gate.e_score_correction_bias", sd.get(p + "gate.bias")))
    gu, dn = sd[p + "experts.gate_and_up_projs"], sd[p + "experts.down_projs"]
    if f == "gpt_oss":

        def expert(e: int, t: torch.Tensor) -> torch.Tensor:
            h = _gpt_oss_glu(t @ gu[e] + sd[p + "experts.gate_up_proj_bias"][e])
            return h @ dn[e] + sd[p + "experts.down_proj_bias"][e]

        return _combine(spec, x, router, expert)

    def expert(e: int, t: torch.Tensor) -> torch.Tensor:
        gate, up = (t @ gu[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ dn[e]

    return _combine(spec, x, router, expert) + _shared(sd, p, x)


def moe_layers(spec: FamilySpec) -> list[int]:
    """Main-model layers with routed experts."""
    if spec.family == "step3p7":
        return list(_step_spec(spec).moe_layers or ())
    return [L for L in range(spec.num_hidden_layers) if spec.is_moe(L)]
