"""Load benchmark: lazysd vs the eager path, the read floor and transformers, as a table.

    python benchmarks/bench_load.py [--sizes 1e9 3e9] [--runs 3] [--dir /tmp/lazysd-bench]

Generates Flash-shaped Step3p5 bf16 checkpoints (``Step3p5Spec.sized``) under ``--dir`` once,
then runs every method in its own fresh Python process, ``--runs`` rounds, the methods of a
round back to back (so their ratios share the machine's load). Reported: median wall time of
the load itself, and the peak resident memory above the process's state just before it
(the allocated model, or the empty meta model): total (VmHWM, exact) and its private
(RssAnon) and file-backed (RssFile) parts (sampled every 2 ms).

Methods:
    a   lazysd: ``model.load_state_dict(VirtualStateDict(path))`` into an allocated bf16 model
    p   the same with ``progress=True`` (the report on stderr): its cost is p/a
    b   lazysd: ``load_state_dict(vsd, assign=True)`` into an already built meta model
    B   the same with bulk pre-faulting of fresh tensors opted in (``lazysd.memory.enabled =
        True``); the default faults fresh memory page by page during the reads
    m   the same with ``VirtualStateDict(path, mmap=True)``: unchanged tensors become
        copy-on-write views of the file mapping, converted ones are read into private memory
    c   eager: safetensors ``load_file`` per shard, convert with torch ops (cat of transposes,
        like NeMo Automodel's Step3p5 adapter), ``load_state_dict``
    d   floor: every tensor's bytes read once into private memory (``get_tensor().clone()``)
    t   bare transposes: lazysd's ``copy_into`` (the compiled kernel, torch's intra-op thread
        count) of every expert tensor from a pre-read source: the transpose share of a load
    s   bare transposes with torch's strided ``copy_`` (what the kernel replaces)
    e   transformers 5.x ``Step3p7TextModel.from_pretrained`` (text decoder, no lm_head), then
        every parameter page touched (its mmap-backed tensors are read only then)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METHODS = {
    "a": "lazysd load_state_dict(vsd)",
    "p": "lazysd load_state_dict(vsd), progress=True",
    "b": "lazysd assign=True (meta)",
    "B": "lazysd assign=True, memory.enabled (pre-faulting)",
    "m": "lazysd assign=True, mmap=True (meta)",
    "c": "eager safetensors+torch",
    "d": "floor: read bytes once",
    "t": "bare transposes (kernel)",
    "s": "bare transposes (torch)",
    "e": "transformers from_pretrained",
}


def _spec(size: float):
    from lazysd.testing import Step3p5Spec

    return Step3p5Spec.sized(int(size))


def _allocated_model(spec):
    import torch

    from lazysd.testing import Step3p5Model

    model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()  # resident before the measurement starts
    return model


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    return [path / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]


def worker(method: str, path: Path, size: float) -> dict:
    import torch

    from lazysd import VirtualStateDict
    from lazysd.testing import Step3p5Model
    from tests.support.measure import PeakRSS

    spec = _spec(size)
    if method in ("a", "p"):
        model = _allocated_model(spec)
        with PeakRSS() as p:
            vsd = VirtualStateDict(path, progress=method == "p")
            model.load_state_dict(vsd)
        return {**p.result, "bytes": vsd.bytes_read, "staging_peak": vsd.stats.staging_peak}
    if method in ("b", "m", "B"):
        if method == "B":
            from lazysd import memory

            memory.enabled = True
        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta")
        with PeakRSS() as p:
            vsd = VirtualStateDict(path, mmap=method == "m")
            model.load_state_dict(vsd, assign=True)
            touch_pages(model.state_dict().values())  # as for (e): mmap=True views are read here
        assert all(type(t) is torch.nn.Parameter and t.device.type == "cpu" for t in model.parameters())
        return {**p.result, "bytes": vsd.bytes_read}
    if method == "c":
        import importlib

        from lazysd.testing import load_hf_tensors, native_state_dict

        importlib.import_module("safetensors.torch")  # load_hf_tensors's reader: imported before the timing
        model = _allocated_model(spec)
        with PeakRSS() as p:
            hf = load_hf_tensors(path)  # safetensors load_file per shard, in index order
            native = native_state_dict(hf, spec.num_hidden_layers)  # cat of transposes, torch ops
            model.load_state_dict(native, strict=False)
            nbytes = sum(v.nbytes for v in hf.values())
            del hf, native
        return {**p.result, "bytes": nbytes}
    if method == "d":
        from safetensors import safe_open

        nbytes = 0
        with PeakRSS() as p:
            for f in _files(path):
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        t = st.get_tensor(k).clone()  # touch: get_tensor alone reads nothing
                        nbytes += t.nbytes
                        del t
        return {**p.result, "bytes": nbytes}
    if method in ("t", "s"):
        from lazysd.transpose import copy_into

        vsd = VirtualStateDict(path)
        model = _allocated_model(spec)
        params = dict(model.named_parameters())
        jobs = []
        sources: dict[tuple, torch.Tensor] = {}
        for entry in vsd.plan.entries.values():
            src0 = entry.sources[0]
            if src0.identity or entry.key not in params:
                continue
            for src in entry.sources:
                # One pre-read (random) source per distinct shape, reused: only the copy is timed.
                shape = src.info.shape
                buf = sources.setdefault(shape, torch.randn(shape).to(torch.bfloat16))
                perm = [d for d in src.dims if d is not None]
                moved = buf.permute(perm)
                for i, d in enumerate(src.dims):
                    if d is None:
                        moved = moved.unsqueeze(i)
                view = params[entry.key][tuple(slice(s, s + e) for s, e in zip(src.start, src.extent))]
                jobs.append((view, moved))
        nbytes = sum(v.numel() * v.element_size() for v, _ in jobs)
        with PeakRSS() as p, torch.no_grad():
            for view, moved in jobs:
                if method == "t":
                    copy_into(view, moved)
                else:
                    view.copy_(moved)
        return {**p.result, "bytes": nbytes}
    if method == "e":
        try:
            from_pretrained = _from_pretrained()
        except ImportError as exc:
            return {"error": f"transformers not importable: {exc}"}
        with PeakRSS() as p:
            model = from_pretrained(path)
            # Parameters transformers leaves as views of its file mappings are read when first
            # touched: touch every page, so the load ends with every byte in memory, as lazysd's.
            touch_pages(model.state_dict().values())
        nbytes = sum(t.nbytes for t in model.state_dict().values())
        return {**p.result, "bytes": nbytes}
    raise ValueError(method)


def _from_pretrained():  # noqa: ANN202
    """``path -> Step3p7TextModel.from_pretrained(path)`` (bf16), or ImportError without transformers."""
    import torch
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # transformers 5.x ships the Step checkpoint mapping for the "step3p7" VLM only; the
    # text config ("step3p5") gets its MoE renames and the gate/up concatenation, without
    # the VLM's language_model/vision prefix renames.
    base = get_checkpoint_conversion_mapping("step3p7") or []
    text = [t for t in base if not any(x in s for s in t.source_patterns for x in ("vision", "projector", "^model\\."))]
    register_checkpoint_conversion_mapping("step3p5", text, overwrite=True)
    return lambda path: Step3p7TextModel.from_pretrained(path, dtype=torch.bfloat16)


def touch_pages(tensors) -> int:  # noqa: ANN001
    """Read one byte of every page of each tensor; returns their bytes.

    A tensor backed by a file mapping is then resident (its pages read), like one read into
    private memory: what a load must end with before training touches it anyway.
    """
    import torch

    n = 0
    for t in tensors:
        if t.numel():
            # A permuted view (mmap=True's source-order tensors) seen in memory order: a view
            # again, where reshape(-1) of the permuted one would copy it.
            t = t.detach().permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
            flat = t.reshape(-1).view(torch.uint8)
            flat[::4096].sum()
            n += t.nbytes
    return n


# ---- driver -----------------------------------------------------------------------------
def _largest_native(path: Path) -> int:
    from lazysd import VirtualStateDict

    with VirtualStateDict(path) as vsd:
        return max(e.nbytes for e in vsd.plan.entries.values())


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lazysd and tests.support from this checkout
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e9, 3e9])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", default="apbBmcdtse")
    ap.add_argument("--dir", default="/tmp/lazysd-bench")
    args = ap.parse_args()
    if args.worker:
        method, path, size = args.worker
        print(json.dumps(worker(method, Path(path), float(size))))
        return 0

    from lazysd.testing import checkpoint_nbytes, ensure_checkpoint
    from tests.support.measure import run_fresh

    MiB = 2**20
    for size in args.sizes:
        spec = _spec(size)
        path = ensure_checkpoint(Path(args.dir) / f"{size / 1e9:g}gb", spec, verbose=True)
        largest = _largest_native(path)
        bound = 1.25 * largest + 64 * MiB
        results: dict[str, list[dict]] = {m: [] for m in args.methods}
        for r in range(args.runs):
            for m in args.methods:
                results[m].append(run_fresh(__file__, "--worker", m, str(path), str(size)))
                print(f"  run {r + 1} {m}: {results[m][-1]}", file=sys.stderr)
        print(
            f"\n## {path.name}: {checkpoint_nbytes(spec) / 1e9:.2f} GB bf16, {spec.num_hidden_layers} layers x "
            f"{spec.moe_num_experts} experts; largest native tensor {largest / MiB:.0f} MiB, "
            f"bound 1.25x+64 MiB = {bound / MiB:.0f} MiB; medians of {args.runs} runs\n"
        )
        print("| method | wall s | GiB/s | peak extra MiB (VmHWM) | private (RssAnon) | file (RssFile) |")
        print("|---|---:|---:|---:|---:|---:|")
        med: dict[str, dict[str, float]] = {}
        for m, runs in results.items():
            ok = [x for x in runs if "error" not in x]
            if not ok:
                print(f"| ({m}) {METHODS[m]} | n/a: {runs[0]['error'][:120]} | | | | |")
                continue
            med[m] = {k: statistics.median(x[k] for x in ok) for k in ("seconds", "total", "anon", "file", "bytes")}
            x = med[m]
            print(
                f"| ({m}) {METHODS[m]} | {x['seconds']:.2f} | {x['bytes'] / x['seconds'] / 2**30:.2f} | "
                f"{x['total'] / MiB:.0f} | {x['anon'] / MiB:.0f} | {x['file'] / MiB:.0f} |"
            )

        # Ratios per round (same machine load), then their median.
        def ratio(p: str, q: str, key: str = "seconds") -> str:
            rounds = zip(results.get(p, []), results.get(q, []))  # noqa: B023 - called in this iteration
            pairs = [(x[key], y[key]) for x, y in rounds if "error" not in x and "error" not in y]
            return f"{statistics.median(a / b for a, b in pairs if b):.2f}" if pairs else "n/a"

        print()
        if "a" in med:
            print(
                f"- (a) peak extra {med['a']['total'] / MiB:.0f} MiB vs bound {bound / MiB:.0f} MiB: "
                f"{'met' if med['a']['total'] <= bound else 'NOT met'}"
            )
        print(f"- wall p/a = {ratio('p', 'a')} (the progress report's cost)")
        print(
            f"- wall a/c = {ratio('a', 'c')} (target <= 0.5), a/d = {ratio('a', 'd')} (target <= 2), "
            f"t/d = {ratio('t', 'd')}, s/t = {ratio('s', 't')} (kernel transpose speedup)"
        )
        print(f"- wall b/e = {ratio('b', 'e')} (target <= 1), private b/e = {ratio('b', 'e', 'anon')} (target <= 1)")
        print(f"- wall b/B = {ratio('b', 'B')} (page-by-page faults vs bulk pre-faulting)")
        print(f"- wall m/e = {ratio('m', 'e')} (target <= 1), private m/e = {ratio('m', 'e', 'anon')} (target <= 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
