"""Synthetic Step3p5 checkpoints with the real key names, orientations and dtypes.

Writes a ``config.json`` plus safetensors weights in the Hugging Face layout of Step-3.5-Flash
(documented in :mod:`lazysd.adapters.step3p5`): grouped experts ``moe.{gate,up}_proj.weight`` [E, I, D] and
``moe.down_proj.weight`` [E, D, I], an fp32 ``moe.router_bias``, zero-centred norms, MTP layers
after the main ones. Tensors are generated and written one slice at a time, so a checkpoint of
any size needs only a few tens of MB of memory, and ``sparse=True`` writes headers only.

Shape legend: E experts, D hidden, I expert intermediate, S shared-expert intermediate,
V vocabulary, nh query heads of the layer, hd head dim.

Example:
    >>> import tempfile
    >>> spec = Step3p5Spec.tiny()
    >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
    >>> ckpt = make_checkpoint(tmp.name, spec, layout="split")
    >>> tensors = load_hf_tensors(ckpt)
    >>> tensors["model.layers.1.moe.gate_proj.weight"].shape
    torch.Size([8, 16, 32])
    >>> tensors["model.layers.1.moe.router_bias"].dtype
    torch.float32
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from lazysd.writer import SafetensorsWriter

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "Step3p5Spec",
    "checkpoint_nbytes",
    "config_dict",
    "ensure_checkpoint",
    "hf_tensor_specs",
    "load_hf_tensors",
    "make_checkpoint",
    "native_state_dict",
    "native_tensor_specs",
]

Entry = tuple[str, torch.dtype, tuple[int, ...]]
Layout = Literal["single", "sharded", "split"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Generation works on slices of about this many elements (32 MiB of bf16), so memory stays flat
# however large a tensor is, and each slice goes straight to disk via a byte_offset write.
_CHUNK_ELEMS = 1 << 24
# Hugging Face's default max shard size; shards smaller than this are used for tiny checkpoints.
_MAX_DEFAULT_SHARD_BYTES = 5 * 10**9


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
            sliding_num_attention_heads=field("attention_other_setting.num_attention_heads", field("num_attention_heads")),
            head_dim=field("head_dim"),
            vocab_size=field("vocab_size"),
            sliding_window=field("sliding_window"),
            rms_norm_eps=field("rms_norm_eps", 1e-5),
            moe_router_scaling_factor=field("moe_router_scaling_factor", 1.0),
        )
        types = config.get("layer_types")
        if isinstance(types, list):
            expected = ["full_attention" if spec.is_full_attention(L) else "sliding_attention" for L in range(len(types))]
            if types != expected:
                raise ConfigError(f"{where}: layer_types differ from the reference model's full attention every 4th layer")
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


def _plan_shards(entries: list[Entry], layout: Layout, shard_bytes: int) -> list[list[Entry]]:
    """Pack entries in order into shards of at most ``shard_bytes`` (a bigger tensor sits alone).

    ``split`` also starts a new shard at every MoE ``up_proj`` and ``down_proj``, so a layer's
    gate, up and down tensors are in three different files.
    """
    if layout == "single":
        return [entries]
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        key, dtype, shape = entry
        nbytes = dtype.itemsize * math.prod(shape)
        forced = layout == "split" and key.endswith(("moe.up_proj.weight", "moe.down_proj.weight"))
        if shards[-1] and (forced or size + nbytes > shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _random_bf16(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` bf16 values with random sign and mantissa and magnitude in [2**-7, 2**-4).

    Drawing 64 random bits per 4 values and fixing the exponent bits is ~2.5x faster than
    ``normal_`` on bf16, which matters for multi-GB benchmark checkpoints; std is ~0.034.
    """
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=generator)
    bits16 = bits.view(torch.int16)[:n]
    # Keep the sign, the two lowest exponent bits and the 7 mantissa bits; fix the rest of the
    # exponent so every value is finite and small (biased exponent 120..123).
    bits16.bitwise_and_(0x817F - 0x10000).bitwise_or_(0x3C00)
    return bits16.view(torch.bfloat16)


def _random_chunk(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return _random_bf16(n, generator)
    # fp32 here is the router bias: keep it small so it nudges routing rather than decides it.
    return torch.empty(n, dtype=torch.float32).normal_(0.0, 1e-3, generator=generator).to(dtype)


def _fill(writer: SafetensorsWriter, entry: Entry, generator: torch.Generator) -> None:
    key, dtype, shape = entry
    if math.prod(shape) == 0 or not shape:
        n = math.prod(shape)
        writer.write(key, _random_chunk(n, dtype, generator).reshape(shape))
        return
    row = math.prod(shape[1:])
    rows_per_chunk = max(1, _CHUNK_ELEMS // max(row, 1))
    for start in range(0, shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape[0] - start)
        chunk = _random_chunk(rows * row, dtype, generator).reshape(rows, *shape[1:])
        writer.write(key, chunk, byte_offset=start * row * dtype.itemsize)


def make_checkpoint(
    path: str | os.PathLike[str],
    spec: Step3p5Spec,
    *,
    layout: Layout = "sharded",
    shard_bytes: int | None = None,
    seed: int = 0,
    sparse: bool = False,
) -> Path:
    """Write a synthetic HF Step3p5 checkpoint (config.json + safetensors) into ``path``.

    Args:
        path: directory to create or fill; it must not hold safetensors weights yet.
        spec: model sizes.
        layout: ``"single"`` writes ``model.safetensors``; ``"sharded"`` packs tensors in order
            into ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``;
            ``"split"`` is sharded with each MoE layer's gate, up and down tensors in three
            different files.
        shard_bytes: shard size limit; default: a quarter of the checkpoint (so small test
            checkpoints still have several shards), at most 5 GB.
        seed: values come from ``torch.Generator().manual_seed(seed)``, drawn in key order, so
            they are the same for every layout and shard size.
        sparse: write headers only; data is file holes (reads as zeros, costs no disk), e.g.
            for the ~400 GB Flash key space in under a second.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
        >>> ckpt = make_checkpoint(tmp.name, Step3p5Spec.flash(), sparse=True)
        >>> len(list(ckpt.glob("model-*.safetensors")))
        128
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.glob("*.safetensors")) or (path / INDEX_NAME).exists():
        raise FileExistsError(f"{path} already holds safetensors weights; use an empty directory")
    if layout not in ("single", "sharded", "split"):
        raise ValueError(f"layout must be 'single', 'sharded' or 'split', got {layout!r}")
    entries = hf_tensor_specs(spec)
    total = sum(d.itemsize * math.prod(s) for _, d, s in entries)
    if shard_bytes is None:
        shard_bytes = min(_MAX_DEFAULT_SHARD_BYTES, max(1, math.ceil(total / 4)))
    (path / "config.json").write_text(json.dumps(config_dict(spec), indent=2) + "\n")

    shards = _plan_shards(entries, layout, shard_bytes)
    if layout == "single":
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        with SafetensorsWriter(path / name, shard, metadata={"format": "pt"}, sparse=sparse) as writer:
            for entry in shard:
                if not sparse:
                    _fill(writer, entry, generator)
                weight_map[entry[0]] = name
    if layout != "single":
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_hf_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Eagerly read every tensor of a checkpoint directory (or one file) with ``safetensors``.

    The reference reader for tests: it follows ``model.safetensors.index.json`` when present,
    else reads every ``*.safetensors`` file in the directory.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / INDEX_NAME).exists():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(load_file(file))
    return out



def ensure_checkpoint(
    path: str | os.PathLike[str], spec: Step3p5Spec, *, layout: Layout = "sharded", verbose: bool = False
) -> Path:
    """A sharded checkpoint at ``path``, generated only if it is not complete there already.

    The index is written last, so a directory holding it is reused as it is; anything else
    (nothing, or what an interrupted run left) is removed and generated anew. ``verbose``
    reports a generation on stderr.
    """
    path = Path(path)
    if layout == "single":
        raise ValueError("ensure_checkpoint needs an index to tell a complete checkpoint: use 'sharded' or 'split'")
    if (path / INDEX_NAME).exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    make_checkpoint(path, spec, layout=layout)
    if verbose:
        print(f"generated {path} ({checkpoint_nbytes(spec) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path


def native_state_dict(hf: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The native layout of Step3p5 HF tensors (:mod:`lazysd.adapters.step3p5`), converted eagerly with torch ops.

    The reference conversion tests compare with: layers ``>= num_layers`` (MTP) are left out,
    each MoE layer's ``gate_and_up_projs`` is ``cat([gate.transpose(1, 2), up.transpose(1, 2)],
    -1)``, ``down_projs`` is ``down.transpose(1, 2)`` (a view) and ``router_bias`` becomes
    ``gate.e_score_correction_bias``; every other key is kept as it is. Keys may carry any
    prefix before ``layers.N.`` (Step-3.7's ``model.language_model.``).

    Example:
        >>> import tempfile
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
            out[p + "experts.gate_and_up_projs"] = torch.cat([t.transpose(1, 2), hf[p + "up_proj.weight"].transpose(1, 2)], dim=-1)
        elif key.endswith("moe.down_proj.weight"):
            out[key.removesuffix("down_proj.weight") + "experts.down_projs"] = t.transpose(1, 2)
        elif key.endswith("moe.router_bias"):
            out[key.removesuffix("router_bias") + "gate.e_score_correction_bias"] = t
        elif not key.endswith("moe.up_proj.weight"):
            out[key] = t
    return out
