"""Export safety: interrupted and concurrent exports, full disks, meta and device tensors,
and a config.json that describes exactly the tensors written. Kills and races use real
processes, paused at a named phase by wrapping that phase's function in the child."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lazysd import ExportError, VirtualStateDict, save_hf
from lazysd.export import ExportLock, Stage, plan_files
from lazysd.export.save import CHUNK_BYTES
from lazysd.export.stage import recover
from lazysd.testing import Step3p5Model, Step3p5Spec, load_hf_tensors, make_checkpoint
from tests.support.checks import assert_bitwise_equal

SPEC = Step3p5Spec.tiny()

# Children forked from a server that imported torch and lazysd once (as tests.support.dist's
# ranks are): a kill test costs a fork, not a fresh interpreter importing torch.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed.tensor", "lazysd", "lazysd.testing", "pytest"])
CTX = multiprocessing.get_context("forkserver")


def _pause(marker: str) -> None:
    Path(marker).touch()
    go = Path(marker + ".go")
    for _ in range(2400):
        if go.exists():
            return
        time.sleep(0.05)
    raise SystemExit("never released")


def _wrap(owner: object, name: str, marker: str, *, nth: int = 1, before: bool = False) -> None:
    orig, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == nth:
            _pause(marker)
        result = orig(*args, **kwargs)
        if not before and calls[0] == nth:
            _pause(marker)
        return result

    setattr(owner, name, wrapped)


def _child(src: str, out: str, marker: str, point: str, opts: dict[str, object]) -> None:
    """Export src -> out; at phase ``point`` touch ``marker`` and wait for ``marker.go``.
    Writes how it ended to ``marker.result``, and every thread's stack to ``marker.stacks``
    on SIGUSR1 (where a child does not end, the test says where it is)."""
    import faulthandler

    from lazysd.export import stage

    faulthandler.register(signal.SIGUSR1, file=open(marker + ".stacks", "w"), all_threads=True)  # noqa: SIM115
    # Ctrl-C as in a program run from a terminal. A process started in the background by a
    # shell without job control (a CI script's `cmd &`) inherits SIGINT ignored, and so did
    # these children through the fork server: the test's SIGINT did nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if point == "write":  # halfway through writing the staged shards
        _wrap(stage.Stage, "write", marker, nth=40)
    elif point == "carry":  # overwrite: one kept file linked into the stage, the rest not yet
        _wrap(stage, "_link_or_copy", marker)
    elif point == "switch":  # stage complete, index written, not yet switched in
        _wrap(stage, "_switch", marker, before=True)
    elif point == "exchanged":  # switched in; the old contents not yet removed
        _wrap(stage, "_exchange_entries", marker)
    elif point == "aside":  # no atomic exchange here: old renamed aside, stage not yet in
        stage._exchange_entries = lambda a, b: False
        _wrap(stage, "_rename_aside", marker)
    opts = {k: (getattr(torch, v) if k == "dtype" else v) for k, v in opts.items()}
    try:
        with VirtualStateDict(src, include_mtp=True) as vsd:
            save_hf(vsd, out, **opts)  # type: ignore[arg-type]
        outcome = "exported"
    except BaseException as e:  # noqa: BLE001 - reported to the test
        outcome = f"{type(e).__name__}: {e}"
    Path(marker + ".result").write_text(outcome)


class Child:
    """An export in its own process, paused at ``point``."""

    def __init__(self, src: Path, out: Path, marker: Path, point: str, opts: dict[str, object]) -> None:
        self.marker = marker
        self.proc = CTX.Process(target=_child, args=(str(src), str(out), str(marker), point, opts))
        self.proc.start()
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert self.proc.is_alive(), f"the export ended before reaching {point!r}: {self.result()}"
            assert time.monotonic() < deadline, f"no pause at {point!r}"
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def release(self) -> None:
        Path(str(self.marker) + ".go").touch()

    def result(self) -> str:
        self.proc.join(60)
        path = Path(str(self.marker) + ".result")
        if path.exists():
            return path.read_text()
        if self.proc.is_alive():  # still running a minute on: where each of its threads is
            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(1)
            stacks = Path(str(self.marker) + ".stacks").read_text()
            self.proc.kill()
            return f"no result after 60 s, its threads:\n{stacks}"
        return f"no result, exit code {self.proc.exitcode}"


def start(src: Path, out: Path, marker: Path, point: str, opts: dict[str, object]) -> Child:
    return Child(src, out, marker, point, opts)


def kill(child: Child) -> None:
    child.signal(signal.SIGKILL)
    child.proc.join(10)


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


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def make_old(src: Path, out: Path) -> None:
    with VirtualStateDict(src, include_mtp=True) as vsd:
        save_hf(vsd, out, **OLD)  # type: ignore[arg-type]
    (out / "README.md").write_text("keep me\n")


@pytest.mark.parametrize(
    ("point", "left"), [("write", "old"), ("carry", "old"), ("switch", "old"), ("exchanged", "new")]
)
def test_sigkill_during_replace_leaves_the_old_or_the_new_export(
    src: Path, refs: dict[str, dict[str, bytes]], tmp_path: Path, point: str, left: str
) -> None:
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


def test_ctrl_c_during_replace_cleans_up_and_keeps_the_old_export(
    src: Path, refs: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    make_old(src, out)
    child = start(src, out, tmp_path / "marker", "write", NEW)
    child.signal(signal.SIGINT)
    assert child.result() == "KeyboardInterrupt: "
    assert which(out, refs) == "old"
    assert hidden(tmp_path) == []  # staging directory removed and lock released on the way out


def test_sigkill_between_the_fallback_renames_is_rolled_back(
    src: Path, refs: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
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


def test_a_second_export_into_the_same_directory_is_refused(
    src: Path, refs: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    out, marker = tmp_path / "out", tmp_path / "marker"
    first = start(src, out, marker, "write", NEW)  # holds the directory, paused mid-write
    try:
        busy = rf"{out}: another export into this directory is running \(pid {first.proc.pid} on "
        with VirtualStateDict(src, include_mtp=True) as vsd, pytest.raises(ExportError, match=busy):
            save_hf(vsd, out, overwrite=True)
        first.release()
        assert first.result() == "exported"
    finally:
        first.proc.kill()
    got = files_of(out)
    assert got == {k: v for k, v in refs["new"].items() if k != "README.md"}
    assert hidden(tmp_path) == []


def test_lock_excludes_threads_of_one_process_and_is_released(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with (
        ExportLock(out),
        pytest.raises(ExportError, match=r"another export into this directory is running \(this process"),
    ):
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


def _fsize_child(src: str, out: str, limit: int, result: str) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the limit is an EFBIG error, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        with VirtualStateDict(src, include_mtp=True) as vsd:
            save_hf(vsd, out)
        outcome = "exported"
    except ExportError as e:
        outcome = str(e)
    Path(result).write_text(outcome)


def test_file_size_limit_is_an_export_error_naming_the_file(src: Path, tmp_path: Path) -> None:
    out, result = tmp_path / "out", tmp_path / "result"
    child = CTX.Process(target=_fsize_child, args=(str(src), str(out), 65536, str(result)))
    child.start()
    child.join(60)
    message = result.read_text()
    assert "model-00001-of-00001.safetensors" in message and "[Errno 27] File too large" in message, message
    assert "(a file size limit, ulimit -f, was reached)" in message
    assert not out.exists() and hidden(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, check=False
        ).returncode
    ):
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
        with pytest.raises(
            ExportError,
            match=r"model-00001-of-00001\.safetensors.*\[Errno 28\] "
            r"No space left on device \(the disk or quota is full\)",
        ):
            save_hf(vsd, out, dtype=torch.float32, overwrite=True)  # ... not twice, and not as fp32
    assert files_of(out) == old
    assert hidden(small_tmpfs) == []
    with pytest.raises(
        ExportError, match=r"mnt: is a mount point; export into a directory inside it \(e\.g\. .*mnt/model\)"
    ):
        save_hf({"lm_head.weight": torch.ones(2, 2)}, small_tmpfs, adapter="step3p5", overwrite=True)


# ---- meta and device tensors -----------------------------------------------------------------


class OtherDevice(torch.Tensor):
    """A CPU tensor that behaves as if it lived on an accelerator: no ``.numpy()``, and every
    ``.cpu()`` copy is recorded, to check that export copies one bounded slice at a time."""

    copies: ClassVar[list[int]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
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
    from lazysd.export import save

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

    return families.make_family_checkpoint(
        tmp_path_factory.mktemp("fp8") / "dsv3", families.FamilySpec.tiny("deepseek_v3", fp8=True)
    )


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


def test_symlinked_output_directory_is_replaced_behind_its_link(src: Path, tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "README.md").write_text("keep me\n")
    link.symlink_to(real)
    with VirtualStateDict(src, include_mtp=True) as vsd:
        assert save_hf(vsd, link, overwrite=True) == link
    assert link.is_symlink() and (real / "model.safetensors.index.json").exists()
    assert (real / "README.md").read_text() == "keep me\n"
    assert hidden(tmp_path) == []


def test_writer_errors_are_lazysd_errors(tmp_path: Path) -> None:
    from lazysd.errors import LazySDError, WriterError
    from lazysd.writer import SafetensorsWriter

    writer = SafetensorsWriter(tmp_path / "a.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(WriterError, match=r"1 key\(s\) not fully written") as info:
        writer.commit()
    assert isinstance(info.value, LazySDError) and isinstance(info.value, ValueError)
    with pytest.raises(WriterError, match="already committed or aborted"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_stage_write_refuses_blocks_outside_their_tensor(tmp_path: Path) -> None:
    stage = Stage(tmp_path / "out", plan_files([("w", torch.float32, (2, 3))], "5GB"), token="t")
    stage.create()
    with pytest.raises(
        ExportError, match=r"'w': a block of shape \[2, 2\] at \[1, 0\] is not inside its shape \[2, 3\]"
    ):
        stage.write("w", (1, 0), torch.zeros(2, 2))
    with pytest.raises(ExportError, match=r"'v': not a tensor of this export's layout"):
        stage.write("v", (0,), torch.zeros(1))
    with pytest.raises(ExportError, match=r"'w': block of dtype torch.bfloat16, the file holds torch.float32"):
        stage.write("w", (0, 0), torch.zeros(2, 3, dtype=torch.bfloat16))
    stage.abort()
    assert list(tmp_path.iterdir()) == []


def test_main_model_only_module_export_fixes_the_copied_config(src: Path, tmp_path: Path) -> None:
    model = Step3p5Model(SPEC, layout="native")  # a main-model-only module: no MTP layers
    out = save_hf(model, tmp_path / "out", adapter="step3p5", config=src / "config.json")
    config = json.loads((out / "config.json").read_text())
    assert (
        json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == SPEC.num_nextn_predict_layers > 0
    )
    assert config["num_nextn_predict_layers"] == 0
    assert (
        max(int(k.split(".")[2]) for k in load_hf_tensors(out) if k.startswith("model.layers."))
        == SPEC.num_hidden_layers - 1
    )
