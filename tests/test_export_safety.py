"""Export safety: interrupted and concurrent exports, full disks, meta and device tensors,
and a config.json that describes exactly the tensors written. Kills and races use real
processes, paused at a named phase by wrapping that phase's function in the child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lazysd import ExportError, VirtualStateDict, save_hf
from lazysd.export import ExportLock, Stage, plan_files
from lazysd.export.save import CHUNK_BYTES
from lazysd.export.stage import recover
from lazysd.testing import Step3p5Model, Step3p5Spec, load_hf_tensors, make_checkpoint
from lazysd.testing.checks import assert_bitwise_equal

SPEC = Step3p5Spec.tiny()

# The child exports src -> out and, at phase POINT, touches MARKER and waits for MARKER.go.
PAUSE_SCRIPT = textwrap.dedent(
    """
    import json, pathlib, sys, time
    import torch
    import lazysd.export.stage as stage
    from lazysd import VirtualStateDict, save_hf

    src, out, marker, point, opts = sys.argv[1:6]
    opts = json.loads(opts)

    def pause():
        pathlib.Path(marker).touch()
        go = pathlib.Path(marker + ".go")
        for _ in range(1200):
            if go.exists():
                return
            time.sleep(0.05)
        sys.exit("never released")

    def wrap(owner, name, *, nth=1, before=False):
        orig, calls = getattr(owner, name), [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if before and calls[0] == nth:
                pause()
            result = orig(*args, **kwargs)
            if not before and calls[0] == nth:
                pause()
            return result
        setattr(owner, name, wrapped)

    if point == "write":          # halfway through writing the staged shards
        wrap(stage.Stage, "write", nth=40)
    elif point == "carry":        # overwrite: one kept file linked into the stage, the rest not yet
        wrap(stage, "_link_or_copy")
    elif point == "switch":       # stage complete, index written, not yet switched in
        wrap(stage, "_switch", before=True)
    elif point == "exchanged":    # switched in; the old contents not yet removed
        wrap(stage, "_exchange_entries")
    elif point == "aside":        # no atomic exchange here: old renamed aside, stage not yet in
        stage._exchange_entries = lambda a, b: False
        wrap(stage, "_rename_aside")
    if "dtype" in opts:
        opts["dtype"] = getattr(torch, opts["dtype"])
    with VirtualStateDict(src, include_mtp=True) as vsd:
        save_hf(vsd, out, **opts)
    print("exported", flush=True)
    """
)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("src") / "step3p5", SPEC, layout="split")


OLD = {"max_shard_size": "40KB"}  # many shards
NEW = {"dtype": "float32", "overwrite": True}  # one shard, other bytes


@pytest.fixture(scope="module")
def refs(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """The exact files of the old and the new export, made without interruption."""
    base = tmp_path_factory.mktemp("refs")
    out = {}
    with VirtualStateDict(src, include_mtp=True) as vsd:
        for name, opts in (("old", OLD), ("new", NEW)):
            opts = {k: (getattr(torch, v) if k == "dtype" else v) for k, v in opts.items()}
            path = save_hf(vsd, base / name, **opts)
            (path / "README.md").write_text("keep me\n")
            out[name] = files_of(path)
    return out


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def which(out: Path, refs: dict[str, dict[str, bytes]]) -> str:
    """'old' or 'new' when ``out`` is exactly that export; fails on anything else."""
    got = files_of(out)
    for name, files in refs.items():
        if got == files:
            return name
    raise AssertionError(f"{out} is neither the old nor the new export: {sorted(got)}")


def start(src: Path, out: Path, marker: Path, point: str, opts: dict[str, object]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSE_SCRIPT, str(src), str(out), str(marker), point, json.dumps(opts)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the export ended before reaching {point!r}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"no pause at {point!r}"
        time.sleep(0.02)
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def make_old(src: Path, out: Path) -> None:
    with VirtualStateDict(src, include_mtp=True) as vsd:
        save_hf(vsd, out, **OLD)  # type: ignore[arg-type]
    (out / "README.md").write_text("keep me\n")


@pytest.mark.parametrize(("point", "left"), [("write", "old"), ("carry", "old"), ("switch", "old"), ("exchanged", "new")])
def test_sigkill_during_replace_leaves_the_old_or_the_new_export(src: Path, refs: dict[str, dict[str, bytes]], tmp_path: Path, point: str, left: str) -> None:
    out = tmp_path / "out"
    make_old(src, out)
    kill(start(src, out, tmp_path / "marker", point, NEW))
    assert which(out, refs) == left
    assert hidden(tmp_path)  # the killed export's staging directory (or the old contents)
    # The next export into the directory removes what the killed one left and replaces it.
    with VirtualStateDict(src, include_mtp=True) as vsd:
        save_hf(vsd, out, dtype=torch.float32, overwrite=True)
    assert which(out, refs) == "new"
    assert hidden(tmp_path) == []


def test_sigkill_between_the_fallback_renames_is_rolled_back(src: Path, refs: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    """Where directories cannot be exchanged atomically (NFS), the old one is renamed aside
    first: killed right then, the output directory is absent (never mixed), and the next
    export into it (or :func:`recover` under the lock) puts the old one back."""
    out = tmp_path / "out"
    make_old(src, out)
    kill(start(src, out, tmp_path / "marker", "aside", NEW))
    assert not out.exists()
    (aside,) = [p for p in tmp_path.iterdir() if ".lazysd-old-" in p.name]
    assert files_of(aside) == refs["old"]
    with ExportLock(out):
        recover(out)
    assert which(out, refs) == "old"
    assert hidden(tmp_path) == []


def test_fresh_export_killed_while_writing_leaves_no_output(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kill(start(src, out, tmp_path / "marker", "write", {}))
    assert not out.exists()
    lock, staged = hidden(tmp_path)  # a killed holder's lock file stays, unlocked (flock dies with it)
    assert staged.startswith(".out.lazysd-stage-") and lock == ".out.lazysd-lock"
    with VirtualStateDict(src, include_mtp=True) as vsd:
        save_hf(vsd, out)
    assert hidden(tmp_path) == [] and (out / "model.safetensors.index.json").exists()


def test_a_second_export_into_the_same_directory_is_refused(src: Path, refs: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "marker"
    first = start(src, out, marker, "write", NEW)  # holds the directory, paused mid-write
    try:
        second = subprocess.run(
            [sys.executable, "-c", PAUSE_SCRIPT, str(src), str(out), str(tmp_path / "m2"), "none", json.dumps(OLD | {"overwrite": True})],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0
        assert "lazysd.errors.ExportError" in second.stderr and "another export into this directory is running (pid" in second.stderr
        (marker.parent / (marker.name + ".go")).touch()
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    got = files_of(out)
    assert got == {k: v for k, v in refs["new"].items() if k != "README.md"}
    assert hidden(tmp_path) == []


def test_lock_excludes_threads_of_one_process_and_is_released(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ExportLock(out):
        with pytest.raises(ExportError, match=r"another export into this directory is running \(this process"):
            ExportLock(out).__enter__()
    with ExportLock(out):  # released: free again, and the lock file is gone afterwards
        pass
    assert list(tmp_path.iterdir()) == []


def test_stages_racing_into_a_new_directory_commit_once(tmp_path: Path) -> None:
    """Without the lock (a filesystem without locks), two exports still never mix: the
    second commit into a directory the first created fails whole."""
    out = tmp_path / "out"
    layout = plan_files([("w", torch.float32, (2, 2))], "5GB")
    stages = [Stage(out, layout, token=t) for t in ("a", "b")]
    for i, stage in enumerate(stages):
        stage.create()
        stage.write("w", (0, 0), torch.full((2, 2), float(i)))
    stages[0].commit()
    with pytest.raises(ExportError, match="another export wrote this directory meanwhile"):
        stages[1].commit()
    stages[1].abort()
    assert load_hf_tensors(out)["w"].eq(0).all()
    assert hidden(tmp_path) == []


# ---- full disks ------------------------------------------------------------------------------

FSIZE_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from lazysd import VirtualStateDict, save_hf
    from lazysd.errors import ExportError
    src, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the limit is an EFBIG error, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    with VirtualStateDict(src, include_mtp=True) as vsd:
        try:
            save_hf(vsd, out)
        except ExportError as e:
            print(e)
    """
)


def test_file_size_limit_is_an_export_error_naming_the_file(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(src), str(out), "65536"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "model-00001-of-00001.safetensors" in run.stdout and "[Errno 27] File too large" in run.stdout, run.stdout
    assert "(a file size limit, ulimit -f, was reached)" in run.stdout
    assert not out.exists() and hidden(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # noqa: ANN201
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root; the file-size-limit test covers the same path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_an_export_error_and_keeps_the_old_export(src: Path, small_tmpfs: Path) -> None:
    out = small_tmpfs / "out"
    with VirtualStateDict(src, include_mtp=True) as vsd:
        save_hf(vsd, out, max_shard_size="40KB", dtype=torch.bfloat16)  # fits once ...
        old = files_of(out)
        with pytest.raises(ExportError, match=r"model-00001-of-00001\.safetensors.*\[Errno 28\] No space left on device \(the disk or quota is full\)"):
            save_hf(vsd, out, dtype=torch.float32, overwrite=True)  # ... not twice, and not as fp32
    assert files_of(out) == old
    assert hidden(small_tmpfs) == []


# ---- meta and device tensors -----------------------------------------------------------------


class OtherDevice(torch.Tensor):
    """A CPU tensor that behaves as if it lived on an accelerator: no ``.numpy()``, and every
    ``.cpu()`` copy is recorded, to check that export copies one bounded slice at a time."""

    copies: list[int] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert accel:0 device type tensor to numpy. Use Tensor.cpu() first")
        if func is torch.Tensor.cpu:
            OtherDevice.copies.append(args[0].numel() * args[0].element_size())
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone().as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)  # what a GPU tensor reports


def test_device_tensors_are_copied_one_bounded_slice_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lazysd.export.save as save

    monkeypatch.setattr(save, "CHUNK_BYTES", 4096)  # small chunks for a small model
    model = Step3p5Model(SPEC, layout="native")
    plain = model.state_dict()
    OtherDevice.copies = []
    on_device = {k: v.detach().as_subclass(OtherDevice) for k, v in plain.items()}
    assert on_device["lm_head.weight"].device.type == "cuda"
    out = save_hf(on_device, tmp_path / "dev", adapter="step3p5")
    ref = save_hf(plain, tmp_path / "cpu", adapter="step3p5")
    assert files_of(out) == files_of(ref)
    assert OtherDevice.copies and max(OtherDevice.copies) <= 4096
    assert sum(OtherDevice.copies) == sum(v.numel() * v.element_size() for v in load_hf_tensors(ref).values())


def test_chunk_boxes_bound_every_slice() -> None:
    from lazysd.export.save import chunk_boxes

    for shape, itemsize, limit in [((3, 5, 7), 2, 20), ((1, 100), 4, 16), ((9,), 8, 8), ((), 4, 1), ((4, 0, 3), 2, 8)]:
        seen = torch.zeros(shape, dtype=torch.int32)
        for offset, sizes in chunk_boxes(shape, itemsize, limit):
            assert itemsize * max(1, int(torch.tensor(sizes).prod())) <= max(limit, itemsize)
            seen[tuple(slice(o, o + n) for o, n in zip(offset, sizes))] += 1
        assert seen.eq(1).all()  # every element exactly once
    assert CHUNK_BYTES == 64 * 2**20


# ---- config.json describes what was written --------------------------------------------------


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lazysd.testing import families

    return families.make_family_checkpoint(tmp_path_factory.mktemp("fp8") / "dsv3", families.FamilySpec.tiny("deepseek_v3", fp8=True))


def test_dequantized_fp8_export_drops_quantization_config(fp8_src: Path, tmp_path: Path) -> None:
    with VirtualStateDict(fp8_src, include_mtp=True) as vsd:
        out = save_hf(vsd, tmp_path / "bf16", config=fp8_src / "config.json")
    config = json.loads((out / "config.json").read_text())
    source = json.loads((fp8_src / "config.json").read_text())
    assert "quantization_config" in source and "quantization_config" not in config
    assert config == {k: v for k, v in source.items() if k != "quantization_config"}
    tensors = load_hf_tensors(out)
    assert not [k for k in tensors if k.endswith("_scale_inv")]
    assert {t.dtype for t in tensors.values()} <= {torch.bfloat16, torch.float32}


def test_fp8_keep_roundtrips_weights_and_scales_bitwise(fp8_src: Path, tmp_path: Path) -> None:
    with VirtualStateDict(fp8_src, include_mtp=True, fp8="keep") as vsd:
        assert any(k.endswith("_scale_inv") for k in vsd)
        out = save_hf(vsd, tmp_path / "fp8", config=fp8_src / "config.json", dtype=torch.bfloat16)
    assert_bitwise_equal(load_hf_tensors(out), load_hf_tensors(fp8_src))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8_src / "config.json").read_text())["quantization_config"]
    assert config["torch_dtype"] == "bfloat16"


def test_main_model_only_export_sets_mtp_layers_to_zero(fp8_src: Path, tmp_path: Path) -> None:
    source = json.loads((fp8_src / "config.json").read_text())
    assert source["num_nextn_predict_layers"] == 1
    with VirtualStateDict(fp8_src, include_mtp=True) as vsd:
        with_mtp = save_hf(vsd, tmp_path / "mtp", config=fp8_src / "config.json")
        main_only = {k: vsd[k] for k in vsd if not k.startswith("mtp.")}
        without = save_hf(main_only, tmp_path / "main", adapter=vsd.adapter, config=fp8_src / "config.json")
    assert json.loads((with_mtp / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert json.loads((without / "config.json").read_text())["num_nextn_predict_layers"] == 0
    with VirtualStateDict(without) as vsd:  # loads back, and says it has no MTP layers
        assert not [k for k in vsd if "mtp" in k]


def test_config_without_contradictions_is_copied_byte_for_byte(src: Path, tmp_path: Path) -> None:
    text = (src / "config.json").read_text()
    with VirtualStateDict(src, include_mtp=True) as vsd:
        out = save_hf(vsd, tmp_path / "out", config=src / "config.json")
    assert (out / "config.json").read_text() == text
    with pytest.raises(ExportError, match=r"config .*nope\.json: cannot be read"):
        save_hf({"lm_head.weight": torch.ones(2, 2)}, tmp_path / "x", adapter="step3p5", config=tmp_path / "nope.json")
    assert not (tmp_path / "x").exists()
