"""Hostile and broken checkpoints: clear lazysd errors, no crash, no hang, no wrong data.

The committed corpus (tests/corpus, catalogued in tests/corpus/README.md) runs in a subprocess
under a timeout; cases that need symlinks, FIFOs, or files changing under a running load are
built here in tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lazysd.errors as errors
from lazysd import VirtualStateDict
from lazysd.checkpoint import Checkpoint
from lazysd.errors import (
    CheckpointIndexError,
    CheckpointNotFoundError,
    FileChangedError,
    LazySDError,
    MissingSourceError,
    ShapeMismatchError,
    UnsafePathError,
)
from lazysd.rules import Adapter, Part, Rule
from lazysd.testing import Step3p5Model, Step3p5Spec, load_hf_tensors, make_checkpoint
from tests.support.checks import same_bits
from tests.support.hostile import CASES, CONFIG, EMBED, MODEL, NORM, Case, build_corpus, safetensors_bytes

CORPUS = Path(__file__).parent / "corpus"
ROOT = Path(__file__).parent.parent


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# the committed corpus


def test_corpus_is_what_the_catalogue_builds(tmp_path: Path) -> None:
    committed = {k: v for k, v in _tree(CORPUS).items() if k != "README.md"}
    assert committed == _tree(build_corpus(tmp_path))


def test_corpus_readme_lists_every_case() -> None:
    readme = (CORPUS / "README.md").read_text()
    for case in CASES:
        assert f"| `{case.name}` |" in readme, case.name
        assert case.error is None or f"`{case.error}`" in readme


@pytest.fixture(scope="module")
def corpus_results() -> dict[str, dict]:
    """Every corpus case opened and fully read in one subprocess, under a timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.hostile", str(CORPUS)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    # A negative return code is a signal (SIGSEGV, SIGBUS): the last line names the case before.
    assert proc.returncode == 0, f"corpus runner died with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    results = {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        results[r.pop("case")] = r
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case: Case, corpus_results: dict[str, dict]) -> None:
    got = corpus_results[case.name]
    if case.error is None:
        assert got["outcome"] == "ok", got
        return
    assert got["outcome"] == case.error, got
    assert got["lazysd"] and issubclass(getattr(errors, case.error), LazySDError)
    for part in case.message:
        assert part in got["message"], (part, got["message"])
    # The message names the checkpoint (absolute path), not just a basename.
    assert str(CORPUS / case.name) in got["message"] or case.error == "UnknownModelError", got["message"]


@pytest.mark.parametrize("name", ["valid_single", "valid_sharded", "valid_metadata_null", "valid_zero_size", "valid_zero_dim", "valid_non_ascii_digit"])
def test_corpus_controls_load_exact_data(name: str) -> None:
    path = CORPUS / name
    reference = load_hf_tensors(path)
    with VirtualStateDict(path) as vsd:
        assert set(vsd) == set(reference)
        for key, ref in reference.items():
            got = vsd[key].materialize()
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert same_bits(got, ref), key


def test_header_length_cap_fails_before_allocating(tmp_path: Path) -> None:
    # A 2**60-byte claim must not reach an allocation or a read of that size.
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / MODEL).write_bytes(safetensors_bytes({}, b"", length=2**60))
    t0 = time.perf_counter()
    with pytest.raises(errors.HeaderError, match=r"header length 1152921504606846976 exceeds the"):
        Checkpoint(tmp_path)
    assert time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------------------------------------
# directory: symlinks, FIFOs, the Hugging Face cache layout


def _valid_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    build = CORPUS / "valid_single" / MODEL
    (path / MODEL).write_bytes(build.read_bytes())
    return path


def test_symlinked_weights_leading_out_are_refused(tmp_path: Path) -> None:
    outside = _valid_dir(tmp_path / "outside")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CONFIG))
    (ckpt / MODEL).symlink_to(outside / MODEL)
    with pytest.raises(UnsafePathError) as e:
        VirtualStateDict(ckpt)
    msg = str(e.value)
    assert f"{ckpt / MODEL}" in msg and f"resolves to {outside / MODEL}" in msg and "outside the checkpoint directory" in msg


def test_index_entry_symlinked_out_is_refused(tmp_path: Path) -> None:
    outside = _valid_dir(tmp_path / "outside")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CONFIG))
    (ckpt / "a.safetensors").symlink_to(outside / MODEL)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {EMBED: "a.safetensors", NORM: "a.safetensors"}}))
    with pytest.raises(UnsafePathError) as e:
        Checkpoint(ckpt)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and repr(EMBED) in msg and f"resolves to {outside / MODEL}" in msg


def test_symlinked_config_leading_out_is_refused(tmp_path: Path) -> None:
    outside = _valid_dir(tmp_path / "outside")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").symlink_to(outside / "config.json")
    (ckpt / MODEL).write_bytes((outside / MODEL).read_bytes())
    with pytest.raises(UnsafePathError, match="config.json.*resolves to .*outside/config.json, outside the checkpoint directory"):
        Checkpoint(ckpt)


def test_symlinks_inside_the_directory_are_fine(tmp_path: Path) -> None:
    ckpt = _valid_dir(tmp_path / "ckpt")
    (ckpt / "real").mkdir()
    os.replace(ckpt / MODEL, ckpt / "real" / MODEL)
    (ckpt / MODEL).symlink_to(Path("real") / MODEL)
    with VirtualStateDict(ckpt) as vsd:
        assert vsd[NORM].materialize().tolist() == [5.0, 6.0]


def test_hugging_face_cache_snapshot_symlinks_into_blobs_are_fine(tmp_path: Path) -> None:
    # models--org--name/snapshots/<rev>/<file> -> ../../blobs/<sha>: the hub cache layout.
    repo = tmp_path / "models--org--name"
    src = _valid_dir(tmp_path / "src")
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        (repo / "blobs" / f"sha{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/sha{i}")
    with VirtualStateDict(snap) as vsd:
        assert vsd[EMBED].materialize().tolist() == [[1.0, 2.0], [3.0, 4.0]]
    # ...but not into another repository's blobs.
    other = tmp_path / "models--evil--repo" / "blobs"
    other.mkdir(parents=True)
    (other / "x").write_bytes((src / MODEL).read_bytes())
    (snap / MODEL).unlink()
    (snap / MODEL).symlink_to(other / "x")
    with pytest.raises(UnsafePathError, match="models--evil--repo/blobs/x, outside the checkpoint directory"):
        Checkpoint(snap)


_FIFO_SCRIPT = """
import sys
from lazysd.checkpoint import Checkpoint
from lazysd.errors import LazySDError
try:
    Checkpoint(sys.argv[1])
except LazySDError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize("indexed", [False, True])
def test_fifo_under_a_weights_name_does_not_hang(tmp_path: Path, indexed: bool) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CONFIG))
    os.mkfifo(ckpt / MODEL)
    if indexed:
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {NORM: MODEL}}))
    proc = subprocess.run([sys.executable, "-c", _FIFO_SCRIPT, str(ckpt)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    # Said for what it is, not "does not exist" nor skipped as if absent.
    if indexed:
        assert proc.stdout.startswith("CheckpointIndexError") and "names paths that are not regular weights files" in proc.stdout
    else:
        assert proc.stdout.startswith("CheckpointNotFoundError") and str(ckpt) in proc.stdout
    assert f"'{MODEL}': a FIFO (named pipe)" in proc.stdout


def test_fifo_opened_directly_is_refused_without_blocking(tmp_path: Path) -> None:
    # The is_file() checks come first; this is the race where a FIFO appears after them.
    ckpt = _valid_dir(tmp_path / "ckpt")
    fifo = ckpt / "pipe.safetensors"
    os.mkfifo(fifo)
    c = Checkpoint(ckpt)
    with pytest.raises(errors.HeaderError, match="pipe.safetensors: not a regular file"):
        c._open(fifo)
    c.close()


def test_index_reports_every_offending_key(tmp_path: Path) -> None:
    ckpt = _valid_dir(tmp_path / "ckpt")
    (ckpt / MODEL).rename(ckpt / "a.safetensors")
    weight_map = {EMBED: "a.safetensors", NORM: "a.safetensors"} | {f"extra.{i}": "gone.safetensors" for i in range(30)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointNotFoundError) as e:
        Checkpoint(ckpt)
    assert "gone.safetensors: extra.0, extra.1" in str(e.value) and "... 22 more" in str(e.value)
    weight_map = {EMBED: "a.safetensors", NORM: "a.safetensors"} | {f"extra.{i}": "a.safetensors" for i in range(30)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointIndexError) as e:
        Checkpoint(ckpt)
    msg = str(e.value)
    assert "extra.0: index says a.safetensors, which lacks it" in msg and "... 10 more" in msg


def test_a_dropped_shard_is_named_as_its_series_writes_names(tmp_path: Path) -> None:
    # Shard names with 2-digit numbers: the message names the missing file exactly.
    ckpt = _valid_dir(tmp_path / "ckpt")
    (ckpt / MODEL).rename(ckpt / "model-01-of-03.safetensors")
    for i in (2, 3):
        (ckpt / f"model-0{i}-of-03.safetensors").write_bytes((ckpt / "model-01-of-03.safetensors").read_bytes())
    weight_map = {EMBED: "model-01-of-03.safetensors", NORM: "model-03-of-03.safetensors"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointIndexError, match=r"names shards model-\*-of-03\.safetensors but no key in model-02-of-03\.safetensors \("):
        Checkpoint(ckpt)


def test_pickle_is_never_loaded(tmp_path: Path) -> None:
    # Unpickling this would import a module that does not exist; a NoWeightsError proves it was not.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CONFIG))
    (ckpt / "pytorch_model.bin").write_bytes((CORPUS / "pickles_only" / "pytorch_model.bin").read_bytes())
    (ckpt / "model.pt").write_bytes(b"junk")
    with pytest.raises(errors.NoWeightsError, match=r"only pickled weights found \(model.pt, pytorch_model.bin\); lazysd never unpickles"):
        VirtualStateDict(ckpt)
    assert "lazysd_never_unpickled" not in sys.modules


# ---------------------------------------------------------------------------------------------
# conversion checks with a per-expert family

PER_EXPERT = Adapter(
    "perexpert",
    ("perexpert",),
    rules=(
        Rule(
            "layers.{layer}.experts.gate_and_up",
            parts=(Part("layers.{layer}.experts.{expert}.gate.weight", dims=(None, 1, 0)), Part("layers.{layer}.experts.{expert}.up.weight", dims=(None, 1, 0))),
            cat_dim=2,
            kind="experts",
        ),
    ),
)


def _per_expert(tmp_path: Path, experts: dict[str, list[int]], shape_of=lambda key: [2, 2]) -> Path:
    from lazysd.writer import save_file

    tensors = {}
    for part, ids in experts.items():
        for e in ids:
            key = f"layers.0.experts.{e}.{part}.weight"
            tensors[key] = torch.arange(4.0).reshape(2, 2)[: shape_of(key)[0]] + e
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp_path / MODEL)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "perexpert"}))
    return tmp_path


def test_per_expert_family_missing_expert(tmp_path: Path) -> None:
    path = _per_expert(tmp_path, {"gate": [0, 1, 2, 3], "up": [0, 1, 3]})
    with pytest.raises(MissingSourceError) as e:
        VirtualStateDict(path, adapter=PER_EXPERT)
    msg = str(e.value)
    assert str(path) in msg and "layers.0.experts.gate_and_up" in msg and "experts 0..3" in msg and "layers.0.experts.2.up.weight" in msg


def test_per_expert_family_experts_of_different_shapes(tmp_path: Path) -> None:
    path = _per_expert(tmp_path, {"gate": [0, 1], "up": [0, 1]}, shape_of=lambda key: [1, 2] if key == "layers.0.experts.1.up.weight" else [2, 2])
    with pytest.raises(ShapeMismatchError) as e:
        VirtualStateDict(path, adapter=PER_EXPERT)
    msg = str(e.value)
    assert "experts of layers.0.experts.gate_and_up differ in shape" in msg and "layers.0.experts.1.up.weight [1, 2]" in msg


def test_per_expert_family_loads_when_complete(tmp_path: Path) -> None:
    path = _per_expert(tmp_path, {"gate": [0, 1], "up": [0, 1]})
    with VirtualStateDict(path, adapter=PER_EXPERT) as vsd:
        got = vsd["layers.0.experts.gate_and_up"].materialize()
    base = torch.arange(4.0).reshape(2, 2)
    want = torch.stack([torch.cat([(base + e).T, (base + e).T], dim=1) for e in range(2)])
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# files that change under a running load

EXPERT_KEY = "model.layers.1.moe.experts.gate_and_up_projs"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "ckpt", Step3p5Spec.tiny(), layout="single")


def _assert_changed(e: pytest.ExceptionInfo, file: Path, what: str) -> None:
    assert isinstance(e.value, FileChangedError) and isinstance(e.value, OSError)
    assert str(file) in str(e.value) and what in str(e.value), str(e.value)


def test_truncated_after_open(tiny: Path) -> None:
    # pread past the new end returns short reads, never SIGBUS (nothing is memory-mapped).
    with VirtualStateDict(tiny) as vsd:
        file = tiny / MODEL
        os.truncate(file, file.stat().st_size // 2)
        with pytest.raises(FileChangedError) as e:
            vsd[EXPERT_KEY].materialize()
        _assert_changed(e, file, "changed since the checkpoint was opened (size")


def test_replaced_after_open(tiny: Path, tmp_path: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        other = make_checkpoint(tmp_path / "other", Step3p5Spec.tiny(), layout="single", seed=1)
        os.replace(other / MODEL, tiny / MODEL)
        with pytest.raises(FileChangedError) as e:
            vsd[EXPERT_KEY].materialize()
        _assert_changed(e, tiny / MODEL, "was replaced by another file")


def test_modified_in_place_same_size(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        before = vsd["model.norm.weight"].materialize()
        time.sleep(0.05)  # mtime has the filesystem's granularity (a few ms at worst)
        file = tiny / MODEL
        size = file.stat().st_size
        with open(file, "r+b") as f:
            f.seek(size - 64)
            f.write(b"\x7f" * 64)
        assert file.stat().st_size == size
        with pytest.raises(FileChangedError) as e:
            vsd["model.norm.weight"].materialize()
        _assert_changed(e, file, "mtime")
        assert before.shape == (32,)


def test_deleted_after_open(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        (tiny / MODEL).unlink()
        with pytest.raises(FileChangedError) as e:
            vsd[EXPERT_KEY].materialize()
        _assert_changed(e, tiny / MODEL, "was deleted or renamed")


def test_read_after_close(tiny: Path) -> None:
    vsd = VirtualStateDict(tiny)
    value = vsd[EXPERT_KEY]
    vsd.close()
    with pytest.raises(FileChangedError) as e:
        value.materialize()
    _assert_changed(e, tiny / MODEL, "checkpoint was closed")


def test_truncated_under_load_state_dict(tiny: Path) -> None:
    # torch catches the error inside param.copy_ and re-raises one RuntimeError listing every
    # failed parameter with the original exception's args: the lazysd message must be in it.
    model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
    with VirtualStateDict(tiny) as vsd:
        os.truncate(tiny / MODEL, 1024)
        with pytest.raises(RuntimeError) as e:
            model.load_state_dict(vsd)
    msg = str(e.value)
    assert "Error(s) in loading state_dict for Step3p5Model" in msg
    assert f'While copying the parameter named "{EXPERT_KEY}"' in msg
    assert f"{tiny / MODEL}: changed since the checkpoint was opened (size" in msg and "reopen the checkpoint" in msg


def test_truncated_under_load_state_dict_assign(tiny: Path) -> None:
    model = Step3p5Model(Step3p5Spec.tiny(), layout="native", device="meta")
    with VirtualStateDict(tiny) as vsd:
        os.truncate(tiny / MODEL, 1024)
        with pytest.raises((FileChangedError, RuntimeError)) as e:
            model.load_state_dict(vsd, assign=True)
    assert f"{tiny / MODEL}: changed since the checkpoint was opened" in str(e.value)
