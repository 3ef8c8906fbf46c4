"""Expert-parallel load benchmark: per-rank bytes read vs ideal, wall time and peak memory.

    python benchmarks/bench_ep.py [--size 2e9] [--ep 1 2 4] [--dir /tmp/lazysd-bench]

Generates a Flash-shaped Step3p5 bf16 checkpoint of about ``--size`` bytes once, then for each
EP size starts that many gloo ranks on this machine (CPU processes). Each rank builds the
native model on the meta device and runs
``model.load_state_dict(VirtualStateDict(path, mesh), assign=True)``, so its expert
parameters become DTensors holding only its experts. Reported per rank: bytes read (lazysd's
count of pread bytes), the ideal (the exact byte ranges its shards need, from the plan), wall
time of the load, and peak RSS above the process just before the load (VmHWM after
resetting it). All ranks load at once, as they would on a cluster; on this 2-core machine
they share the cores, so wall times at EP=4 measure contention as much as lazysd.

``--share None`` (the first table, each rank reading for itself) shows that a rank reads
exactly its planned ranges; ``--share node`` (the default of a VirtualStateDict with a
process group: the ranks of this one node share what several of them need) adds what each
rank received from the others, and the node's total read against the union of the ranks'
ranges.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lazysd and tests.support from this checkout


def _rank(rank: int, world: int, path: str, size: float, share: str | None) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from lazysd import VirtualStateDict
    from lazysd.testing import Step3p5Model, Step3p5Spec
    from tests.support.measure import PeakRSS

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = Step3p5Model(Step3p5Spec.sized(int(size)), layout="native", dtype=torch.bfloat16, device="meta")
    vsd = VirtualStateDict(path, mesh, share=share)
    ranges = vsd.planned_ranges()
    with PeakRSS(sample_s=None) as peak:  # VmHWM above the RSS just before the load
        model.load_state_dict(vsd, assign=True)
    return {
        "read": vsd.bytes_read,
        "received": vsd.bytes_received,
        "ideal": sum(n for _, _, n in ranges),
        "ranges": ranges,
        "seconds": peak.seconds,
        "peak": peak.total,
    }


def _union(ranges: list[tuple[str, int, int]]) -> int:
    """Bytes covered by ``(file, offset, length)`` ranges, each byte once."""
    total, by_file = 0, {}
    for f, o, n in ranges:
        by_file.setdefault(f, []).append((o, o + n))
    for spans in by_file.values():
        end = -1
        for lo, hi in sorted(spans):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


def main() -> None:
    from lazysd.testing import Step3p5Spec, checkpoint_nbytes, ensure_checkpoint
    from tests.support.dist import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=2e9)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/lazysd-bench")
    parser.add_argument("--share", nargs="+", default=["None", "node"], choices=["None", "node"])
    args = parser.parse_args()

    spec = Step3p5Spec.sized(int(args.size))
    path = ensure_checkpoint(Path(args.dir) / f"ep-{args.size:.0e}", spec, verbose=True)
    total = checkpoint_nbytes(spec)
    print(
        f"## {path}: {total / 2**30:.2f} GiB bf16, {spec.moe_num_experts} experts x {len(spec.moe_layers)} "
        f"MoE layers; medians of {args.runs} runs\n"
    )
    for share in [None if s == "None" else s for s in args.share]:
        print(f"### share={share!r}\n")
        print(
            "| EP | rank | bytes read | received from the node | ideal | (read+received)/ideal | wall s "
            "| peak RSS above start MiB |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        node = []
        for ep in args.ep:
            runs = [run_ranks(_rank, ep, (str(path), args.size, share), timeout=900) for _ in range(args.runs)]
            for rank in range(ep):
                rows = [r[rank] for r in runs]
                read, received, ideal = rows[0]["read"], rows[0]["received"], rows[0]["ideal"]
                assert all(r["read"] + r["received"] == read + received for r in rows)
                wall = statistics.median(r["seconds"] for r in rows)
                peak = statistics.median(r["peak"] for r in rows) / 2**20
                print(
                    f"| {ep} | {rank} | {read:,} | {received:,} | {ideal:,} | {(read + received) / ideal:.4f} "
                    f"| {wall:.2f} | {peak:.0f} |"
                )
            reads = statistics.median(sum(r["read"] for r in run) for run in runs)
            union = _union([x for r in runs[0] for x in r["ranges"]])
            node.append(f"EP {ep}: the node read {reads:,.0f} bytes, the union of its ranks' ranges is {union:,} "
                        f"({reads / union:.4f}x)")
        print("\n" + "\n".join(f"- {line}" for line in node) + "\n")

if __name__ == "__main__":
    main()
