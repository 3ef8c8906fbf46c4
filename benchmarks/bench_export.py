"""Export throughput and peak memory: lazysd.save_hf vs "convert everything, then save_file".

Generates a ~2 GiB synthetic Step3p5 checkpoint once (under --dir, default /tmp/lazysd-bench),
then runs each method in a fresh subprocess (so ``ru_maxrss`` is that method's own peak),
``--repeat`` times, and prints medians:

* ``lazysd, from disk``: ``save_hf(VirtualStateDict(src))`` -- HF -> HF re-sharding, reading
  and writing one tensor slice at a time.
* ``eager, from disk``: read every native tensor, convert every HF tensor, then
  ``safetensors.torch.save_file``.
* ``lazysd, from memory`` / ``eager, from memory``: the native state dict is first fully in
  memory (a trained model); only the export is timed.

"peak RSS" is the process's peak (``ru_maxrss``); "extra" is the peak during the export above
the RSS the process had when export began (VmHWM, reset as the export starts).

Run:
    python benchmarks/bench_export.py [--dir /tmp/lazysd-bench] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

METHODS = ("lazysd-disk", "eager-disk", "lazysd-memory", "eager-memory")
LABELS = {
    "lazysd-disk": "lazysd save_hf, from disk",
    "eager-disk": "eager convert + save_file, from disk",
    "lazysd-memory": "lazysd save_hf, from memory",
    "eager-memory": "eager convert + save_file, from memory",
}


def run_one(method: str, src: Path, out: Path) -> dict[str, float]:
    """One export in this process; returns seconds, bytes written and memory figures."""
    from safetensors.torch import save_file

    from lazysd import HFView, VirtualStateDict, save_hf
    from tests.support.measure import PeakRSS

    vsd = VirtualStateDict(src, include_mtp=True)
    state: object = vsd
    if method.endswith("memory"):
        state = {k: vsd[k].materialize() for k in vsd}  # the trained model's tensors
    with PeakRSS(sample_s=None) as export:
        if method.startswith("lazysd"):
            save_hf(state, out, adapter=vsd.adapter, num_layers=vsd.plan.num_layers)  # type: ignore[arg-type]
        else:
            view = HFView(state, adapter=vsd.adapter, num_layers=vsd.plan.num_layers)  # type: ignore[arg-type]
            converted = {k: view[k] for k in view}  # convert everything ...
            out.mkdir(parents=True)
            save_file(converted, out / "model.safetensors", metadata={"format": "pt"})  # ... then save
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": export.seconds, "bytes": written, "peak": peak, "extra": export.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lazysd-bench", help="scratch directory (checkpoint kept for reruns)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=float, default=2.0, help="checkpoint size in GiB")
    parser.add_argument("--run", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run:  # child process: one measurement, printed as JSON
        print(json.dumps(run_one(args.run, Path(args.src), Path(args.out))))
        return

    from lazysd.testing import Step3p5Spec, checkpoint_nbytes, ensure_checkpoint
    from tests.support.measure import run_fresh

    scratch = Path(args.dir)
    spec = Step3p5Spec.sized(int(args.size * 2**30))
    src = ensure_checkpoint(scratch / f"step3p5-{args.size:g}gib", spec, verbose=True)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for i in range(args.repeat):
        for method in METHODS:
            out = scratch / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_fresh(__file__, "--run", method, "--src", str(src), "--out", str(out))
            if "error" in result:
                raise SystemExit(f"{method}: {result['error']}")
            results[method].append(result)
            shutil.rmtree(out, ignore_errors=True)
            print(f"run {i + 1}/{args.repeat} {method}: {results[method][-1]['seconds']:.2f}s", file=sys.stderr)

    print(f"\nexport of {src.name}: {checkpoint_nbytes(spec) / 2**30:.2f} GiB, {spec.num_hidden_layers} layers, "
          f"{spec.moe_num_experts} experts; medians of {args.repeat} fresh processes")
    print(f"{'method':<40} {'seconds':>8} {'GiB/s':>7} {'peak RSS GiB':>13} {'extra GiB':>10}")
    for method in METHODS:
        runs = results[method]
        sec = statistics.median(r["seconds"] for r in runs)
        gib = statistics.median(r["bytes"] for r in runs) / 2**30
        peak = statistics.median(r["peak"] for r in runs) / 2**30
        extra = statistics.median(r["extra"] for r in runs) / 2**30
        print(f"{LABELS[method]:<40} {sec:8.2f} {gib / sec:7.2f} {peak:13.2f} {extra:10.2f}")


if __name__ == "__main__":
    main()
