"""torch.distributed.checkpoint load benchmark: lazysd's HFReader beside torch's HuggingFaceStorageReader.

    python benchmarks/bench_dcp.py [--size 1e9] [--world 2 4] [--layout rows cols] [--runs 3] [--dir /tmp/lazysd-bench]

Generates a Flash-shaped Step3p5 bf16 checkpoint of about ``--size`` bytes once. For each world
size and layout, gloo ranks on this machine (CPU processes) ``dcp.load`` the same sharded state
dict on a ("dp", "ep") mesh: matrices ``Shard(0)`` over every rank (FSDP), vectors whole on
every rank, and routed experts

* ``rows``: ``Shard(0)`` over both dims: each rank holds a range of whole experts (EP, with
  FSDP also splitting the expert dim), contiguous bytes on disk;
* ``cols``: native ``[E, D, 2I]`` / ``[E, I, D]`` ``Shard(1)`` over dp and ``Shard(0)`` over
  ep (what FSDP2 makes of expert-parallel experts in NeMo Automodel), which is ``Shard(2)``
  of HF ``[E, out, in]`` (as ``to_hf`` maps it): every expert row is split in two.

Three readers load it:

* ``torch``: ``HuggingFaceStorageReader`` into the HF-keyed state dict (it reads through
  safetensors' mmap, a slice per read item);
* ``lazysd hf``: ``HFReader(path, native=False)`` into the same HF-keyed state dict;
* ``lazysd native``: ``HFReader(path)`` into the native state dict (grouped experts, what a
  native model's ``state_dict()`` holds; no ``to_hf``/``from_hf`` afterwards).

Per rank: bytes the load pulled from disk (pages of the checkpoint files in the page cache
after this rank's reads, every file evicted first; the header page aside), the ideal (bytes of
this rank's shards), time of ``read_data`` alone, and peak RSS above the process before
``dcp.load`` (VmHWM; the state dict is allocated before). Ranks take turns inside
``read_data`` (a barrier per turn), so each is timed and counted alone on a cold cache; the
rest of ``dcp.load`` (metadata, planning) runs as usual. Medians of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lazysd and tests.support from this checkout

READERS = ("torch", "lazysd hf", "lazysd native")


def _placed(shape: tuple[int, ...], dtype: Any, mesh: Any, placements: list[Any] | None) -> Any:
    import torch
    from torch.distributed.tensor import DTensor

    from lazysd.distributed import Target, contiguous_stride, local_box_of

    if placements is None:
        return torch.zeros(shape, dtype=dtype)  # touched now, so the peak below is the reader's own
    box = local_box_of(shape, Target(mesh, tuple(placements)))
    local = torch.zeros([h - l for l, h in box], dtype=dtype)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=contiguous_stride(shape))


def _placements(key: str, shape: tuple[int, ...], layout: str) -> list[Any] | None:
    from torch.distributed.tensor import Shard

    hf_expert = ".moe." in key and key.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    if ".moe.experts." in key or hf_expert:
        if layout == "rows":  # expert ranges over every rank: whole experts, contiguous bytes
            return [Shard(0), Shard(0)]
        # cols: native [E, D, 2I] / [E, I, D] Shard(1) over dp (FSDP2's choice for EP experts),
        # which is Shard(2) of HF [E, out, in] (as to_hf maps it): the same regions.
        return [Shard(2) if hf_expert else Shard(1), Shard(0)]
    if len(shape) >= 2:
        return [Shard(0), Shard(0)]
    return None


class _Turns:
    """Wraps a StorageReader: ranks run ``read_data`` one at a time, cold, and are measured."""

    def __init__(self, inner: Any, files: list[Path]) -> None:
        self.inner, self.files = inner, files
        self.seconds = 0.0
        self.pages = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read_data(self, plan: Any, planner: Any) -> Any:
        import torch.distributed as dist

        from tests.support.pagecache import PAGE, evict, resident_map

        fut = None
        for turn in range(dist.get_world_size()):
            dist.barrier()
            if turn == dist.get_rank():
                for f in self.files:
                    evict(f)
                t0 = time.perf_counter()
                fut = self.inner.read_data(plan, planner)
                fut.wait()
                self.seconds = time.perf_counter() - t0
                self.pages = sum(sum(resident_map(f)[1:]) for f in self.files) * PAGE
        dist.barrier()
        return fut


def _rank(rank: int, world: int, path: str, size: float, which: str, layout: str) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.storage import StorageReader
    from torch.distributed.device_mesh import init_device_mesh

    from lazysd.dcp import HFReader
    from lazysd.testing import Step3p5Model, Step3p5Spec
    from tests.support.measure import PeakRSS

    mesh = init_device_mesh("cpu", (2, world // 2) if world > 1 else (1, 1), mesh_dim_names=("dp", "ep"))
    native = which == "lazysd native"
    model = Step3p5Model(Step3p5Spec.sized(int(size)), layout="native" if native else "hf", dtype=torch.bfloat16, device="meta")
    sd = {k: _placed(tuple(v.shape), v.dtype, mesh, _placements(k, tuple(v.shape), layout)) for k, v in model.state_dict().items()}
    ideal = sum(getattr(t, "_local_tensor", t).nbytes for t in sd.values())
    inner: StorageReader = {
        "torch": lambda: HuggingFaceStorageReader(path),
        "lazysd hf": lambda: HFReader(path, native=False),
        "lazysd native": lambda: HFReader(path),
    }[which]()
    files = sorted(Path(path).glob("*.safetensors"))
    reader = _Turns(inner, files)
    with PeakRSS(sample_s=None) as peak:
        dcp.load(sd, storage_reader=reader)  # type: ignore[arg-type]
    counted = inner.bytes_read if isinstance(inner, HFReader) else None
    return {"pages": reader.pages, "ideal": ideal, "read_s": reader.seconds, "peak": peak.total, "counted": counted}


def main() -> None:
    from lazysd.testing import Step3p5Spec, checkpoint_nbytes, ensure_checkpoint
    from tests.support.dist import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1e9)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layout", nargs="+", default=["rows", "cols"], choices=["rows", "cols"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/lazysd-bench")
    args = parser.parse_args()
    try:
        import safetensors  # noqa: F401  (torch's reader needs it; lazysd depends on it anyway)
    except ImportError:
        print("torch's HuggingFaceStorageReader needs the safetensors package: skipped")
        return

    spec = Step3p5Spec.sized(int(args.size))
    path = ensure_checkpoint(Path(args.dir) / f"dcp-{args.size:.0e}", spec, verbose=True)
    total = checkpoint_nbytes(spec)
    print(f"## {path}: {total / 2**30:.2f} GiB bf16, {spec.moe_num_experts} experts x {len(spec.moe_layers)} MoE layers; medians of {args.runs} runs\n")
    print("| world | experts | reader | rank | bytes from disk | ideal | disk/ideal | read_data s | vs torch | peak RSS above state dict MiB |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for world in args.world:
        for layout in args.layout:
            medians: dict[str, list[dict[str, float]]] = {}
            for which in READERS:
                runs = [run_ranks(_rank, world, (str(path), args.size, which, layout), timeout=1800) for _ in range(args.runs)]
                medians[which] = [
                    {k: statistics.median(r[rank][k] for r in runs) for k in ("pages", "ideal", "read_s", "peak")} for rank in range(world)
                ]
                counted = [r[0]["counted"] for r in runs]
                assert len(set(counted)) == 1, counted  # lazysd reads the same bytes every run
            for which in READERS:
                for rank, m in enumerate(medians[which]):
                    ratio = m["read_s"] / medians["torch"][rank]["read_s"]
                    print(
                        f"| {world} | {layout} | {which} | {rank} | {m['pages']:,.0f} | {m['ideal']:,.0f} | "
                        f"{m['pages'] / m['ideal']:.4f} | {m['read_s']:.2f} | {ratio:.2f}x | {m['peak'] / 2**20:.0f} |"
                    )

if __name__ == "__main__":
    main()
