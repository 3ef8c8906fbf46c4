"""GPU check: CUDA loads measured against the copy engine and the CUDA peers, bitwise checked.

    python benchmarks/gpu_check.py [--size 4e9] [--dir /tmp/lazysd-bench] [--out gpu.json]

Needs one CUDA GPU (NCCL for the one-rank mesh). Generates a Step3p5 bf16 checkpoint of
about ``--size`` bytes once, reads a CPU reference of every native tensor (lazysd on the CPU),
then, cold (the checkpoint's pages dropped with ``POSIX_FADV_DONTNEED`` before each method)
and warm (every file read through first):

1. ``load_state_dict(VirtualStateDict(path))`` into a model allocated on ``cuda:0``: chunks
   staged in pinned host memory, shipped with non-blocking host-to-device copies, transposed
   on the device;
2. ``load_state_dict(VirtualStateDict(path, mesh), assign=True)`` into a meta model with an
   NCCL ``ep`` mesh of one rank: expert parameters become CUDA DTensors;
3. ``safetensors.torch.load_file(f, device="cuda:0")`` per shard (HF tensors, no conversion);
4. fastsafetensors ``SafeTensorsFileLoader(device="cuda:0", nogds=True)``, if installed;

each bitwise against the CPU reference (lazysd's native tensors, or the HF tensors for the
peers), and reported as GiB/s of checkpoint bytes next to the pinned host-to-device copy
bandwidth alone (256 MiB copies; the ceiling of any loader that goes through host memory).
Then ``save_hf`` of the CUDA model (from 1) and a bitwise round trip of the export.
Prints a Markdown table; ``--out`` also writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    return [path / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]


def _evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of a (CUDA) tensor and a CPU tensor."""
    a = a.detach().cpu().contiguous()
    b = b.contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def _pinned_h2d(device: torch.device, nbytes: int = 256 << 20, repeat: int = 8) -> float:
    """GiB/s of plain pinned host-to-device copies (the copy engine alone)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * repeat / (time.perf_counter() - t0) / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=4e9)
    parser.add_argument("--dir", default="/tmp/lazysd-bench")
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    parser.add_argument("--modes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    # --device cpu runs the same steps on the CPU over gloo (no pinned copies): a dry run of
    # this script on a machine without a GPU, used by the test suite.
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine")

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lazysd import VirtualStateDict, save_hf
    from lazysd.testing import Step3p5Model, Step3p5Spec, ensure_checkpoint

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("ep",))

    spec = Step3p5Spec.sized(int(args.size))
    path = ensure_checkpoint(Path(args.dir) / f"gpu-{args.size:.0e}", spec, verbose=True)
    files = _files(path)
    with VirtualStateDict(path) as vsd:
        reference = {k: v.materialize() for k, v in vsd.items()}
        threads = vsd.reader.options.threads
    native_bytes = sum(t.nbytes for t in reference.values())
    from safetensors.torch import load_file

    hf_reference: dict[str, torch.Tensor] = {}
    for f in files:
        hf_reference.update({k: v.clone() for k, v in load_file(f).items()})
    hf_bytes = sum(t.nbytes for t in hf_reference.values())
    gpu = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()} CPU (dry run)"
    print(f"checkpoint {hf_bytes / 2**30:.2f} GiB ({native_bytes / 2**30:.2f} GiB native) on {gpu}, torch {torch.__version__}, lazysd threads={threads}")
    h2d = _pinned_h2d(device) if cuda else float("nan")
    print(f"pinned host-to-device copies alone: {h2d:.2f} GiB/s")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def check_native(model: torch.nn.Module) -> bool:
        for key, value in model.state_dict().items():
            local = value.full_tensor() if hasattr(value, "full_tensor") else value
            if not (local.device.type == device.type and _same(local, reference[key])):
                print(f"  MISMATCH {key}")
                return False
        return True

    def m_lazysd() -> tuple[float, bool, int]:
        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device=device)
        with VirtualStateDict(path) as vsd:
            s = timed(lambda: model.load_state_dict(vsd))
        ok = check_native(model)
        state["cuda_model"] = model  # exported below
        return s, ok, native_bytes

    def m_lazysd_ep() -> tuple[float, bool, int]:
        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta")
        with VirtualStateDict(path, mesh, device=device) as vsd:
            s = timed(lambda: model.load_state_dict(vsd, assign=True))
        return s, check_native(model), native_bytes

    def m_safetensors() -> tuple[float, bool, int]:
        out: dict[str, torch.Tensor] = {}
        s = timed(lambda: [out.update(load_file(f, device=str(device))) for f in files])
        return s, out.keys() == hf_reference.keys() and all(_same(out[k], v) for k, v in hf_reference.items()), hf_bytes

    def m_fastsafetensors() -> tuple[float, bool, int]:
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        out: dict[str, torch.Tensor] = {}

        def load() -> None:
            loader = SafeTensorsFileLoader(SingleGroup(), str(device), nogds=True)
            loader.add_filenames({0: [str(f) for f in files]})
            buffers = loader.copy_files_to_device()
            for k in hf_reference:
                out[k] = buffers.get_tensor(k).clone()  # owned: the loader's buffers are freed next
            buffers.close()
            loader.close()

        s = timed(load)
        return s, all(_same(out[k], v) for k, v in hf_reference.items()), hf_bytes

    methods = {
        "lazysd load_state_dict into CUDA params": m_lazysd,
        "lazysd assign=True, NCCL ep mesh (DTensor experts)": m_lazysd_ep,
        'safetensors load_file(device="cuda:0") (HF tensors)': m_safetensors,
        "fastsafetensors cuda:0, nogds (HF tensors)": m_fastsafetensors,
    }
    state: dict[str, torch.nn.Module] = {}
    rows = []
    for mode in args.modes:
        for name, fn in methods.items():
            if "fastsafetensors" in name:
                try:
                    import fastsafetensors  # noqa: F401
                except ImportError:
                    print(f"skipped {name}: fastsafetensors is not installed")
                    continue
            (_evict if mode == "cold" else _warm)(files)
            if cuda:
                torch.cuda.empty_cache()
            try:
                s, ok, nbytes = fn()
            except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
                print(f"  {mode} {name}: failed: {type(exc).__name__}: {exc}")
                rows.append({"mode": mode, "method": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rate = nbytes / s / 2**30
            rows.append({"mode": mode, "method": name, "seconds": s, "gib_s": rate, "x_h2d": rate / h2d, "bitwise": ok})
            print(f"  {mode} {name}: {s:.2f} s, {rate:.2f} GiB/s, bitwise {'yes' if ok else 'NO'}")

    export = {}
    model = state.get("cuda_model")
    if model is not None:
        out_dir = Path(args.dir) / "gpu-export"
        config = json.loads((path / "config.json").read_text())
        s = timed(lambda: save_hf(model, out_dir, adapter="step3p5", config=config, overwrite=True))
        back = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta")
        with VirtualStateDict(out_dir) as vsd:
            back.load_state_dict(vsd, assign=True)
        ok = all(_same(v, reference[k]) for k, v in back.state_dict().items())
        export = {"seconds": s, "gib_s": native_bytes / s / 2**30, "bitwise": ok}
        shutil.rmtree(out_dir, ignore_errors=True)

    print(f"\n{time.strftime('%Y-%m-%d')}, {gpu}, torch {torch.__version__}, checkpoint {hf_bytes / 2**30:.2f} GiB; "
          f"pinned host-to-device alone {h2d:.2f} GiB/s\n")
    print("| mode | method | seconds | GiB/s | x pinned H2D | bitwise |\n|---|---|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['method']} | failed: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['mode']} | {r['method']} | {r['seconds']:.2f} | {r['gib_s']:.2f} | {r['x_h2d']:.2f} | {'yes' if r['bitwise'] else 'NO'} |")
    if export:
        print(f"| - | save_hf of the CUDA model, round trip | {export['seconds']:.2f} | {export['gib_s']:.2f} | | {'yes' if export['bitwise'] else 'NO'} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "checkpoint_bytes": hf_bytes, "native_bytes": native_bytes, "threads": threads, "pinned_h2d_gib_s": h2d,
            "rows": rows, "export": export,
        }, indent=1))
    dist.destroy_process_group()
    failed = [r for r in rows if not r.get("bitwise", True) and "lazysd" in r["method"]] or (export and not export["bitwise"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
