"""Hand-made hostile and broken checkpoints, and a runner that opens them safely.

Each :class:`Case` is a tiny checkpoint directory (``config.json`` plus a few hundred bytes
of safetensors or index) built to break one rule, and the lazysd exception it must raise.
:func:`build_corpus` writes them all (the committed copy lives in ``tests/corpus``);
``python -m tests.support.hostile DIR`` opens every case under ``DIR`` with
:class:`~lazysd.VirtualStateDict`, reads every value, and prints one JSON line per case:
the outcome (``"ok"`` or the exception's class name) and its message. Tests run that
command in a subprocess with a timeout, so a case that crashed or hung the interpreter would
fail the test instead of killing it.

Example:
    >>> import tempfile
    >>> root = build_corpus(tempfile.mkdtemp())
    >>> run_case(root / "header_len_2_60")["outcome"]
    'HeaderError'
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CASES", "Case", "build_corpus", "run_case", "safetensors_bytes"]

CONFIG = {"model_type": "step3p5", "hidden_size": 2}
# Step-3.7: its vision tower rules pass any key under model.vision_model through unchanged.
S37_CONFIG = json.dumps({"model_type": "step3p7", "text_config": {"hidden_size": 2}}).encode()
MODEL = "model.safetensors"
INDEX = "model.safetensors.index.json"
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

_DTYPE_FMT = {"F32": ("f", 4), "BF16": ("H", 2), "I32": ("i", 4)}


def safetensors_bytes(
    header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None
) -> bytes:
    """A safetensors file from a header (a dict, or raw header bytes taken as they are).

    ``length`` overrides the 8-byte header-length prefix (for lying prefixes).

    Example:
        >>> len(safetensors_bytes({}, b""))
        10
    """
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _tensors(*specs: tuple[str, str, list[int]], start: float = 1.0) -> tuple[dict[str, Any], bytes]:
    """Header entries and data for tensors laid back to back, values start, start+1, ..."""
    header: dict[str, Any] = {}
    data = b""
    value = start
    for key, dtype, shape in specs:
        fmt, size = _DTYPE_FMT[dtype]
        n = 1
        for d in shape:
            n *= d
        if dtype == "BF16":
            # bf16 is the top half of an f32.
            chunk = b"".join(struct.pack("<f", value + i)[2:] for i in range(n))
        else:
            chunk = struct.pack(f"<{n}{fmt}", *[type(1.0 if fmt == "f" else 1)(value + i) for i in range(n)])
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n * size]}
        data += chunk
        value += n
    return header, data


def _valid() -> tuple[dict[str, Any], bytes]:
    return _tensors((EMBED, "F32", [2, 2]), (NORM, "F32", [2]))


def _with(key: str, **changes: Any) -> bytes:
    """The valid two-tensor file with fields of one header entry replaced."""
    header, data = _valid()
    header[key] = {**header[key], **changes}
    return safetensors_bytes(header, data)


def _config(**extra: Any) -> bytes:
    return json.dumps({**CONFIG, **extra}).encode()


def _index(weight_map: dict[str, Any] | bytes) -> bytes:
    if isinstance(weight_map, bytes):
        return weight_map
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


@dataclass(frozen=True)
class Case:
    """One corpus checkpoint and what opening it must give.

    Attributes:
        name: directory name under the corpus root.
        about: what is wrong with it, in a few words.
        files: file name -> bytes (``config.json`` is added unless given; ``None`` leaves it out).
        error: expected exception class name (from :mod:`lazysd.errors`), or ``None`` for a
            control case that must load.
        message: substrings the error message must contain (file, key, what is wrong).
    """

    name: str
    about: str
    files: dict[str, bytes | None]
    error: str | None
    message: tuple[str, ...] = ()


def _moe(layers: dict[int, tuple[int, int, str, str]], **config: Any) -> dict[str, bytes | None]:
    """A checkpoint with MoE layers: layer -> (experts of gate, experts of up, gate dtype, up dtype).

    Shapes: gate/up [E, I=2, D=2], down [E, D, I]; every layer also has a layernorm.
    """
    specs: list[tuple[str, str, list[int]]] = []
    for L, (eg, eu, dg, du) in layers.items():
        p = f"model.layers.{L}."
        specs += [
            (p + "input_layernorm.weight", "F32", [2]),
            (p + "moe.gate_proj.weight", dg, [eg, 2, 2]),
            (p + "moe.up_proj.weight", du, [eu, 2, 2]),
            (p + "moe.down_proj.weight", dg, [eg, 2, 2]),
        ]
    header, data = _tensors(*specs)
    return {MODEL: safetensors_bytes(header, data), "config.json": _config(**config)}


def _layers(n: int, **config: Any) -> dict[str, bytes | None]:
    header, data = _tensors(*[(f"model.layers.{L}.input_layernorm.weight", "F32", [2]) for L in range(n)])
    return {MODEL: safetensors_bytes(header, data), "config.json": _config(**config)}


def _cases() -> list[Case]:
    header, data = _valid()
    good = safetensors_bytes(header, data)
    shard1 = safetensors_bytes(*_tensors((EMBED, "F32", [2, 2])))
    shard2 = safetensors_bytes(*_tensors((NORM, "F32", [2])))
    both = {EMBED: "a.safetensors", NORM: "b.safetensors"}
    dup_raw = (
        b'{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    )
    meta_null = json.dumps({"__metadata__": None, **header}, separators=(",", ":")).encode()
    # A pickle that, if anything ever unpickled it, would import a module that does not exist.
    pickle = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x16lazysd_never_unpickled\x94\x8c\x04boom\x94\x93\x94."
    return [
        # ---- control cases: must load, data equal to the header's bytes
        Case("valid_single", "a correct two-tensor model.safetensors", {MODEL: good}, None),
        Case("valid_sharded", "a correct index over two shards", {"a.safetensors": shard1, "b.safetensors": shard2, INDEX: _index(both)}, None),
        Case("valid_metadata_null", "__metadata__: null (the format allows it)", {MODEL: safetensors_bytes(meta_null, data)}, None),
        Case("valid_zero_size", "a tensor with no elements", {MODEL: safetensors_bytes(*_tensors((EMBED, "F32", [0, 2]), (NORM, "F32", [2])))}, None),
        # ---- header framing
        Case("too_short", "a 4-byte file", {MODEL: b"\x01\x00\x00\x00"}, "HeaderError", (MODEL, "too short")),
        Case("empty_file", "a 0-byte file", {MODEL: b""}, "HeaderError", (MODEL, "0 bytes")),
        Case("header_len_2_60", "length prefix 2**60: must fail before allocating", {MODEL: safetensors_bytes(header, data, length=2**60)}, "HeaderError", (MODEL, "exceeds the")),
        Case("header_len_past_end", "length prefix larger than the file (truncated download)", {MODEL: safetensors_bytes(header, data, length=4096)}, "HeaderError", (MODEL, "runs past the end")),
        Case("header_len_zero", "length prefix 0", {MODEL: safetensors_bytes(b"", data)}, "HeaderError", (MODEL, "not valid JSON")),
        Case("truncated_data", "the last tensor's bytes are cut off", {MODEL: safetensors_bytes(header, data[:-4])}, "HeaderError", (MODEL, NORM, "data_offsets")),
        Case("trailing_bytes", "bytes after the last tensor that no tensor claims", {MODEL: safetensors_bytes(header, data + b"\0" * 8)}, "HeaderError", (MODEL, "data section is 32 bytes but the tensors cover 24")),
        # ---- header JSON
        Case("non_utf8", "header bytes that are not UTF-8", {MODEL: safetensors_bytes(b'{"\xff\xfe":1}', b"")}, "HeaderError", (MODEL, "not valid UTF-8")),
        Case("not_json", "header that is not JSON", {MODEL: safetensors_bytes(b"{not json", b"")}, "HeaderError", (MODEL, "not valid JSON")),
        Case("json_array", "header that is a JSON array", {MODEL: safetensors_bytes(b"[]", b"")}, "HeaderError", (MODEL, "must be a JSON object, got list")),
        Case("deep_nesting", "5000 nested arrays (recursion bomb)", {MODEL: safetensors_bytes(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", b"")}, "HeaderError", (MODEL, "nested too deeply")),
        Case("huge_int_literal", "a 5000-digit integer in a shape", {MODEL: safetensors_bytes(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}', b"")}, "HeaderError", (MODEL, "unreadable value")),
        Case("duplicate_key", "the same tensor key twice in one header", {MODEL: safetensors_bytes(dup_raw, data[:8])}, "HeaderError", (MODEL, repr(NORM), "appears twice")),
        # ---- header entries
        Case("unknown_dtype", "dtype F12", {MODEL: _with(NORM, dtype="F12")}, "HeaderError", (MODEL, repr(NORM), "unknown dtype 'F12'")),
        Case("dtype_not_string", "dtype given as a number", {MODEL: _with(NORM, dtype=4)}, "HeaderError", (MODEL, repr(NORM), "unknown dtype 4")),
        Case("negative_shape", "shape [-2]", {MODEL: _with(NORM, shape=[-2])}, "HeaderError", (MODEL, repr(NORM), "shape must be a list of non-negative integers")),
        Case("float_shape", "shape [2.0]", {MODEL: _with(NORM, shape=[2.0])}, "HeaderError", (MODEL, repr(NORM), "shape must be")),
        Case("bool_shape", "shape [true, true]", {MODEL: _with(NORM, shape=[True, True])}, "HeaderError", (MODEL, repr(NORM), "shape must be")),
        Case("shape_not_list", "shape given as a number", {MODEL: _with(NORM, shape=2)}, "HeaderError", (MODEL, repr(NORM), "shape must be")),
        Case("huge_dim", "shape [0, 2**64] (zero elements, dimension beyond int64)", {MODEL: _with(NORM, shape=[0, 2**64], data_offsets=[16, 16])}, "HeaderError", (MODEL, repr(NORM), "shape must be")),
        Case("offsets_past_end", "data_offsets ending after the file", {MODEL: _with(NORM, data_offsets=[16, 1 << 40])}, "HeaderError", (MODEL, repr(NORM), "not a [begin, end] range")),
        Case("offsets_reversed", "data_offsets [24, 16]", {MODEL: _with(NORM, data_offsets=[24, 16])}, "HeaderError", (MODEL, repr(NORM), "not a [begin, end] range")),
        Case("offsets_negative", "data_offsets [-8, 0]", {MODEL: _with(NORM, data_offsets=[-8, 0])}, "HeaderError", (MODEL, repr(NORM), "not a [begin, end] range")),
        Case("offsets_float", "data_offsets [16.0, 24.0]", {MODEL: _with(NORM, data_offsets=[16.0, 24.0])}, "HeaderError", (MODEL, repr(NORM), "not a [begin, end] range")),
        Case("offsets_three", "data_offsets with three numbers", {MODEL: _with(NORM, data_offsets=[16, 20, 24])}, "HeaderError", (MODEL, repr(NORM), "not a [begin, end] range")),
        Case("size_mismatch", "F32 x [2] claiming 4 bytes", {MODEL: _with(NORM, data_offsets=[16, 20])}, "HeaderError", (MODEL, repr(NORM), "span 4 bytes but F32 x [2] needs 8")),
        Case("dtype_size_mismatch", "BF16 x [2] over an 8-byte range", {MODEL: _with(NORM, dtype="BF16")}, "HeaderError", (MODEL, repr(NORM), "needs 4")),
        Case("overlap", "two tensors sharing bytes", {MODEL: _with(NORM, shape=[4], data_offsets=[8, 24])}, "HeaderError", (MODEL, "overlaps tensor")),
        Case("gap", "bytes between two tensors that no tensor claims", {MODEL: safetensors_bytes({**header, NORM: {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}}, data)}, "HeaderError", (MODEL, repr(NORM), "4 unclaimed bytes")),
        Case("entry_extra_field", "an entry with an extra field", {MODEL: _with(NORM, extra=1)}, "HeaderError", (MODEL, repr(NORM), "exactly 'dtype', 'shape' and 'data_offsets'")),
        Case("entry_not_object", "an entry that is a string", {MODEL: safetensors_bytes({**header, NORM: "x"}, data)}, "HeaderError", (MODEL, repr(NORM), "entry must be an object")),
        Case("metadata_non_string", "__metadata__ value that is a number", {MODEL: safetensors_bytes({"__metadata__": {"format": 1}, **header}, data)}, "HeaderError", (MODEL, "'__metadata__'", "value of 'format' must be a string")),
        Case("metadata_list", "__metadata__ that is a list", {MODEL: safetensors_bytes({"__metadata__": [], **header}, data)}, "HeaderError", (MODEL, "'__metadata__'", "got list")),
        # ---- index and directory
        Case("index_dotdot", "index naming ../outside.safetensors", {"a.safetensors": shard1, INDEX: _index({EMBED: "a.safetensors", NORM: "../outside.safetensors"})}, "UnsafePathError", (INDEX, repr(NORM), "'../outside.safetensors'", "outside the checkpoint directory")),
        Case("index_absolute", "index naming /etc/passwd", {"a.safetensors": shard1, INDEX: _index({EMBED: "a.safetensors", NORM: "/etc/passwd"})}, "UnsafePathError", (INDEX, repr(NORM), "'/etc/passwd'", "outside the checkpoint directory")),
        Case("index_value_not_string", "weight_map values that are not strings", {"a.safetensors": shard1, INDEX: _index({EMBED: 3, NORM: ["b.safetensors"]})}, "CheckpointIndexError", (INDEX, EMBED, NORM, "must be file names")),
        Case("index_key_twice", "weight_map listing one key twice, for two files", {"a.safetensors": shard1, "b.safetensors": shard2, INDEX: b'{"weight_map":{"model.norm.weight":"a.safetensors","model.embed_tokens.weight":"a.safetensors","model.norm.weight":"b.safetensors"}}'}, "CheckpointIndexError", (INDEX, NORM, "a.safetensors", "b.safetensors", "more than once")),
        Case("key_in_two_files", "one key stored in two shards", {"a.safetensors": safetensors_bytes(*_tensors((EMBED, "F32", [2, 2]), (NORM, "F32", [2]))), "b.safetensors": shard2, INDEX: _index(both)}, "CheckpointIndexError", (NORM, "a.safetensors", "b.safetensors", "more than one file")),
        Case("index_key_not_in_file", "index naming a key its file lacks", {"a.safetensors": shard1, "b.safetensors": shard2, INDEX: _index({**both, HEAD: "b.safetensors"})}, "CheckpointIndexError", (INDEX, HEAD, "b.safetensors, which lacks it")),
        Case("index_unlisted_key", "a shard holding a key the index does not list", {"a.safetensors": good, INDEX: _index({EMBED: "a.safetensors"})}, "CheckpointIndexError", (INDEX, NORM, "in a.safetensors but not in the index")),
        Case("index_missing_file", "index naming a shard that does not exist", {"a.safetensors": shard1, INDEX: _index(both)}, "CheckpointNotFoundError", (INDEX, "b.safetensors", NORM, "do not exist")),
        Case("index_empty_weight_map", "index whose weight_map is {}", {"a.safetensors": shard1, INDEX: _index({})}, "CheckpointIndexError", (INDEX, "weight_map is empty")),
        Case("index_drops_a_shard", "index naming no key of shard 2 of 2 (its tensors would vanish)", {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2, INDEX: _index({EMBED: "model-00001-of-00002.safetensors"})}, "CheckpointIndexError", (INDEX, "model-00002-of-00002.safetensors", "a shard's keys are missing from the index")),
        Case("index_not_json", "index that is not JSON", {"a.safetensors": shard1, INDEX: b"{oops"}, "CheckpointIndexError", (INDEX, "not valid JSON")),
        Case("index_no_weight_map", "index without weight_map", {"a.safetensors": shard1, INDEX: b'{"metadata":{}}'}, "CheckpointIndexError", (INDEX, "'weight_map'")),
        Case("index_names_pickle", "index naming a .bin pickle", {"pytorch_model.bin": pickle, INDEX: _index({NORM: "pytorch_model.bin"})}, "NoWeightsError", (INDEX, NORM, "pytorch_model.bin", "never unpickles")),
        Case("pickles_only", "only pytorch_model.bin: never unpickled", {"pytorch_model.bin": pickle}, "NoWeightsError", ("pytorch_model.bin", "never unpickles")),
        Case("no_weights", "config.json and nothing else", {}, "NoWeightsError", ("no model.safetensors",)),
        Case("no_config", "weights without config.json", {MODEL: good, "config.json": None}, "CheckpointNotFoundError", ("config.json not found",)),
        Case("config_not_json", "config.json that is not JSON", {MODEL: good, "config.json": b"{"}, "ConfigError", ("config.json", "not valid JSON")),
        Case("config_not_object", "config.json that is a list", {MODEL: good, "config.json": b"[]"}, "ConfigError", ("config.json", "must hold a JSON object")),
        Case("config_unknown_model", "model_type no adapter handles", {MODEL: good, "config.json": b'{"model_type":"evil"}'}, "UnknownModelError", ("config.json", "'evil'")),
        # ---- config against tensors
        Case("config_hidden_size", "hidden_size 3, embedding [2, 2]", {MODEL: good, "config.json": _config(hidden_size=3)}, "ConfigError", ("config.json", "hidden_size=3", EMBED, "has 2 on dim 1")),
        Case("config_layers_not_int", "num_hidden_layers given as a string", {**_layers(2), "config.json": _config(num_hidden_layers="2")}, "ConfigError", ("config.json", "num_hidden_layers", "'2'")),
        Case("config_too_few_layers", "num_hidden_layers 1 + num_nextn_predict_layers 1, tensors with layers 0..3", _layers(4, num_hidden_layers=1, num_nextn_predict_layers=1), "ConfigError", ("config.json", "num_hidden_layers=1 + num_nextn_predict_layers=1 = 2", "4 layer(s), 0..3", "layers 2..3")),
        Case("config_missing_layers", "num_hidden_layers 4, tensors with layers 0..1", _layers(2, num_hidden_layers=4), "ConfigError", ("config.json", "num_hidden_layers=4", "2 layer(s), 0..1", "missing main layers 2..3")),
        Case("config_expert_count", "moe_num_experts 4, tensors with 2 experts", _moe({1: (2, 2, "F32", "F32")}, moe_num_experts=4), "ConfigError", ("config.json", "moe_num_experts=4", "model.layers.1.moe", "has 2 on dim 0")),
        Case("config_block_size", "quantization_config.weight_block_size that is not two integers", {MODEL: good, "config.json": _config(quantization_config={"weight_block_size": ["128", None]})}, "ConfigError", ("config.json", "weight_block_size must be two positive integers", "['128', None]")),
        # ---- conversion
        Case("gate_up_mismatch", "gate with 2 experts, up with 3", _moe({1: (2, 3, "F32", "F32")}), "ShapeMismatchError", ("model.layers.1.moe.gate_proj.weight", "model.layers.1.moe.up_proj.weight", "[2, 2, 2]", "[3, 2, 2]")),
        Case("experts_differ_between_layers", "layer 1 with 2 experts, layer 2 with 3", _moe({1: (2, 2, "F32", "F32"), 2: (3, 3, "F32", "F32")}), "ShapeMismatchError", ("expert counts differ between layers", "2 experts: model.layers.1.", "3 experts: model.layers.2.")),
        Case("dtype_mix", "gate BF16, up F32", _moe({1: (2, 2, "BF16", "F32")}), "ShapeMismatchError", ("model.layers.1.moe.experts.gate_and_up_projs", "different dtypes", "gate_proj.weight is bfloat16", "up_proj.weight is float32")),
        Case("missing_up", "gate without its up", {MODEL: safetensors_bytes(*_tensors(("model.layers.1.moe.gate_proj.weight", "F32", [2, 2, 2]))), "config.json": _config()}, "MissingSourceError", ("model.layers.1.moe.up_proj.weight", "model.layers.1.moe.gate_proj.weight", MODEL)),
        # ---- shapes and names the planner must take as they are
        Case("valid_zero_dim", "a 0-dim (scalar) tensor, a vision tower's logit_scale", {MODEL: safetensors_bytes(*_tensors(("model.language_model.norm.weight", "F32", [2]), ("model.vision_model.logit_scale", "F32", []))), "config.json": S37_CONFIG}, None),
        Case("valid_non_ascii_digit", "a key whose layer-like part is not ASCII digits (a.1\u00b2)", {MODEL: safetensors_bytes(*_tensors(("model.language_model.norm.weight", "F32", [2]), ("model.vision_model.a.1\u00b2", "F32", [2]), ("model.vision_model.a.2", "F32", [2]))), "config.json": S37_CONFIG}, None),
        # ---- shard series without (or beyond) an index
        Case("no_index_missing_shard", "shards 1 and 3 of 3, no index: shard 2 is gone", {"model-00001-of-00003.safetensors": shard1, "model-00003-of-00003.safetensors": shard2}, "CheckpointNotFoundError", ("model-*-of-00003.safetensors", "no model.safetensors.index.json", "missing: model-00002-of-00003.safetensors")),
        Case("no_index_two_series", "two shard series and no index (an old checkpoint's leftovers)", {"model-00001-of-00001.safetensors": shard1, "new-00001-of-00001.safetensors": shard2}, "CheckpointNotFoundError", ("holds 2 shard series", "model-*-of-00001.safetensors", "new-*-of-00001.safetensors")),
        Case("index_shard_beyond_total", "index naming shard 3 of a 2-shard series", {"model-00001-of-00002.safetensors": shard1, "model-00003-of-00002.safetensors": shard2, INDEX: _index({EMBED: "model-00001-of-00002.safetensors", NORM: "model-00003-of-00002.safetensors"})}, "CheckpointIndexError", (INDEX, "shard number(s) 3 outside 1..2")),
        Case("index_names_directory", "index naming a directory", {"a.safetensors": shard1, "b.safetensors/README": b"not weights\n", INDEX: _index(both)}, "CheckpointIndexError", (INDEX, "'b.safetensors': a directory")),
        Case("index_is_directory", "model.safetensors.index.json that is a directory", {MODEL: good, INDEX + "/README": b"not an index\n"}, "CheckpointIndexError", (INDEX, "is a directory")),
        Case("config_is_directory", "config.json that is a directory", {MODEL: good, "config.json": None, "config.json/README": b"not a config\n"}, "ConfigError", ("config.json", "is a directory")),
        # ---- absurd numbers: work bounded by the tensors present
        Case("config_layers_huge", "num_hidden_layers 10**18, tensors with layers 0..1", _layers(2, num_hidden_layers=10**18), "ConfigError", ("config.json", "num_hidden_layers=1000000000000000000", "missing main layers 2..999999999999999999")),
        Case("unclaimed_key", "a key no rule of the adapter claims", {MODEL: safetensors_bytes(*_tensors(("evil.weight", "F32", [2]))), "config.json": _config()}, "UnclaimedKeyError", ("evil.weight", MODEL, "match no rule")),
    ]


CASES: tuple[Case, ...] = tuple(_cases())


def build_corpus(root: str | os.PathLike[str]) -> Path:
    """Write every case of :data:`CASES` as a directory under ``root``; return ``root``."""
    root = Path(root)
    for case in CASES:
        d = root / case.name
        d.mkdir(parents=True, exist_ok=True)
        files = {"config.json": _config(), **case.files}
        for name, content in files.items():
            if content is not None:
                (d / name).parent.mkdir(parents=True, exist_ok=True)  # "x/README" makes x a directory
                (d / name).write_bytes(content)
    return root


def run_case(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Open a checkpoint directory, read every value; report the outcome as a dict.

    ``{"outcome": "ok", "keys": n, "bytes": b}`` when everything loaded, else
    ``{"outcome": <exception class name>, "lazysd": bool, "message": str}``.
    """
    from lazysd import VirtualStateDict
    from lazysd.errors import LazySDError

    try:
        with VirtualStateDict(path, threads=0) as vsd:
            nbytes = 0
            for key in vsd:
                t = vsd[key].materialize()
                nbytes += t.numel() * t.element_size()
            return {"outcome": "ok", "keys": len(vsd), "bytes": nbytes}
    except Exception as e:  # report, never crash: the caller checks the type
        return {"outcome": type(e).__name__, "lazysd": isinstance(e, LazySDError), "message": str(e)}


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        # Flushed line by line: if a case killed the interpreter, the last line names the one before.
        print(json.dumps({"case": case.name, **run_case(case)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
