"""Peer benchmark: lazysd against the loaders users pick, cold and warm, next to the read floor.

    python benchmarks/bench_peers.py [--sizes 1e9 3e9] [--runs 3] [--family step3p5] [--dir /tmp/lazysd-bench]

Generates Flash-shaped Step3p5 bf16 checkpoints (``Step3p5Spec.sized``; grouped expert tensors)
under ``--dir`` once, or with ``--family qwen3_moe`` (or ``deepseek_v3``, ``glm4_moe``,
``mixtral``) checkpoints of that family's release layout (``FamilySpec.sized``: per-expert
tensors, 64 experts a layer, stacked by every native load).
Each checkpoint is read through once first (storage below the page cache serves a file read
lately faster: the first run would pay that for all). Then, ``--runs`` rounds: in each round
every method runs once cold (the checkpoint's pages dropped from the page cache with
``POSIX_FADV_DONTNEED`` just before the process starts) and once warm (every file dropped,
then read through, just before), each in its own fresh Python process, the methods of a round
back to back so that their ratios share the machine's load. Every method ends with every
tensor's bytes in CPU memory (in the destinations it was given, or in the tensors it returns;
the mmap-backed ones are touched page by page).

Reported per method: median wall time of the load, GiB/s (checkpoint bytes / wall), peak
resident memory above the process's state just before the load (VmHWM, so pre-allocated
destinations do not count), and the per-round ratios of its GiB/s to the pread floor at
lazysd's thread count, to the best floor and to the best peer (medians).

Methods (peers are optional: ``pip install -e ".[bench]"``; a missing one is skipped with a
printed line):
    lazysd          ``model.load_state_dict(VirtualStateDict(path))`` into an allocated native
                    model (expert transposes included; for a ``--family``, a module with the
                    VirtualStateDict's keys and shapes), default options
    lazysd-load     ``lazysd.load(model, path)`` into the same model: every tensor's chunks go
                    through one read pipeline (``Reader.fill_many``) before
                    ``load_state_dict`` sees them
    lazysd-buffered the same as lazysd with ``direct=False`` (plain ``pread``, no ``O_DIRECT``; not run
                    unless asked for): what direct reads of cold bytes change
    lazysd-hf       lazysd's HF-keyed view (``HFCheckpointView``), each tensor copied into a
                    pre-allocated tensor of its HF shape (no transposes), default options
    st-load_file    ``safetensors.torch.load_file`` per shard, pages touched
    st-clone        ``safetensors.safe_open`` + ``get_tensor(k).clone()``
    st-prealloc     ``safe_open`` + ``get_tensor(k)`` copied into pre-allocated tensors
    runai           runai-model-streamer ``SafetensorsStreamer`` (CPU), copied into pre-allocated
    fastsafetensors ``SafeTensorsFileLoader(device="cpu", nogds=True)``, copied into pre-allocated
    transformers    ``Step3p7TextModel.from_pretrained`` (native layout), pages touched; for a
                    ``--family``, ``AutoModelForCausalLM.from_pretrained`` (its weight
                    converters stack the per-expert tensors)
    floor:N         ``pread`` of every tensor's bytes into pre-faulted memory on N threads, each
                    reading its own contiguous share sequentially in 16 MiB requests (kernel
                    readahead on): N = lazysd's default thread count, and more
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lazysd and tests.support from this checkout

HERE = Path(__file__).resolve().parent
LAZYSD = ("lazysd", "lazysd-load", "lazysd-hf", "lazysd-buffered")
PEERS = ("st-load_file", "st-clone", "st-prealloc", "runai", "fastsafetensors", "transformers")
# Peers whose results are private copies. load_file returns views of its file mappings (the
# shared page cache, copy-on-write; touching them maps pages, it copies nothing), and
# transformers keeps unchanged parameters as such views too.
PRIVATE_PEERS = ("st-clone", "st-prealloc", "runai", "fastsafetensors")
# The import each peer needs: absent -> skipped with a line saying so.
PEER_MODULES = {
    "st-load_file": "safetensors",
    "st-clone": "safetensors",
    "st-prealloc": "safetensors",
    "runai": "runai_model_streamer",
    "fastsafetensors": "fastsafetensors",
    "transformers": "transformers",
}
FLOOR_CHUNK = 16 << 20


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    return [path / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]


def _family(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["model_type"]


def _checkpoint(family: str, size: float, root: Path, dims: list[int] | None = None) -> Path:
    """The benchmark checkpoint of ``family`` and ``size`` under ``root``, generated once;
    ``dims``: its layers' hidden size, experts and expert width (``--expert-dims``)."""
    from lazysd.testing import Step3p5Spec, ensure_checkpoint
    from lazysd.testing.families import FamilySpec, make_family_checkpoint

    if family == "step3p5":
        return ensure_checkpoint(root / f"{size / 1e9:g}gb", Step3p5Spec.sized(int(size)), verbose=True)
    path = root / (f"{family}-{size / 1e9:g}gb" + ("-{}x{}x{}".format(*dims) if dims else ""))
    if not (path / "model.safetensors.index.json").exists():  # the index is written last
        shape = dict(zip(("hidden_size", "num_experts", "width"), dims)) if dims else {}
        make_family_checkpoint(path, FamilySpec.sized(family, int(size), **shape))
        print(f"generated {path}", file=sys.stderr)
    return path


def _native_model():  # noqa: ANN202
    """An allocated, zeroed native model for ``PATH``: Step3p5's own module, or for other
    families a module with the VirtualStateDict's keys, shapes and dtypes."""
    sys.path.insert(0, str(HERE))
    from bench_load import _allocated_model, _spec

    from lazysd import VirtualStateDict
    from lazysd.testing.families import ParamTree

    if _family(PATH) == "step3p5":
        return _allocated_model(_spec(SIZE))
    with VirtualStateDict(PATH) as vsd:
        return ParamTree({k: (tuple(t.shape), t.dtype) for k, t in vsd.items()})


def _peak():  # noqa: ANN202
    """The peak memory of a measured block (VmHWM, exact). Not sampled: a sampling thread
    would take the GIL every few milliseconds from the loaders that need it most."""
    from tests.support.measure import PeakRSS

    return PeakRSS(sample_s=None)


def _hf_destinations() -> tuple[dict, int]:
    """Pre-allocated, pre-faulted tensors of every HF key's shape and dtype (set up before timing)."""
    import torch

    from lazysd.checkpoint import Checkpoint

    dests = {}
    with Checkpoint(PATH) as ckpt:
        for key, info in ckpt.tensors.items():
            t = dests[key] = torch.empty(info.shape, dtype=info.dtype)
            t.view(-1).view(torch.uint8).fill_(0)  # resident before the measurement starts
    return dests, sum(t.nbytes for t in dests.values())


def _floor(threads: int) -> dict:
    """Every tensor's bytes pread once into pre-faulted memory on ``threads`` threads.

    Each thread reads its own contiguous share of the checkpoint (in file order) through its
    own descriptors in 16 MiB requests, so the kernel's readahead sees one sequential stream
    per thread: the best a plain ``pread`` loader can do on this storage.
    """
    import threading

    import torch

    from lazysd.checkpoint import Checkpoint

    with Checkpoint(PATH) as ckpt:
        infos = sorted(ckpt.tensors.values(), key=lambda i: (str(i.file), i.offset))
    total = sum(i.nbytes for i in infos)
    dest = torch.empty(total, dtype=torch.uint8)
    dest.fill_(0)
    mv = memoryview(dest.numpy())
    work, pos = [], 0
    for i in infos:
        for s in range(0, i.nbytes, FLOOR_CHUNK):
            work.append((i.file, i.offset + s, pos + s, min(FLOOR_CHUNK, i.nbytes - s)))
        pos += i.nbytes
    shares = [work[len(work) * k // threads : len(work) * (k + 1) // threads] for k in range(threads)]

    def run(share: list) -> None:
        fds: dict = {}
        try:
            for file, off, at, n in share:
                fd = fds.get(file) or fds.setdefault(file, os.open(file, os.O_RDONLY))
                done = 0
                while done < n:
                    got = os.preadv(fd, [mv[at + done : at + n]], off + done)
                    assert got > 0
                    done += got
        finally:
            for fd in fds.values():
                os.close(fd)

    with _peak() as p:
        pool = [threading.Thread(target=run, args=(share,)) for share in shares]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    return {**p.result, "bytes": total}


def worker(method: str) -> dict:
    import torch

    files = _files(PATH)
    if method.startswith("floor:"):
        return _floor(int(method.split(":")[1]))
    if method in ("lazysd", "lazysd-buffered"):
        from lazysd import VirtualStateDict

        model = _native_model()
        with _peak() as p:
            with VirtualStateDict(PATH, direct=method == "lazysd") as vsd:
                model.load_state_dict(vsd)
        return {**p.result, "bytes": vsd.bytes_read, "threads": vsd.reader.options.threads}
    if method == "lazysd-load":
        import lazysd

        model = _native_model()
        with _peak() as p:
            report = lazysd.load(model, PATH)
        return {**p.result, "bytes": report.bytes_read}
    if method == "transformers":
        sys.path.insert(0, str(HERE))
        from bench_load import _from_pretrained, touch_pages

        if _family(PATH) == "step3p5":
            from_pretrained = _from_pretrained()
        else:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            from_pretrained = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # noqa: E731
        with _peak() as p:
            model = from_pretrained(PATH)
            nbytes = touch_pages(model.state_dict().values())  # mmap-backed parameters read here
        return {**p.result, "bytes": nbytes}
    if method == "st-load_file":
        sys.path.insert(0, str(HERE))
        from bench_load import touch_pages
        from safetensors.torch import load_file

        with _peak() as p:
            loaded = [load_file(f) for f in files]
            nbytes = sum(touch_pages(d.values()) for d in loaded)
        return {**p.result, "bytes": nbytes}
    if method == "st-clone":
        from safetensors import safe_open

        kept, nbytes = [], 0
        with _peak() as p:
            for f in files:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        kept.append(st.get_tensor(k).clone())
            nbytes = sum(t.nbytes for t in kept)
        return {**p.result, "bytes": nbytes}
    dests, nbytes = _hf_destinations()
    if method == "lazysd-hf":
        from lazysd.automodel import HFCheckpointView

        with _peak() as p, HFCheckpointView(PATH) as hf, torch.no_grad():
            for k, t in dests.items():
                t.copy_(hf[k])
        return {**p.result, "bytes": hf.bytes_read, "threads": hf.reader.options.threads}
    if method == "st-prealloc":
        from safetensors import safe_open

        with _peak() as p:
            for f in files:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        dests[k].copy_(st.get_tensor(k))
        return {**p.result, "bytes": nbytes}
    if method == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with _peak() as p, SafetensorsStreamer() as streamer:
            streamer.stream_files([str(f) for f in files])
            for k, t in streamer.get_tensors():
                dests[k].copy_(t)
        return {**p.result, "bytes": nbytes}
    if method == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        with _peak() as p:
            loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
            loader.add_filenames({0: [str(f) for f in files]})
            buffers = loader.copy_files_to_device()
            for k, t in dests.items():
                t.copy_(buffers.get_tensor(k))
            buffers.close()
            loader.close()
        return {**p.result, "bytes": nbytes}
    raise ValueError(method)


# ---- driver -----------------------------------------------------------------------------
def _available(method: str) -> str | None:
    """None if ``method`` can run here, else why not."""
    import importlib.util

    module = PEER_MODULES.get(method)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -e '.[bench]')"
    return None


def _warm(files: list[Path]) -> None:
    """Every file in the page cache, the same way before every warm run: dropped first, then
    read through in FLOOR_CHUNK reads. Read through as the last method left it, the page
    cache's folios differ from run to run, and warm rates with them (the same Qwen3-MoE
    0.9 GiB load's kernel calls: 9.1 against 11.2 GB/s)."""
    _cold(files)
    buf = bytearray(FLOOR_CHUNK)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)


def _cold(files: list[Path]) -> None:
    from tests.support.pagecache import evict

    for f in files:
        evict(f)


def _parse_log(log: Path) -> list[tuple[float, int, str, str, dict]]:
    """``(size, round, mode, method, result)`` of each run line of a run's stderr log."""
    import ast

    out = []
    for line in log.read_text().splitlines():
        head, sep, body = line.strip().partition(": ")
        words = head.split()
        if not sep or len(words) != 5 or words[0] != "run":
            continue
        out.append((float(words[4]), int(words[1]), words[2], words[3], ast.literal_eval(body.replace("null", "None"))))
    return out


def _gib_s(x: dict) -> float:
    return x["bytes"] / x["seconds"] / 2**30


def main() -> int:
    global PATH, SIZE
    sys.path.insert(0, str(HERE.parent))  # run from a checkout
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e9, 3e9])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["lazysd", "lazysd-load", "lazysd-hf", *PEERS],
        help="lazysd, peers (floors are always run)",
    )
    ap.add_argument(
        "--floor-threads", nargs="+", type=int, default=None, help="extra floor thread counts (default 4 8)"
    )
    ap.add_argument(
        "--family",
        default="step3p5",
        choices=["step3p5", "deepseek_v3", "qwen3_moe", "glm4_moe", "mixtral", "gpt_oss"],
        help="step3p5 (grouped experts), or another family's release layout (one tensor per expert but GPT-OSS's)",
    )
    ap.add_argument(
        "--expert-dims",
        nargs=3,
        type=int,
        metavar=("HIDDEN", "EXPERTS", "WIDTH"),
        help="a --family's layer sizes (default 1024 64 512); a release's own: Qwen3-30B-A3B 2048 128 768",
    )
    ap.add_argument("--dir", default="/tmp/lazysd-bench")
    ap.add_argument(
        "--replay", metavar="LOG", help="print the tables of an earlier run from its stderr log (complete rounds only)"
    )
    args = ap.parse_args()
    if args.expert_dims and args.family == "step3p5":
        ap.error("--expert-dims sizes a --family's layers (Step3p5's are Flash-shaped)")
    if args.worker:
        method, PATH, SIZE = args.worker[0], Path(args.worker[1]), float(args.worker[2])
        print(json.dumps(worker(method)))
        return 0

    from lazysd import tuning
    from tests.support.measure import run_fresh

    MiB = 2**20
    threads = tuning.default_threads(args.dir)  # lazysd's default: the same-thread floor uses it
    floors = [f"floor:{n}" for n in dict.fromkeys([threads, *(args.floor_threads or [4, 8])])]
    methods = []
    for m in args.methods:
        why = _available(m)
        if why:
            print(f"skipped {m}: {why}")
        else:
            methods.append(m)
    methods += floors
    replayed = _parse_log(Path(args.replay)) if args.replay else None
    if replayed is not None:
        methods = list(dict.fromkeys(m for _, _, _, m, _ in replayed))
        floors = [m for m in methods if m.startswith("floor:")]
    for size in args.sizes:
        path = _checkpoint(args.family, size, Path(args.dir), args.expert_dims)
        files = _files(path)
        nbytes = sum(os.path.getsize(f) for f in files)
        with __import__("lazysd").VirtualStateDict(path) as vsd:
            largest = max(e.nbytes for e in vsd.plan.entries.values())
        bound = 1.25 * largest + 64 * MiB
        results = {(mode, m): [] for mode in args.modes for m in methods}
        if replayed is not None:
            for _, _r, mode, m, x in [e for e in replayed if e[0] == size and e[2] in args.modes]:
                results[mode, m].append(x)
            args.runs = min(len(v) for v in results.values())
        if replayed is None:
            # Storage below the page cache (a VM host's cache, a device's own) serves a file
            # read lately faster than one left alone: on the build VM a direct read of a file
            # untouched for hours ran 25-50% slower the first time, and the first run of a
            # round 1 could take 2.5x its next ones. Read through once, so no method is first.
            _warm(files)
        for r in range(args.runs if replayed is None else 0):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]  # rotate: no fixed position
            for mode in args.modes:
                for m in order:
                    (_cold if mode == "cold" else _warm)(files)
                    x = run_fresh(__file__, "--worker", m, str(path), str(size))
                    results[mode, m].append(x)
                    print(f"  run {r + 1} {mode} {m} {size:g}: {json.dumps(x)}", file=sys.stderr)
        print(
            f"\n## {path.name}: {nbytes / 2**30:.2f} GiB bf16 ({len(files)} files); largest native "
            f"tensor {largest / MiB:.0f} MiB, memory bound 1.25x+64 MiB = {bound / MiB:.0f} MiB; lazysd "
            f"threads={threads}; "
            f"medians of {args.runs} rounds, ratios per round (same machine load) then their median\n"
        )
        for mode in args.modes:
            _table(mode, methods, floors, results, bound)
    return 0


def _table(mode: str, methods: list[str], floors: list[str], results: dict, bound: float) -> None:
    MiB = 2**20
    rounds = min(len(v) for v in results.values())

    def ok(m: str, r: int) -> dict | None:
        x = results[mode, m][r]
        return None if "error" in x else x

    def ratio(m: str, others: list[str]) -> str:
        """Median over rounds of GiB/s(m) / max GiB/s(others) in that round."""
        vals = []
        for r in range(rounds):
            x = ok(m, r)
            best = [_gib_s(y) for o in others if o != m and (y := ok(o, r))]
            if x and best:
                vals.append(_gib_s(x) / max(best))
        return f"{statistics.median(vals):.2f}" if vals else "n/a"

    peers = [m for m in methods if m in PEERS]
    print(f"### {mode}\n")
    private = [m for m in peers if m in PRIVATE_PEERS]
    print(
        f"| method | wall s | GiB/s | peak extra MiB | x {floors[0]} | x best floor | x best peer | x best "
        "private-copy peer |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in methods:
        runs = [x for x in results[mode, m] if "error" not in x]
        if not runs:
            why = results[mode, m][0]["error"][:100] if results[mode, m] else "no run"
            print(f"| {m} | failed: {why} | | | | | | |")
            continue
        wall = statistics.median(x["seconds"] for x in runs)
        rate = statistics.median(_gib_s(x) for x in runs)
        peak = statistics.median(x["total"] for x in runs) / MiB
        print(
            f"| {m} | {wall:.2f} | {rate:.2f} | {peak:.0f} | {ratio(m, floors[:1])} | {ratio(m, floors)} | "
            f"{ratio(m, peers)} | {ratio(m, private)} |"
        )
    for m in LAZYSD:
        if (mode, m) in results and any("error" not in x for x in results[mode, m]):
            peak = statistics.median(x["total"] for x in results[mode, m] if "error" not in x)
            print(
                f"\n- {m}: peak extra {peak / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB: "
                f"{'met' if peak <= bound else 'NOT met'}"
            )
    print()


PATH: Path
SIZE: float

if __name__ == "__main__":
    sys.exit(main())
