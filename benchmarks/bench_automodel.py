"""NeMo Automodel's own Checkpointer loading a Step3p5 checkpoint: its adapter, lazysd's, and lazysd's reader.

    python benchmarks/bench_automodel.py [--size 1.5e9] [--ep 1 2 4] [--runs 3] [--dir /tmp/lazysd-bench]

Needs NeMo Automodel (``pip install nemo-automodel``); without it the benchmark prints one line
saying so and exits 0. Generates a Flash-shaped Step3p5 bf16 checkpoint (``Step3p5Spec.sized``)
under ``--dir`` once. Every rank builds Automodel's real ``Step3p5ForCausalLM`` (torch backends,
CPU), on the meta device, with its experts sharded ``Shard(0)`` over an ``ep`` mesh by
Automodel's own ``ExpertParallel`` when there are several ranks, allocates it, and calls
``Checkpointer.load_base_model``. With one rank Automodel takes its single-process route
(every tensor mapped, converted by ``from_hf``, installed), with several its DCP route
(``to_hf`` destinations, ``dcp.load`` through its ``_HuggingFaceStorageReader``, ``from_hf``).

Methods (each in fresh gloo rank processes, the methods of a round back to back):
    own     Automodel's ``Step3p5StateDictAdapter``
    swap    ``lazysd.automodel.Step3p5StateDictAdapter`` in its place (the one-import swap)
    reader  the swap plus ``lazysd.automodel.use_lazysd_reader(checkpointer)``

Reported per EP size and method, medians over ``--runs`` (page cache warm): wall time of
``load_base_model``; peak resident memory above the allocated model (VmHWM, the worst rank);
and, from one extra cold run, bytes read per rank vs ideal: the page cache is emptied of the
checkpoint and the ranks take turns (each rank's reads run alone, after an eviction), each
counting the bytes its process fetched from storage (``/proc/self/io`` ``read_bytes``, readahead
included); the ideal is the bytes of that rank's shards (lazysd's plan). The worst rank's ratio
is shown. Every load is checked bitwise against lazysd's ``VirtualStateDict`` in the cold run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lazysd and tests.support from this checkout

METHODS = {"own": "Automodel's adapter", "swap": "lazysd adapter (import swap)", "reader": "swap + use_lazysd_reader"}


def _read_bytes() -> int:
    text = Path("/proc/self/io").read_text()
    return int(text.split("read_bytes:")[1].split()[0])


def _model(path: str, method: str, mesh):
    from tests.support.automodel import automodel_step3p5

    # Zeroed: every page resident before the load, as after init.
    return automodel_step3p5(path, mesh, swap=method != "own", fill=0)


def _turns(reader, rank: int, world: int, files: list[Path], out: dict) -> None:
    """Make ``reader.read_data`` run one rank at a time from a cold cache, counting its bytes."""
    import torch.distributed as dist

    from tests.support.pagecache import evict

    original = reader.read_data

    def read_data(plan, planner):
        result = None
        for turn in range(world):
            if turn == rank:
                for f in files:
                    evict(f)
                before = _read_bytes()
                result = original(plan, planner)
                result.wait()
                out["read"] = out.get("read", 0) + _read_bytes() - before
            dist.barrier()
        return result

    reader.read_data = read_data


def _rank(rank: int, world: int, path: str, method: str, cold: bool) -> dict:
    import logging

    import torch
    import torch.distributed as dist
    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer
    from nemo_automodel.components.checkpoint.config import CheckpointingConfig
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lazysd import VirtualStateDict
    from lazysd.automodel import use_lazysd_reader
    from tests.support.measure import PeakRSS
    from tests.support.pagecache import evict

    logging.disable(logging.WARNING)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)) if world > 1 else None
    model = _model(path, method, mesh)
    config = CheckpointingConfig(
        enabled=True,
        checkpoint_dir="/tmp/lazysd-bench-automodel-unused",
        model_save_format="safetensors",
        save_consolidated=False,
    )
    checkpointer = Checkpointer(config, dp_rank=rank, tp_rank=0, pp_rank=0, moe_mesh=mesh)
    if method == "reader":
        use_lazysd_reader(checkpointer)
    files = sorted(Path(path).glob("*.safetensors"))
    out: dict = {}
    if cold:
        if world > 1:  # DCP route: the ranks' reads take turns (see the module docstring)
            make_reader = checkpointer._get_storage_reader

            def measured(*args, **kwargs):
                reader = make_reader(*args, **kwargs)
                _turns(reader, rank, world, files, out)
                return reader

            checkpointer._get_storage_reader = measured
        else:  # one process: everything it reads, from a cold cache
            for f in files:
                evict(f)
            out["before"] = _read_bytes()
    dist.barrier()
    with PeakRSS(sample_s=None) as peak:
        checkpointer.load_base_model(model, torch.device("cpu"), "/nonexistent", path)
    if not cold:
        return {"seconds": peak.seconds, "peak": peak.total}
    if world == 1:
        out["read"] = _read_bytes() - out.pop("before")
    with VirtualStateDict(path, mesh) as vsd:
        out["ideal"] = sum(n for _, _, n in vsd.planned_ranges())
        for key, value in model.state_dict().items():
            want = vsd[key]
            got = value.to_local() if isinstance(value, DTensor) else value
            want = want.to_local() if isinstance(want, DTensor) else want
            want = want.materialize() if hasattr(want, "materialize") else want
            if not torch.equal(got, want.to(got.dtype)):
                raise AssertionError(f"{method}: {key} differs from lazysd's VirtualStateDict after the load")
    return out


def main() -> None:
    try:
        import nemo_automodel  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"bench_automodel: skipped, NeMo Automodel is not installed ({exc.name}); pip install nemo-automodel")
        return
    from lazysd.testing import Step3p5Spec, checkpoint_nbytes, ensure_checkpoint
    from tests.support.dist import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1.5e9)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--dir", default="/tmp/lazysd-bench")
    args = parser.parse_args()

    spec = Step3p5Spec.sized(int(args.size))
    path = str(ensure_checkpoint(Path(args.dir) / f"automodel-{args.size:.2g}", spec, verbose=True))
    total = checkpoint_nbytes(spec)
    print(
        f"## {path}: {total / 2**30:.2f} GiB bf16, {spec.moe_num_experts} experts; medians of {args.runs} warm runs, "
        "bytes from one cold run\n"
    )
    print(
        "| EP | method | wall s | vs own | peak above model MiB (worst rank) | read/ideal (worst rank) | bytes read / "
        "ideal, rank 0 |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for ep in args.ep:
        warm: dict[str, list[list[dict]]] = {m: [] for m in args.methods}
        for _ in range(args.runs):
            for m in args.methods:
                warm[m].append(run_ranks(_rank, ep, (path, m, False), timeout=1800))
        wall = {m: statistics.median(max(r["seconds"] for r in run) for run in warm[m]) for m in args.methods}
        for m in args.methods:
            cold = run_ranks(_rank, ep, (path, m, True), timeout=1800)
            peak = statistics.median(max(r["peak"] for r in run) for run in warm[m]) / 2**20
            ratio = max(r["read"] / r["ideal"] for r in cold)
            base = wall.get("own")
            vs = f"{wall[m] / base:.2f}x" if base else "-"
            print(
                f"| {ep} | {METHODS[m]} | {wall[m]:.2f} | {vs} | {peak:.0f} | {ratio:.4f} | {cold[0]['read']:,} / "
                f"{cold[0]['ideal']:,} |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
