"""No silent wrong data, no hangs, bounded work, clean interrupts, clear errors, path forms.

Processes, signals and limits are real: forks are ``os.fork()`` and a fork-started
``DataLoader``, interrupts are SIGINT sent to a subprocess, the open-file limit is lowered
with ``setrlimit`` in a subprocess. Cases are catalogued in tests/corpus/README.md.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lazysd
from lazysd import VirtualStateDict, errors
from lazysd.rules import Adapter, Rule
from lazysd.testing import Step3p5Model, Step3p5Spec, make_checkpoint
from lazysd.testing.families import FamilySpec, make_family_checkpoint
from tests.support.checks import same_bits
from tests.support.dist import torchrun

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MODEL = "model.safetensors"
CATCH_ALL = Adapter("catch_all", ("catch_all",), rules=(Rule("{name:**}"),))


def _py(code: str, *args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
        **kw,
    )  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", Step3p5Spec.tiny(), layout="split")


def _plain(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "catch_all"}))
    save_file(tensors, str(path / MODEL))
    return path


# ---------------------------------------------------------------------------------------------
# wrong data: files rewritten in place


def test_same_size_rewrite_with_restored_mtime_is_detected(tmp_path: Path) -> None:
    ckpt = _plain(tmp_path / "c", {"w": torch.arange(64, dtype=torch.float32)})
    file = ckpt / MODEL
    with VirtualStateDict(ckpt, adapter=CATCH_ALL) as vsd:
        before = vsd["w"].materialize()
        st = file.stat()
        time.sleep(0.01)
        with open(file, "r+b") as f:  # what `cp -p` / `rsync --inplace -t` do: same inode, same size
            f.seek(st.st_size - 16)
            f.write(b"\x7f" * 16)
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime put back
        now = file.stat()
        assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
        with pytest.raises(errors.FileChangedError, match="ctime") as e:
            vsd["w"].materialize()
        assert str(file) in str(e.value)
    assert before.equal(torch.arange(64, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# wrong data: FP8 weight without its scales


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_family_checkpoint(tmp_path_factory.mktemp("fp8") / "ckpt", FamilySpec.tiny("deepseek_v3", fp8=True))


def _drop_scale(src: Path, dst: Path) -> str:
    """A copy of ``src`` without one ``weight_scale_inv``; returns the weight key left bare."""
    import shutil

    from lazysd.testing import load_hf_tensors

    shutil.copytree(src, dst)
    hf = load_hf_tensors(dst)
    key = next(k for k in hf if k.endswith("_scale_inv") and ".experts." not in k)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    tensors = {k: v.clone() for k, v in hf.items() if k != key}
    save_file(tensors, str(dst / MODEL))
    return key.removesuffix("_scale_inv")


def test_fp8_weight_without_its_scale_is_an_error(fp8_ckpt: Path, tmp_path: Path) -> None:
    bare = _drop_scale(fp8_ckpt, tmp_path / "c")
    with pytest.raises(errors.MissingSourceError) as e:
        VirtualStateDict(tmp_path / "c")
    msg = str(e.value)
    assert (
        str(tmp_path / "c" / MODEL) in msg and repr(bare) in msg and "without its scales" in msg and 'fp8="keep"' in msg
    )
    # fp8="keep": visible as such, the weight as stored and no scales next to it.
    with VirtualStateDict(tmp_path / "c", fp8="keep") as vsd:
        native = next(k for k in vsd if vsd.entry(k).hf_keys == (bare,))
        assert vsd[native].dtype == torch.float8_e4m3fn and native + "_scale_inv" not in vsd


def _module_with(key: str, param: torch.Tensor) -> torch.nn.Module:
    """A module whose only parameter is named ``key`` (dotted: nested submodules)."""
    root = parent = torch.nn.Module()
    *path, leaf = key.split(".")
    for name in path:
        child = torch.nn.Module()
        parent.add_module(name, child)
        parent = child
    parent.register_parameter(leaf, torch.nn.Parameter(param))
    return root


def test_fp8_keep_into_a_bf16_model_is_refused_before_reading(fp8_ckpt: Path) -> None:
    # Copying FP8 as stored into bf16 would cast it without its scales (values off by ~100x).
    with VirtualStateDict(fp8_ckpt, fp8="keep") as vsd:
        key = next(k for k in vsd if vsd[k].dtype == torch.float8_e4m3fn)
        model = _module_with(key, torch.zeros(vsd[key].shape, dtype=torch.bfloat16))
        with pytest.raises(errors.StateDictMismatchError, match="without their block scales") as e:
            lazysd.load(model, vsd, strict=False)
        assert "nothing was read" in str(e.value) and vsd.bytes_read == 0


@pytest.mark.parametrize("block", [16384, 2**24])
def test_huge_block_size_costs_the_read_not_the_block(tmp_path: Path, block: int) -> None:
    # One FP8 weight smaller than one block, so one scale: valid, and dequantized exactly with
    # temporaries the size of the weight (a [16384, 16384] expansion is 1 GiB; 2**24 squared is 2**48).
    code = f"""
import json, sys, torch
from safetensors.torch import save_file
from lazysd import VirtualStateDict
from tests.support.measure import PeakRSS
path = sys.argv[1]
w = (torch.randn(256, 320) * 4).to(torch.float8_e4m3fn)
s = torch.tensor([[0.5]])
save_file({{"model.layers.0.mlp.gate_proj.weight": w, "model.layers.0.mlp.gate_proj.weight_scale_inv": s,
            "model.embed_tokens.weight": torch.zeros(4, 320, dtype=torch.bfloat16)}}, path + "/model.safetensors")
quant = {{"weight_block_size": [{block}, {block}]}}
config = {{"model_type": "deepseek_v3", "num_hidden_layers": 1, "quantization_config": quant}}
json.dump(config, open(path + "/config.json", "w"))
with VirtualStateDict(path, dtype=torch.float32) as vsd, PeakRSS(sample_s=None) as peak:
    got = vsd["model.layers.0.mlp.gate_proj.weight"].materialize()
print(json.dumps({{"exact": bool(torch.equal(got, w.float() * 0.5)), "peak": peak.total}}))
"""
    (tmp_path / "c").mkdir()
    proc = _py(code, str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["exact"] and out["peak"] < 64 * 2**20, out


def test_huge_expert_index_costs_the_keys_present(tmp_path: Path) -> None:
    # An expert numbered 10**12 in a key: the missing experts are counted, not listed.
    tensors = {
        f"model.layers.0.mlp.experts.{e}.{p}_proj.weight": torch.zeros(2, 2)
        for e in (0, 10**12)
        for p in ("gate", "up", "down")
    }
    ckpt = _plain(
        tmp_path / "c",
        {**tensors, "model.embed_tokens.weight": torch.zeros(2, 2)},
        {"model_type": "qwen3_moe", "num_hidden_layers": 1},
    )
    t0 = time.perf_counter()
    with pytest.raises(errors.MissingSourceError) as e:
        VirtualStateDict(ckpt)
    assert time.perf_counter() - t0 < 10
    assert "experts 0..1000000000000 " in str(e.value) and "... 999999999991 more" in str(e.value)


# ---------------------------------------------------------------------------------------------
# wrong data: in-place ops on lazy values


_IN_PLACE = {
    "add_": lambda t: t.add_(1),
    "zero_": lambda t: t.zero_(),
    "fill_": lambda t: t.fill_(3.0),
    "setitem": lambda t: t.__setitem__(0, 5.0),
    "iadd": lambda t: t.__iadd__(1),
    "out=": lambda t: torch.add(t, 1, out=t),
    "copy_": lambda t: t.copy_(torch.zeros_like(t.materialize())),
    "nn.init.normal_": lambda t: torch.nn.init.normal_(t),
    "clamp_": lambda t: t.clamp_(0, 1),
    "resize_": lambda t: t.resize_(3),
}


@pytest.mark.parametrize("op", list(_IN_PLACE))
def test_in_place_ops_on_lazy_values_are_refused(tmp_path: Path, op: str) -> None:
    ckpt = _plain(tmp_path / "c", {"w": torch.arange(4, dtype=torch.float32)})
    with VirtualStateDict(ckpt, adapter=CATCH_ALL) as vsd:
        t = vsd["w"]
        with pytest.raises(
            errors.ReadOnlyTensorError, match=r"'w': .* would modify a lazy value of a read-only mapping"
        ):
            _IN_PLACE[op](t)
        assert t.materialize().equal(torch.arange(4, dtype=torch.float32))
        # Out-of-place ops and a materialized copy work as on any tensor.
        assert (t + 1).equal(torch.arange(1, 5, dtype=torch.float32))
        own = t.materialize()
        own.add_(1)
        assert own.equal(torch.arange(1, 5, dtype=torch.float32))


def test_in_place_refusal_in_a_real_expression(tmp_path: Path) -> None:
    ckpt = _plain(tmp_path / "c", {"w": torch.arange(4, dtype=torch.float32)})
    with VirtualStateDict(ckpt, adapter=CATCH_ALL) as vsd:
        t = vsd["w"]
        with pytest.raises(errors.ReadOnlyTensorError):
            t += 1
        with pytest.raises(errors.ReadOnlyTensorError):
            t[1:3] = 0


# ---------------------------------------------------------------------------------------------
# hangs: fork after use, Ctrl-C


_FORK = """
import os, sys, torch
from lazysd import VirtualStateDict
vsd = VirtualStateDict(sys.argv[1], threads=2, chunk_bytes=4096)
big = max(vsd, key=lambda k: vsd[k].numel())
ref = vsd[big].materialize()              # the parent reads: its reader threads exist
pid = os.fork()
if pid == 0:
    got = vsd[big].materialize()          # the child: no threads of its own until it starts them
    os._exit(0 if torch.equal(got, ref) else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_fork_after_use_gives_the_child_a_working_reader(tiny: Path) -> None:
    proc = _py(_FORK, str(tiny), timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "child 0", proc.stdout + proc.stderr[-2000:]


_DATALOADER = """
import sys, torch
from torch.utils.data import DataLoader, Dataset
from lazysd import VirtualStateDict
vsd = VirtualStateDict(sys.argv[1], chunk_bytes=4096)
keys = sorted(vsd, key=lambda k: -vsd[k].numel())[:6]
ref = {k: vsd[k].materialize() for k in keys}
class Tensors(Dataset):
    def __len__(self): return len(keys)
    def __getitem__(self, i): return i, vsd[keys[i]].materialize()
loader = DataLoader(Tensors(), batch_size=None, num_workers=2, multiprocessing_context="fork")
ok = all(torch.equal(t, ref[keys[i]]) for i, t in loader)
print("ok" if ok else "wrong")
"""


def test_dataloader_fork_workers_read_after_the_parent(tiny: Path) -> None:
    proc = _py(_DATALOADER, str(tiny), timeout=90)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Large enough (~100 MB) that a convert is still writing when the interrupt comes.
    return make_checkpoint(tmp_path_factory.mktemp("medium") / "ckpt", Step3p5Spec.sized(10**8), layout="split")


def _sigint_as_in_a_terminal() -> None:
    """In the child, before it runs: Ctrl-C does what it does in a terminal. A test run started
    in the background by a shell without job control (a CI script's ``cmd &``) has SIGINT
    ignored, and its children would inherit that: the test's SIGINT would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(proc: subprocess.Popen[str], ready: callable, limit: float = 60) -> None:  # type: ignore[valid-type]
    t0 = time.perf_counter()
    while not ready():
        assert proc.poll() is None, f"finished before the interrupt: {proc.communicate()}"
        assert time.perf_counter() - t0 < limit, "never got ready"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)


def test_ctrl_c_during_convert_is_one_line_exit_130_and_no_output(medium: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazysd", "convert", str(medium), str(dst), "--quiet", "--max-shard-size", "20MB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
        preexec_fn=_sigint_as_in_a_terminal,
    )

    # Interrupt while shards are being written (in the export's hidden staging directory).
    def writing() -> bool:
        return any(
            p.name.startswith(f".{dst.name}.lazysd-stage-") and any(p.glob("*.safetensors")) for p in tmp_path.iterdir()
        )

    _interrupt_when(proc, writing)
    t0 = time.perf_counter()
    _, err = proc.communicate(timeout=30)
    assert time.perf_counter() - t0 < 20
    assert proc.returncode == 130, err
    assert err == f"lazysd: interrupted; nothing was written to {dst}\n"
    assert not dst.exists()  # nothing that looks like a checkpoint, and no leftovers beside it
    assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []


_LOAD_LOOP = """
import sys
from lazysd import VirtualStateDict
from lazysd.testing import Step3p5Model, Step3p5Spec
vsd = VirtualStateDict(sys.argv[1], chunk_bytes=1 << 16, max_inflight_bytes=1 << 18)
model = Step3p5Model(Step3p5Spec.sized(10**8), layout="native")
print("loading", flush=True)
try:
    while True:
        model.load_state_dict(vsd)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_during_a_load_stops_promptly(medium: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOAD_LOOP, str(medium)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "loading\n"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    out, err = proc.communicate(timeout=30)
    assert time.perf_counter() - t0 < 10, "the interrupt was not prompt"
    assert out == "interrupted\n" and proc.returncode == 0, err[-2000:]


# ---------------------------------------------------------------------------------------------
# raw errors


def test_more_shards_than_the_open_file_limit(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "catch_all"}))
    n = 80
    for i in range(n):
        save_file({f"t{i}": torch.full((2,), float(i))}, str(ckpt / f"model-{i + 1:05d}-of-{n:05d}.safetensors"))
    code = """
import resource, sys
from lazysd import VirtualStateDict, TooManyFilesError
from lazysd.rules import Adapter, Rule
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))  # a real, lowered limit
try:
    VirtualStateDict(sys.argv[1], adapter=Adapter("c", ("c",), rules=(Rule("{name:**}"),)))
except TooManyFilesError as e:
    print(type(e).__name__, e)
"""
    proc = _py(code, str(ckpt))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("TooManyFilesError") and "RLIMIT_NOFILE is 48 (hard limit 48)" in proc.stdout
    assert "ulimit -n" in proc.stdout and str(ckpt) in proc.stdout


def test_index_naming_a_symlink_loop_a_fifo_or_a_dangling_link(tmp_path: Path) -> None:
    ckpt = _plain(tmp_path / "c", {"a": torch.zeros(2)})
    (ckpt / MODEL).rename(ckpt / "a.safetensors")
    os.symlink("loop.safetensors", ckpt / "loop.safetensors")
    os.mkfifo(ckpt / "fifo.safetensors")
    os.symlink("nothing.safetensors", ckpt / "dangling.safetensors")
    weight_map = {"a": "a.safetensors", "b": "loop.safetensors", "c": "fifo.safetensors", "d": "dangling.safetensors"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(errors.CheckpointIndexError) as e:
        VirtualStateDict(ckpt, adapter=CATCH_ALL)
    msg = str(e.value)
    assert "'loop.safetensors': a symlink loop" in msg and "'fifo.safetensors': a FIFO (named pipe)" in msg
    assert "'dangling.safetensors': a dangling symlink" in msg


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_construction_closes_its_files(tiny: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    import shutil

    shutil.copytree(tiny, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "hidden_size": 3}))  # fails at planning, after the opens
    before = _open_fds()
    kept = []
    for _ in range(3):
        try:
            VirtualStateDict(ckpt)
        except errors.ConfigError as e:
            kept.append(e)  # referenced, as Jupyter keeps the last exception
    assert len(kept) == 3 and _open_fds() == before


def test_error_messages_are_bounded(tmp_path: Path) -> None:
    # 40 unclaimed keys of 1 MB each: a 40 MB header is legal, a 40 MB message is not.
    tensors = {f"{i:02d}" + "k" * (1 << 20): torch.zeros(1) + i for i in range(40)}
    ckpt = _plain(tmp_path / "c", tensors, {"model_type": "step3p5"})
    with pytest.raises(errors.UnclaimedKeyError) as e:
        VirtualStateDict(ckpt)
    assert len(str(e.value)) <= errors.MAX_MESSAGE_CHARS + 100
    assert str(ckpt) in str(e.value) and "match no rule" in str(e.value)


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_save_of_lazy_values_loads_with_weights_only(tiny: Path, tmp_path: Path, mmap: bool) -> None:
    with VirtualStateDict(tiny, mmap=mmap) as vsd:
        keys = list(vsd)[:8]
        buf = io.BytesIO()
        torch.save({k: vsd[k] for k in keys}, buf)
        loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        assert all(type(loaded[k]) is torch.Tensor and same_bits(loaded[k], vsd[k].materialize()) for k in keys)
        # The tensors' bytes, not the shard mappings behind mmap views.
        assert len(buf.getvalue()) < sum(vsd[k].numel() * vsd[k].element_size() for k in keys) + 64 * 1024


def test_meta_destinations_read_nothing(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        model = Step3p5Model(Step3p5Spec.tiny(), layout="native", device="meta")
        with pytest.warns(UserWarning, match="meta"):
            model.load_state_dict(vsd)  # without assign=True: a no-op in torch
        assert vsd.bytes_read == 0


# ---------------------------------------------------------------------------------------------
# path forms


def test_single_file_path_tilde_and_shard_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _plain(tmp_path / "home" / "c", {"w": torch.ones(2)})
    with VirtualStateDict(ckpt / MODEL, adapter=CATCH_ALL) as vsd:
        assert vsd.checkpoint.path == ckpt and vsd["w"].materialize().equal(torch.ones(2))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with VirtualStateDict("~/c", adapter=CATCH_ALL) as vsd:
        assert vsd.checkpoint.path == ckpt
    (ckpt / MODEL).rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    with pytest.raises(errors.CheckpointNotFoundError, match=rf"is one weights file; .* pass {ckpt}$"):
        VirtualStateDict(ckpt / "model-00001-of-00001.safetensors", adapter=CATCH_ALL)


def _hub_repo(cache: Path, repo_id: str, revisions: dict[str, float]) -> Path:
    """A huggingface_hub cache repository: blobs, snapshots/<commit> of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for i, (commit, value) in enumerate(revisions.items()):
        src = _plain(cache / f"src{i}", {"w": torch.full((2,), value)})
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        (repo / "blobs").mkdir(exist_ok=True)
        for f in src.iterdir():
            blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
            f.rename(blob)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return repo


def test_hub_cache_repo_root_repo_id_and_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = "a" * 40, "b" * 40
    cache = tmp_path / "hf" / "hub"
    repo = _hub_repo(cache, "org/name", {old: 1.0, new: 2.0})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    (repo / "refs" / "v1").write_text(old)

    def value(path: str | Path, **kw: str) -> float:
        with VirtualStateDict(path, adapter=CATCH_ALL, **kw) as vsd:
            return float(vsd["w"].materialize()[0])

    assert value(repo) == 2.0  # refs/main
    assert value(repo, revision="v1") == 1.0 and value(repo, revision=old) == 1.0
    for var, where in (("HF_HUB_CACHE", cache), ("HF_HOME", tmp_path / "hf")):
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        monkeypatch.setenv(var, str(where))
        monkeypatch.chdir(tmp_path)
        assert value("org/name") == 2.0 and value("org/name", revision="v1") == 1.0
    with pytest.raises(errors.CheckpointNotFoundError, match=r"no snapshot for revision 'v2' \(refs: main, v1"):
        value("org/name", revision="v2")
    with pytest.raises(
        errors.CheckpointNotFoundError, match="not in the local Hugging Face cache .* downloads nothing"
    ):
        value("org/other")


def test_missing_config_is_fine_when_the_adapter_is_given(tmp_path: Path) -> None:
    ckpt = _plain(tmp_path / "c", {"w": torch.ones(2)})
    (ckpt / "config.json").unlink()
    with VirtualStateDict(ckpt, adapter=CATCH_ALL) as vsd:
        assert vsd["w"].materialize().equal(torch.ones(2))
    with pytest.raises(errors.CheckpointNotFoundError, match="pass adapter="):
        VirtualStateDict(ckpt)


# ---------------------------------------------------------------------------------------------
# papercuts


def test_progress_on_a_small_load_ends_at_every_tensor(tiny: Path) -> None:
    stream = io.StringIO()
    with VirtualStateDict(tiny) as vsd:
        from lazysd.progress import ProgressPrinter

        printer = vsd.reader.progress = ProgressPrinter(
            0, stream=stream, sizes={k: vsd[k].numel() * vsd[k].element_size() for k in vsd}
        )
        model = Step3p5Model(Step3p5Spec.tiny(), layout="native").float()  # a dtype other than the checkpoint's
        model.load_state_dict(vsd)
        model.load_state_dict(vsd)  # a second load reports again
        assert printer.ended
    lines = [line for line in stream.getvalue().split("\n") if line]
    finals = [line.rsplit("\r", 1)[-1] for line in lines]
    assert len(finals) == 2 and all(f"(100.0%), {len(vsd)} tensors" in f and "KiB" in f for f in finals), finals


def test_lazysd_load_checks_shapes_before_overwriting_anything(tiny: Path) -> None:
    spec = Step3p5Spec.tiny()
    model = Step3p5Model(spec, layout="native")
    wrong = "model.layers.1.moe.experts.down_projs"
    parent, leaf = wrong.rsplit(".", 1)
    shape = list(model.get_parameter(wrong).shape)
    model.get_submodule(parent).register_parameter(
        leaf, torch.nn.Parameter(torch.zeros(shape[0] + 1, *shape[1:], dtype=torch.bfloat16))
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.StateDictMismatchError) as e:
        lazysd.load(model, tiny)
    assert f"{wrong}: model [{shape[0] + 1}, " in str(e.value) and "nothing was read" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazysd", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )


def test_cli_version_inspect_adapter_demo_keep_and_adapter_names(tiny: Path, tmp_path: Path) -> None:
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lazysd {lazysd.__version__}"
    out = _cli("inspect", str(tiny), "--adapter", "step3p5", "--limit", "2")
    assert out.returncode == 0 and "family='step3p5'" in out.stdout
    out = _cli("convert", str(tiny), str(tmp_path / "x"), "--adapter", "nope")
    assert (
        out.returncode == 2
        and "invalid choice: 'nope'" in out.stderr
        and "deepseek_v3" in out.stderr
        and "step3p5" in out.stderr
    )
    assert "deepseek_v3" in _cli("convert", "--help").stdout
    keep = tmp_path / "demo"
    assert _cli("demo", "--keep", str(keep)).returncode == 0
    out = _cli("demo", "--keep", str(keep))
    assert (
        out.returncode == 2
        and out.stderr.startswith(f"lazysd: error: {keep} exists and is not an empty directory")
        and "Traceback" not in out.stderr
    )


def test_print_of_a_value_shows_metadata_and_reads_nothing(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What the README says (it used to claim that printing a value materializes it):
    # print() shows metadata, print(t.materialize()) the values.
    readme = (ROOT / "README.md").read_text()
    assert "`print(t)` show metadata only" in readme and "printing values, `torch.equal`" not in readme
    with VirtualStateDict(tiny) as vsd:
        print(vsd["model.norm.weight"])
        assert capsys.readouterr().out.startswith(
            "LazyTensor(shape=[32], dtype=torch.bfloat16, key='model.norm.weight')"
        )
        assert vsd.bytes_read == 0
        print(vsd["model.norm.weight"].materialize())
        assert capsys.readouterr().out.startswith("tensor([")


def test_plots_saved_outside_jupyter_keep_legend_and_labels(tiny: Path, tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from lazysd.plot import plot_layer_bytes, plot_rank_bytes

    with VirtualStateDict(tiny) as vsd:
        for ax in (plot_layer_bytes(vsd), plot_rank_bytes(vsd.rank_plan(ep=2))):
            fig = ax.figure
            fig.savefig(tmp_path / "plot.png")  # no bbox_inches: what a script gets
            renderer, box = fig.canvas.get_renderer(), fig.bbox
            for artist in (ax.get_legend(), ax.xaxis.label, ax.yaxis.label, ax.title):
                b = artist.get_window_extent(renderer)
                assert box.x0 - 1 <= b.x0 and b.x1 <= box.x1 + 1 and box.y0 - 1 <= b.y0 and b.y1 <= box.y1 + 1, artist
            matplotlib.pyplot.close(fig)


def test_example_builds_the_model_from_the_checkpoint_config(tmp_path: Path) -> None:
    spec = Step3p5Spec.tiny(moe_num_experts=6, hidden_size=48, moe_intermediate_size=24, num_hidden_layers=3)
    ckpt = make_checkpoint(tmp_path / "other", spec, layout="split")
    env = {**ENV, "TMPDIR": str(tmp_path)}
    out = torchrun(ROOT / "examples" / "load_expert_parallel.py", "--ckpt", str(ckpt), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        out.stdout.count("<All keys matched successfully>") == 2 and "experts (3, 48, 48) of (6, 48, 48)" in out.stdout
    )


def _dtensor_in_place(rank: int, world: int, path: str) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    with VirtualStateDict(path, mesh) as vsd:
        t = vsd["model.layers.1.moe.experts.down_projs"]
        before = t.to_local().materialize()
        refused = []
        for op in (lambda: t.add_(1), lambda: t.zero_(), lambda: t.mul_(2)):
            try:
                op()
            except errors.ReadOnlyTensorError:
                refused.append("refused")
        assert torch.equal(t.to_local().materialize(), before)
        return refused


def test_in_place_ops_on_dtensor_values_are_refused(tiny: Path) -> None:
    from tests.support.dist import run_ranks

    assert run_ranks(_dtensor_in_place, 2, args=(str(tiny),)) == [["refused"] * 3] * 2


def test_absurd_rank_counts_in_dry_runs_are_refused_at_once(tiny: Path) -> None:
    # One row per rank: ep=10**9 used to loop for hours.
    out = _cli("inspect", str(tiny), "--ep", str(10**9), timeout=60)
    assert (
        out.returncode == 2
        and "ep=1000000000 x ep_shard=1 is 1000000000 ranks; a dry run covers at most 65536" in out.stderr
    )
    with VirtualStateDict(tiny) as vsd, pytest.raises(errors.PlacementError, match="a dry run covers at most"):
        vsd.explain("model.layers.1.moe.experts.down_projs", ep=10**9)


def test_shape_only_ops_read_nothing(tiny: Path) -> None:
    # Siblings of the meta destination: results that use a value's shape, never its data.
    with VirtualStateDict(tiny) as vsd:
        t = vsd["model.layers.1.moe.experts.down_projs"]
        for op in (
            torch.empty_like,
            torch.zeros_like,
            lambda t: torch.full_like(t, 2),
            lambda t: t.new_zeros(3),
            lambda t: t.to("meta"),
            lambda t: t.to(device="meta"),
        ):
            out = op(t)
            assert type(out) is torch.Tensor and vsd.bytes_read == 0
        assert torch.zeros_like(t).eq(0).all() and torch.zeros_like(t).shape == t.shape and t.to("meta").is_meta
        assert t.to(torch.float32).equal(t.materialize().float()) and vsd.bytes_read > 0
