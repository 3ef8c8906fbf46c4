"""Remote load benchmark: lazysd's ranged reads vs downloading first vs Run:ai's model streamer.

    python benchmarks/bench_remote.py [--size 5e8] [--latency 0.02] [--bandwidth 2e8] [--runs 3]
    python benchmarks/bench_remote.py --sweep   # lazysd alone under several request shapes

Generates a Flash-shaped Step3p5 bf16 checkpoint of about ``--size`` bytes once and serves it
from 127.0.0.1 as a path-style S3 endpoint (``/bucket/key`` answered with ranged GETs, ETag
and HEAD: the part of S3 that object reads use) with ``--latency`` seconds added to every
request and all bodies together capped at ``--bandwidth`` bytes/s, as a remote bucket would.
(moto's S3 server, which the tests use, re-reads the whole object for every ranged GET, which
would measure moto rather than the clients; this server is threaded and sends bodies with
``sendfile``, so the cap, not the server, limits the transfer.) Then, each in a fresh process
(libraries imported before the clock starts; peak memory is that process's VmHWM above its
start):

* ``lazysd s3://``: ``lazysd.load(model, "s3://...", assign=True)`` on a meta-device model:
  exact ranged GETs, coalesced, several tensors in flight;
* ``download, then lazysd``: the files fetched whole (fsspec, concurrent GETs) to local disk,
  then a local lazysd load;
* ``runai streamer``: ``runai_model_streamer.SafetensorsStreamer`` streams every file from S3
  (HF tensors only: no conversion to the native layout, which favours it), skipped with a
  printed line when the package or its S3 backend is missing.

Then 4 gloo ranks (EP=4, experts ``Shard(0)``) load from S3 at once with ``share="node"`` and
with ``share=None``, through ``lazysd.load`` and through the plain Mapping
(``model.load_state_dict(vsd, assign=True)``): bytes the server sent per rank and in total
against the plan's union.
Bytes are counted at the server. Medians of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lazysd and tests.support from this checkout

BUCKET = "bench"


def _env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
    }


def _options(endpoint: str, tag: str | None = None) -> dict:
    opts: dict = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    if tag:
        opts["config_kwargs"] = {"user_agent_extra": f"lazysd-tag/{tag}"}
    return opts


# ---- workers (each in a fresh process) --------------------------------------------------------
def _worker(method: str, url: str, endpoint: str, size: float) -> dict:
    import torch

    import lazysd
    from lazysd.testing import Step3p5Model, Step3p5Spec
    from tests.support.measure import PeakRSS

    spec = Step3p5Spec.sized(int(size))
    if method == "lazysd":
        # Imported before the clock starts, as the other methods' libraries are: the table
        # compares loading, not importing botocore (~0.5 s here).
        import s3fs  # noqa: F401

        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta")
        with PeakRSS(sample_s=None) as peak:
            report = lazysd.load(model, url, storage_options=_options(endpoint), assign=True)
        return {"seconds": peak.seconds, "peak": peak.total, "requests": report.requests}
    if method == "download":
        import fsspec

        fs = fsspec.filesystem("http")
        base = endpoint + "/" + url.split("://", 1)[1].rstrip("/")
        names = json.loads(os.environ["BENCH_FILES"])
        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta")
        with tempfile.TemporaryDirectory(prefix="lazysd-bench-dl-") as tmp, PeakRSS(sample_s=None) as peak:
            fs.get([f"{base}/{n}" for n in names], [f"{tmp}/{n}" for n in names])
            lazysd.load(model, tmp, assign=True)
        return {"seconds": peak.seconds, "peak": peak.total}
    if method == "runai":
        from runai_model_streamer import SafetensorsStreamer

        names = json.loads(os.environ["BENCH_FILES"])
        with PeakRSS(sample_s=None) as peak:
            files = [url + n for n in names if n.endswith(".safetensors")]
            out = {}
            with SafetensorsStreamer() as streamer:
                streamer.stream_files(files)
                for name, tensor in streamer.get_tensors():
                    out[name] = tensor.clone()  # the streamer reuses its buffer
        return {"seconds": peak.seconds, "peak": peak.total}
    raise ValueError(method)


def _rank(rank: int, world: int, url: str, endpoint: str, size: float, share: str | None, how: str) -> dict:
    """One rank's load from the endpoint, EP over all ranks: ``how`` is ``"load"``
    (``lazysd.load``: boxes shared point to point, lazysd.share) or ``"mapping"``
    (``model.load_state_dict(vsd, assign=True)``: values shared in shared memory,
    lazysd.nodeshare)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    import lazysd
    from lazysd import VirtualStateDict
    from lazysd.testing import Step3p5Model, Step3p5Spec
    from tests.support.servers import server_stats

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = Step3p5Model(Step3p5Spec.sized(int(size)), layout="native", dtype=torch.bfloat16, device="meta")
    tag = f"{how}-{share}-r{rank}"
    vsd = VirtualStateDict(url, mesh, storage_options=_options(endpoint, tag), share=share)
    need = {(k, tuple(vsd.local_box(k))): sum(n for _, _, n in vsd.planned_ranges([k])) for k in vsd}
    torch.distributed.barrier()
    before = server_stats(endpoint).get(tag, {"bytes": 0})["bytes"]  # the opening GETs are not the load
    t0 = time.perf_counter()
    if how == "load":
        report = lazysd.load(model, vsd, assign=True)
        read, received = report.bytes_read, report.bytes_received
    else:
        model.load_state_dict(vsd, assign=True)
        read, received = vsd.bytes_read, vsd.bytes_received
    seconds = time.perf_counter() - t0
    torch.distributed.barrier()
    served = server_stats(endpoint)[tag]["bytes"] - before
    vsd.close()
    return {"seconds": seconds, "read": read, "received": received, "need": need, "served": served}


# ---- driver -------------------------------------------------------------------------------------
def main() -> None:
    from lazysd.testing import Step3p5Spec, checkpoint_nbytes, ensure_checkpoint
    from tests.support.dist import run_ranks
    from tests.support.servers import RangeHTTPServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=5e8)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to every request")
    parser.add_argument("--bandwidth", type=float, default=2e8, help="bytes/s for all responses together")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/lazysd-bench")
    parser.add_argument("--ranks-only", action="store_true", help="only the 4-rank sharing table")
    parser.add_argument(
        "--sweep", action="store_true", help="only lazysd's load in this process under several RemoteOptions"
    )
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "URL", "ENDPOINT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, url, endpoint, size = args.worker
        os.environ.update(_env(endpoint))
        print(json.dumps(_worker(method, url, endpoint, float(size))))
        return

    spec = Step3p5Spec.sized(int(args.size))
    root = Path(args.dir) / "s3"
    path = ensure_checkpoint(root / BUCKET / f"remote{int(args.size)}", spec, verbose=True)
    total = checkpoint_nbytes(spec)
    with RangeHTTPServer(root) as s3:
        s3.endpoint_url = s3.url
        url = f"s3://{BUCKET}/{path.name}/"
        os.environ.update(_env(s3.endpoint_url))  # for the rank processes and runai
        os.environ["BENCH_FILES"] = json.dumps(sorted(p.name for p in path.iterdir() if p.is_file()))
        s3.faults.latency, s3.faults.bandwidth = args.latency, args.bandwidth
        print(
            f"## {total / 2**20:.0f} MiB bf16 checkpoint in {len(list(path.glob('*.safetensors')))} files, S3 endpoint "
            "on 127.0.0.1, "
            f"{args.latency * 1000:.0f} ms per request, {args.bandwidth / 1e6:.0f} MB/s cap; medians of {args.runs} "
            "runs\n"
        )
        if args.sweep:
            return _sweep(url, s3, spec, args.runs)
        print("| method | wall s | bytes from server | requests | peak RSS above start MiB |")
        print("|---|---:|---:|---:|---:|")
        walls: dict[str, float] = {}
        methods = (
            ()
            if args.ranks_only
            else (
                ("lazysd", "lazysd s3:// (ranged GETs)"),
                ("download", "download, then lazysd"),
                ("runai", "runai streamer"),
            )
        )
        for method, label in methods:
            if method == "runai" and not _runai_available():
                print(
                    f"| {label} | skipped: runai-model-streamer not installed (pip install runai-model-streamer "
                    "runai-model-streamer-s3) | | | |"
                )
                continue
            rows = []
            for _ in range(args.runs):
                before = s3.stats().get("total", {"bytes": 0, "requests": 0})
                row = _fresh(method, url, s3.endpoint_url, args.size)
                after = s3.stats()["total"]
                if "error" in row:
                    break
                rows.append(
                    {
                        **row,
                        "bytes": after["bytes"] - before["bytes"],
                        "requests": after["requests"] - before["requests"],
                    }
                )
            if not rows:
                print(f"| {label} | skipped, it failed here: {row['error'][:120]} | | | |")
                continue
            walls[method] = statistics.median(r["seconds"] for r in rows)
            print(
                f"| {label} | {walls[method]:.2f} | {statistics.median(r['bytes'] for r in rows):,.0f} | "
                f"{statistics.median(r['requests'] for r in rows):,.0f} | "
                f"{statistics.median(r['peak'] for r in rows) / 2**20:.0f} |"
            )
        if "lazysd" in walls:
            ratios = ", ".join(f"{m} {w / walls['lazysd']:.2f}x" for m, w in walls.items() if m != "lazysd")
            print(f"\nwall time relative to lazysd: {ratios}\n")

        print("### 4 ranks on one node, EP=4 (experts Shard(0), the rest replicated)\n")
        print(
            "| path, share | wall s | bytes from server, all ranks | union of needs | sum of needs | server / union "
            "| per rank read / received MiB |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        for label, how, share in (
            ("lazysd.load, node", "load", "node"),
            ("lazysd.load, None", "load", None),
            ("load_state_dict(vsd), node", "mapping", "node"),
            ("load_state_dict(vsd), None", "mapping", None),
        ):
            rows = []
            for _ in range(args.runs):
                s3.reset()
                s3.faults.latency, s3.faults.bandwidth = args.latency, args.bandwidth
                ranks = run_ranks(_rank, 4, (url, s3.endpoint_url, args.size, share, how), timeout=900)
                union: dict = {}
                for r in ranks:
                    union.update(r["need"])
                served = sum(r["served"] for r in ranks)
                rows.append(
                    (
                        max(r["seconds"] for r in ranks),
                        served,
                        sum(union.values()),
                        sum(sum(r["need"].values()) for r in ranks),
                        ranks,
                    )
                )
            wall = statistics.median(r[0] for r in rows)
            served, uni, tot, ranks = rows[-1][1], rows[-1][2], rows[-1][3], rows[-1][4]
            per = " ".join(f"{r['read'] / 2**20:.0f}/{r['received'] / 2**20:.0f}" for r in ranks)
            print(f"| {label} | {wall:.2f} | {served:,} | {uni:,} | {tot:,} | {served / uni:.2f}x | {per} |")


def _sweep(url: str, server: object, spec: object, runs: int) -> None:
    """Open and load times in this process (warm) for a few request shapes: is the link full?"""
    import torch

    import lazysd
    from lazysd import VirtualStateDict
    from lazysd.storage import RemoteOptions
    from lazysd.testing import Step3p5Model

    mib = 1 << 20
    shapes = [(8, 8), (16, 8), (32, 4), (64, 2)]  # (GETs in flight, MiB per GET); (16, 8) is the default
    print("| GETs in flight x MiB per GET | open s | load s | load MB/s | GETs |")
    print("|---|---:|---:|---:|---:|")
    VirtualStateDict(url, storage_options=_options(server.url)).close()  # imports and clients, untimed
    for inflight, size in shapes:
        rows = []
        for _ in range(runs):
            model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta")
            options = RemoteOptions(max_requests=inflight, request_bytes=size * mib)
            t0 = time.perf_counter()
            with VirtualStateDict(url, storage_options=_options(server.url), remote=options) as vsd:
                t1 = time.perf_counter()
                report = lazysd.load(model, vsd, assign=True)
                rows.append((t1 - t0, time.perf_counter() - t1, report.bytes_read, report.requests))
        opened, loaded = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"| {inflight} x {size} | {opened:.2f} | {loaded:.2f} | {rows[0][2] / loaded / 1e6:.0f} | {rows[0][3]} |")


def _fresh(method: str, url: str, endpoint: str, size: float) -> dict:
    from tests.support.measure import run_fresh

    return run_fresh(__file__, "--worker", method, url, endpoint, str(size))


def _runai_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("runai_model_streamer") is not None


if __name__ == "__main__":
    sys.exit(main())
