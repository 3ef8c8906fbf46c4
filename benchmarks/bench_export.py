"""Export throughput and peak memory: lazysd.save_hf vs "convert everything, then save_file".

Generates a ~2 GiB synthetic Step3p5 checkpoint once (under --dir, default /tmp/lazysd-bench),
then runs each method in a fresh subprocess (so ``ru_maxrss`` is that method's own peak),
``--repeat`` times, and prints medians:

* ``lazysd, from disk``: ``save_hf(VirtualStateDict(src))`` -- HF -> HF re-sharding, reading
  and writing one tensor slice at a time.
* ``eager, from disk``: read every native tensor, convert every HF tensor, then
  ``safetensors.torch.save_file``.
* ``lazysd, from memory`` / ``eager, from memory``: the native state dict is first fully in
  memory (a trained model); only the export is timed, and "extra" is the peak above the RSS
  the process had when export began.

Run:
    python benchmarks/bench_export.py [--dir /tmp/lazysd-bench] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

METHODS = ("lazysd-disk", "eager-disk", "lazysd-memory", "eager-memory")
LABELS = {
    "lazysd-disk": "lazysd save_hf, from disk",
    "eager-disk": "eager convert + save_file, from disk",
    "lazysd-memory": "lazysd save_hf, from memory",
    "eager-memory": "eager convert + save_file, from memory",
}


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_one(method: str, src: Path, out: Path) -> dict[str, float]:
    """One export in this process; returns seconds, bytes written and memory figures."""
    from safetensors.torch import save_file

    from lazysd import HFView, VirtualStateDict, save_hf

    vsd = VirtualStateDict(src, include_mtp=True)
    state: object = vsd
    if method.endswith("memory"):
        state = {k: vsd[k].materialize() for k in vsd}  # the trained model's tensors
    before = _rss_bytes()
    t0 = time.perf_counter()
    if method.startswith("lazysd"):
        save_hf(state, out, adapter=vsd.adapter, num_layers=vsd.plan.num_layers)  # type: ignore[arg-type]
    else:
        view = HFView(state, adapter=vsd.adapter, num_layers=vsd.plan.num_layers)  # type: ignore[arg-type]
        converted = {k: view[k] for k in view}  # convert everything ...
        out.mkdir(parents=True)
        save_file(converted, out / "model.safetensors", metadata={"format": "pt"})  # ... then save
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "bytes": written, "peak": peak, "before": before}


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

    from lazysd.testing import Step3p5Spec, checkpoint_nbytes, make_checkpoint

    scratch = Path(args.dir)
    spec = Step3p5Spec.sized(int(args.size * 2**30))
    src = scratch / f"step3p5-{args.size:g}gib"
    if not (src / "model.safetensors.index.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        make_checkpoint(src, spec, layout="sharded")
        print(f"generated {src} ({checkpoint_nbytes(spec) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for i in range(args.repeat):
        for method in METHODS:
            out = scratch / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, __file__, "--run", method, "--src", str(src), "--out", str(out)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[method].append(json.loads(line))
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
        extra = statistics.median(r["peak"] - r["before"] for r in runs) / 2**30
        print(f"{LABELS[method]:<40} {sec:8.2f} {gib / sec:7.2f} {peak:13.2f} {extra:10.2f}")


if __name__ == "__main__":
    main()
