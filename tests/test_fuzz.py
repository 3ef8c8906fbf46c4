"""Property tests: mutated headers and indexes give correct data or a lazysd error, nothing else.

Every example writes a mutated copy of a small valid checkpoint, opens it and reads every
value. The property: the outcome is a :class:`~lazysd.errors.LazySDError`, or the checkpoint
opens and every tensor it shows is bit-for-bit what the header says — checked against the
bytes at the header's offsets, against the ``safetensors`` library's own reader, and against
the original tensors where the entry is unchanged. Never another exception type, never a hang
(each example runs under a hard SIGALRM limit, and Hypothesis has a per-example deadline).

Runs are derandomized (the same examples every run, so CI is stable); set
``LAZYSD_FUZZ_SCALE=10`` for a ten times longer exploration.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from lazysd import VirtualStateDict
from lazysd.checkpoint import DTYPES, Checkpoint
from lazysd.errors import LazySDError
from lazysd.testing import Step3p5Spec, make_checkpoint
from tests.support.checks import tensor_bytes as _bits
from tests.support.hostile import safetensors_bytes

SCALE = float(os.environ.get("LAZYSD_FUZZ_SCALE", "1"))
HARD_LIMIT_S = 10  # one example; a hang fails the test instead of stalling CI
RAN: dict[str, int] = {}  # fuzz test -> examples that really ran in this session


def _settings(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=timedelta(seconds=2),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"example ran over {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# a small valid file: several dtypes, a zero-size tensor, keys the step3p5 adapter passes through

BASE_TENSORS: dict[str, torch.Tensor] = {
    "model.embed_tokens.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) + 0.5,
    "model.norm.weight": torch.tensor([1.5, -2.0, 3.25, 0.0], dtype=torch.bfloat16),
    "lm_head.weight": torch.tensor([[7, -8, 9]], dtype=torch.int32),
    "model.layers.0.input_layernorm.weight": torch.zeros(0, 3, dtype=torch.float16),
    "model.layers.0.post_attention_layernorm.weight": torch.tensor([1, 2, 3, 250], dtype=torch.uint8),
}
NAME_OF = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32", torch.float16: "F16", torch.uint8: "U8"}


def _base() -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for key, t in BASE_TENSORS.items():
        raw = _bits(t)
        header[key] = {"dtype": NAME_OF[t.dtype], "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


BASE_HEADER, BASE_DATA = _base()
BASE_FILE = safetensors_bytes(BASE_HEADER, BASE_DATA)
KEYS = list(BASE_TENSORS)
FIELDS = ["dtype", "shape", "data_offsets"]
CONFIG = json.dumps({"model_type": "step3p5"})

@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # One directory, rewritten by every example: creating thousands of files is slower than
    # checking them. Under /dev/shm where there is one, for the same reason.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="lazysd-fuzz-", dir=base) as d:
        (Path(d) / "config.json").write_text(CONFIG)
        yield Path(d)


def _check_file(d: Path) -> None:
    """The property for one weights file in ``d``: a lazysd error, or exactly the header's data."""
    file = d / "model.safetensors"
    with _time_limit(HARD_LIMIT_S):
        try:
            ckpt = Checkpoint(d)
        except LazySDError:
            return
        raw = file.read_bytes()
        try:
            with safe_open(file, framework="pt") as ref:
                reference = {k: ref.get_tensor(k) for k in ref.keys()}
        except Exception as e:  # noqa: BLE001 - any refusal by the reference reader
            raise AssertionError(f"lazysd accepted a file the safetensors library refuses: {e}") from e
        with ckpt:
            assert set(ckpt.tensors) == set(reference)
            for key, info in ckpt.tensors.items():
                out = bytearray(info.nbytes)
                ckpt.read_into(info, 0, memoryview(out))
                assert bytes(out) == raw[info.offset : info.offset + info.nbytes], key
                ref = reference[key]
                assert (info.dtype, info.shape) == (ref.dtype, tuple(ref.shape)), key
                assert bytes(out) == _bits(ref), key
                base = BASE_HEADER.get(key)
                if base is not None and (DTYPES.get(base["dtype"]), tuple(base["shape"])) == (info.dtype, info.shape) and info.offset == len(raw) - len(BASE_DATA) + base["data_offsets"][0] and raw.endswith(BASE_DATA):
                    assert bytes(out) == _bits(BASE_TENSORS[key]), key
        # The whole stack (plan, reader, lazy values) agrees with the reference reader too.
        try:
            vsd = VirtualStateDict(d, threads=0)
        except LazySDError:
            return  # e.g. a key no step3p5 rule claims
        with vsd:
            for key in vsd:
                got = vsd[key].materialize()
                ref = reference[key]
                assert got.dtype == ref.dtype and got.shape == ref.shape and _bits(got) == _bits(ref), key


# ---------------------------------------------------------------------------------------------
# JSON-level header mutations

junk = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-2, 64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.lists(st.integers(-2, 40), max_size=4),
    st.lists(st.one_of(st.integers(0, 2**64), st.floats(0, 10), st.booleans()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.sampled_from([*DTYPES, "F12", "", "f32", "BF16 ", "F8_E4M3FNUZ", "C64"]),
)

mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from(FIELDS + ["extra"]), junk),
    st.tuples(st.just("dtype"), st.sampled_from(KEYS), st.sampled_from(list(DTYPES))),
    st.tuples(st.just("shape"), st.sampled_from(KEYS), st.lists(st.integers(0, 12), max_size=3)),
    st.tuples(st.just("offset"), st.sampled_from(KEYS), st.integers(0, 1), st.integers(-12, 12)),
    st.tuples(st.just("drop"), st.sampled_from(KEYS + ["__metadata__"])),
    st.tuples(st.just("drop_field"), st.sampled_from(KEYS), st.sampled_from(FIELDS)),
    st.tuples(st.just("replace"), st.sampled_from(KEYS + ["__metadata__", "model.norm.weight2", ""]), junk),
    st.tuples(st.just("metadata"), st.sampled_from(["format", "x"]), junk),
)


def _apply(header: dict[str, Any], m: tuple) -> None:
    op, key = m[0], m[1]
    if op == "set" and isinstance(header.get(key), dict):
        header[key][m[2]] = m[3]
    elif op == "dtype" and isinstance(header.get(key), dict):
        header[key]["dtype"] = m[2]
    elif op == "shape" and isinstance(header.get(key), dict):
        header[key]["shape"] = m[2]
    elif op == "offset" and isinstance(header.get(key), dict) and isinstance(header[key].get("data_offsets"), list):
        offsets = list(header[key]["data_offsets"])
        if len(offsets) == 2 and all(type(o) is int for o in offsets):
            offsets[m[2]] += m[3]
            header[key]["data_offsets"] = offsets
    elif op == "drop":
        header.pop(key, None)
    elif op == "drop_field" and isinstance(header.get(key), dict):
        header[key].pop(m[2], None)
    elif op == "replace":
        header[key] = m[2]
    elif op == "metadata":
        meta = header.get("__metadata__")
        if isinstance(meta, dict):
            meta[key] = m[2]


@_settings(1200)
@given(
    mutations=st.lists(mutation, min_size=1, max_size=3),
    length_delta=st.one_of(st.just(0), st.just(0), st.integers(-16, 16), st.integers(0, 2**64 - 1).map(lambda v: ("abs", v))),
    data_cut=st.one_of(st.just(None), st.just(None), st.integers(0, len(BASE_DATA) + 8)),
    shuffle=st.randoms(use_true_random=False),
)
def test_fuzz_header_json(workdir: Path, mutations: list[tuple], length_delta: Any, data_cut: int | None, shuffle: Any) -> None:
    RAN["json"] = RAN.get("json", 0) + 1
    header = copy.deepcopy(BASE_HEADER)
    for m in mutations:
        _apply(header, m)
    items = list(header.items())
    shuffle.shuffle(items)  # key order must not matter
    raw = json.dumps(dict(items), separators=(",", ":")).encode()
    if isinstance(length_delta, tuple):
        length = length_delta[1]
    else:
        length = max(0, len(raw) + length_delta)
    data = BASE_DATA if data_cut is None else (BASE_DATA + b"\xab" * 8)[:data_cut]
    (workdir / "model.safetensors").write_bytes(safetensors_bytes(raw, data, length=length))
    _check_file(workdir)


# ---------------------------------------------------------------------------------------------
# byte-level mutations of the whole file

byte_op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(BASE_FILE) - 1), st.integers(0, 255)),
    st.tuples(st.just("set_header"), st.integers(0, len(BASE_FILE) - len(BASE_DATA) - 1), st.sampled_from(b'{}[]",:0123456789- \xff\x00e.')),
    st.tuples(st.just("insert"), st.integers(0, len(BASE_FILE)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(BASE_FILE)), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE_FILE))),
)


@_settings(1200)
@given(ops=st.lists(byte_op, min_size=1, max_size=4))
def test_fuzz_header_bytes(workdir: Path, ops: list[tuple]) -> None:
    RAN["bytes"] = RAN.get("bytes", 0) + 1
    buf = bytearray(BASE_FILE)
    for op in ops:
        if op[0] in ("set", "set_header") and op[1] < len(buf):
            buf[op[1]] = op[2]
        elif op[0] == "insert":
            buf[op[1] : op[1]] = op[2]
        elif op[0] == "delete":
            del buf[op[1] : op[1] + op[2]]
        elif op[0] == "truncate":
            del buf[op[1] :]
    (workdir / "model.safetensors").write_bytes(bytes(buf))
    _check_file(workdir)


# ---------------------------------------------------------------------------------------------
# index mutations over a real sharded Step3p5 checkpoint


@pytest.fixture(scope="module")
def sharded(workdir: Path) -> tuple[Path, dict[str, Any], dict[str, bytes]]:
    """A pristine split checkpoint, its index, its values; and a copy (hard links) to mutate."""
    path = make_checkpoint(workdir / "pristine", Step3p5Spec.tiny(), layout="split")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    with VirtualStateDict(path) as vsd:
        values = {k: _bits(vsd[k].materialize()) for k in vsd}
    copy_dir = workdir / "mutated"
    copy_dir.mkdir()
    for f in path.iterdir():
        if f.suffix == ".safetensors" or f.name == "config.json":
            os.link(f, copy_dir / f.name)  # the same files, inside the mutated checkpoint's directory
    return copy_dir, index, values


def _shard_names(index: dict[str, Any]) -> list[str]:
    return sorted(set(index["weight_map"].values()))


names = st.one_of(
    st.tuples(st.just("shard"), st.sampled_from(["", "", "./", "../"]), st.integers(0, 200)),  # see name() below
    st.sampled_from(["missing.safetensors", "/etc/passwd", "", "sub/../x.safetensors", "pytorch_model.bin", "config.json", "."]),
    junk,
)

index_op = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 200)),
    st.tuples(st.just("value"), st.integers(0, 200), names),
    st.tuples(st.just("rename"), st.integers(0, 200), st.sampled_from(["x", "model.norm.weight", "lm_head.weight", "model.layers.1.moe.up_proj.weight"])),
    st.tuples(st.just("add"), st.sampled_from(["x.weight", "model.layers.9.input_layernorm.weight", "model.layers.1.moe.gate_proj.weight"]), names),
    st.tuples(st.just("weight_map"), junk),
    st.tuples(st.just("root"), junk),
    st.tuples(st.just("duplicate"), st.integers(0, 200), names),
    st.tuples(st.just("text"), st.integers(0, 10**6), st.sampled_from(list('{}[]",:\\x0 '))),
)


@_settings(500)
@given(ops=st.lists(index_op, min_size=1, max_size=3))
def test_fuzz_index(workdir: Path, sharded: tuple[Path, dict[str, Any], dict[str, bytes]], ops: list[tuple]) -> None:
    RAN["index"] = RAN.get("index", 0) + 1
    d, index, values = sharded
    shards = _shard_names(index)

    def name(v: Any) -> Any:  # ("shard", prefix, i): an existing shard, maybe behind a prefix
        return v[1] + shards[v[2] % len(shards)] if isinstance(v, tuple) else v

    data: Any = copy.deepcopy(index)
    text_edits: list[tuple] = []
    duplicates: list[tuple[str, Any]] = []
    for op in ops:
        wm = data.get("weight_map") if isinstance(data, dict) else None
        keys = list(wm) if isinstance(wm, dict) else []
        if op[0] in ("drop", "value", "rename", "duplicate") and not keys:
            continue
        if op[0] == "drop":
            del wm[keys[op[1] % len(keys)]]
        elif op[0] == "value":
            wm[keys[op[1] % len(keys)]] = name(op[2])
        elif op[0] == "rename":
            k = keys[op[1] % len(keys)]
            wm[op[2]] = wm.pop(k)
        elif op[0] == "add" and isinstance(wm, dict):
            wm[op[1]] = name(op[2])
        elif op[0] == "weight_map" and isinstance(data, dict):
            data["weight_map"] = op[1]
        elif op[0] == "root":
            data = op[1]
        elif op[0] == "duplicate":
            duplicates.append((keys[op[1] % len(keys)], name(op[2])))
        elif op[0] == "text":
            text_edits.append(op)
    text = json.dumps(data)
    if duplicates and text.endswith("}}"):
        # JSON with a key listed twice: Python's dict cannot hold it, so write it as text.
        text = text[:-2] + "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in duplicates) + "}}"
    for _, pos, ch in text_edits:
        pos %= max(1, len(text))
        text = text[:pos] + ch + text[pos + 1 :]
    (d / "model.safetensors.index.json").write_text(text)
    with _time_limit(HARD_LIMIT_S):
        try:
            vsd = VirtualStateDict(d, threads=0)
        except LazySDError:
            return
        # Opened: the index must describe exactly the files, so the values are the pristine ones.
        with vsd:
            assert set(vsd) == set(values)
            for key in vsd:
                assert _bits(vsd[key].materialize()) == values[key], key


def test_fuzz_runs_thousands_of_cases() -> None:
    """The three fuzz tests above ran this many examples together (at LAZYSD_FUZZ_SCALE=1)."""
    if set(RAN) != {"json", "bytes", "index"}:
        pytest.skip(f"not all three fuzz tests ran in this session (ran: {sorted(RAN)})")
    total = sum(RAN.values())
    assert total >= 2900 * SCALE, RAN
