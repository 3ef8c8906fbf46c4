"""Remote checkpoints against real servers on 127.0.0.1: moto's S3 server, a GCS JSON API
server (read through gcsfs) and an HTTP server with ranges.

Values are compared bitwise with local loads; bytes and requests are counted at the server,
per client (each rank tags its requests); faults are injected by the servers themselves.
The servers and the uploaded checkpoints are shared by the whole module.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytest.importorskip("gcsfs")

from lazysd import CheckpointNotFoundError, FileChangedError, VirtualStateDict
from lazysd.errors import OptionError, RemoteAccessError, RemoteReadError
from lazysd.storage import RemoteOptions, coalesce, scrub_url
from lazysd.testing import Step3p5Spec, make_checkpoint
from lazysd.testing.families import FAMILIES, FamilySpec, make_family_checkpoint
from tests.support.checks import same_bits
from tests.support.dist import run_ranks, shard_parameters
from tests.support.servers import (
    FakeGCSServer,
    MotoS3Server,
    RangeHTTPServer,
    http_storage_options,
    server_stats,
)

# Experts of a few KiB each, so per-rank byte counts are meaningful.
SPEC = Step3p5Spec.tiny(
    hidden_size=128, moe_intermediate_size=64, moe_num_experts=8, share_expert_dim=32, intermediate_size=64
)
CASES = [(f, False) for f in FAMILIES] + [("deepseek_v3", True)]
IDS = [f + ("-fp8" if fp8 else "") for f, fp8 in CASES]
FAST = RemoteOptions(retries=3, backoff=0.01, retry_seconds=5.0, connect_timeout=2.0, read_timeout=5.0)
KINDS = ["s3", "http", "gs"]
FIXTURE = {"s3": "s3", "http": "http", "gs": "gcs"}  # kind -> the fixture of its server


def _family_spec(family: str, fp8: bool) -> FamilySpec:
    """The tiny model with two layers (dense and MoE, or two MoE; MTP besides where the family has
    one): every kind of tensor is there, with few requests to serve."""
    return dataclasses.replace(FamilySpec.tiny(family, fp8=fp8), num_hidden_layers=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    make_checkpoint(root / "step", SPEC, layout="split", seed=3)
    shutil.copytree(root / "step", root / "unindexed", ignore=shutil.ignore_patterns("*.index.json"))
    for family, fp8 in CASES:
        name = family + ("-fp8" if fp8 else "")
        make_family_checkpoint(root / name, _family_spec(family, fp8))
    return root


@pytest.fixture(scope="module")
def http(root: Path):
    with RangeHTTPServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def s3(root: Path):
    with MotoS3Server() as server:
        for d in sorted(root.iterdir()):
            server.upload(d, "ckpts", d.name)
        yield server


@pytest.fixture(scope="module")
def gcs(root: Path):
    with FakeGCSServer({"ckpts": root}) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_faults(request: pytest.FixtureRequest) -> None:
    for name in ("http", "s3", "gcs"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def _server(kind: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(FIXTURE[kind])


def _base(kind: str, server: Any) -> str:
    """The URL under which the module's checkpoints are, by name."""
    return f"{server.url}/" if kind == "http" else f"{kind}://ckpts/"


def _stats_url(kind: str, server: Any) -> str:
    return server.endpoint_url if kind == "s3" else server.url


def _url(kind: str, server: Any, name: str) -> tuple[str, dict]:
    """The URL and options of checkpoint ``name`` on ``server``; counters and faults cleared."""
    server.reset()
    return f"{_base(kind, server)}{name}/", server.storage_options("t")


def _values(vsd: VirtualStateDict) -> dict[str, torch.Tensor]:
    return {k: v.materialize() for k, v in vsd.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("family", "fp8"), CASES, ids=IDS)
def test_remote_load_is_bitwise_local(
    root: Path, kind: str, family: str, fp8: bool, request: pytest.FixtureRequest
) -> None:
    server = _server(kind, request)
    name = family + ("-fp8" if fp8 else "")
    url, options = _url(kind, server, name)
    with VirtualStateDict(root / name) as local, VirtualStateDict(url, storage_options=options) as remote:
        assert list(remote) == list(local)
        opened = server.stats()["t"]["bytes"]
        want, got = _values(local), _values(remote)
        for key in want:
            assert same_bits(got[key], want[key]), key
        assert remote.bytes_read == local.bytes_read == sum(n for _, _, n in remote.planned_ranges())
        # Every data byte served was planned, within the coalescing allowance.
        data = server.stats()["t"]["bytes"] - opened
        assert remote.bytes_read <= data <= remote.bytes_read * 1.01


@pytest.mark.parametrize("kind", KINDS)
def test_headers_take_one_request_per_file(root: Path, kind: str, request: pytest.FixtureRequest) -> None:
    server = _server(kind, request)
    url, options = _url(kind, server, "step")
    files = len(list((root / "step").glob("*.safetensors")))
    # Small speculative first reads, two in flight (the files' first GETs go ahead of the
    # headers' parsing two at a time): each header still needs only its one GET.
    opts = RemoteOptions(header_bytes=64 << 10, max_requests=2)
    with VirtualStateDict(url, storage_options=options, remote=opts) as vsd:
        assert vsd.bytes_read == 0
        gets = server.stats()["t"]["requests"]
        # config.json, the index, one ranged GET per safetensors file (length + header)
        assert gets == files + 2
        assert vsd.checkpoint.header_requests == files + 2


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_shards_without_an_index_are_found_by_listing(root: Path, kind: str, request: pytest.FixtureRequest) -> None:
    url, options = _url(kind, _server(kind, request), "unindexed")
    with VirtualStateDict(url, storage_options=options) as vsd, VirtualStateDict(root / "step") as local:
        assert len(vsd.checkpoint.files) == len(local.checkpoint.files) > 1
        want, got = _values(local), _values(vsd)
        assert all(same_bits(got[k], want[k]) for k in want)


def test_fake_gcs_server_answers_gcsfs_itself(root: Path, gcs: FakeGCSServer) -> None:
    """The GCS server speaks the API as gcsfs uses it: listing, metadata, ranged media reads."""
    from gcsfs.core import GCSFileSystem  # the plain client (no gRPC bucket-type probe)

    fs = GCSFileSystem(**gcs.storage_options(), skip_instance_cache=True)
    local = root / "step"
    assert fs.ls("ckpts/step") == [f"ckpts/step/{p.name}" for p in sorted(local.iterdir())]
    shard = sorted(local.glob("*.safetensors"))[1]
    info = fs.info(f"ckpts/step/{shard.name}")
    assert info["size"] == shard.stat().st_size and int(info["generation"]) > 0
    assert fs.cat_file(f"gs://ckpts/step/{shard.name}", start=100, end=5000) == shard.read_bytes()[100:5000]
    with pytest.raises(FileNotFoundError):
        fs.info("ckpts/step/nope.safetensors")


def test_gs_endpoint_from_storage_emulator_host(
    root: Path, gcs: FakeGCSServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gcsfs's own way to name another endpoint (as for fake-gcs-server) works as well."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    with VirtualStateDict("gs://ckpts/qwen3_moe/", storage_options={"token": "anon"}) as vsd:
        with VirtualStateDict(root / "qwen3_moe") as local:
            want, got = _values(local), _values(vsd)
    assert all(same_bits(got[k], want[k]) for k in want)
    assert gcs.stats()["total"]["bytes"] >= vsd.bytes_read > 0


def test_large_header_takes_a_second_request(root: Path, http: RangeHTTPServer) -> None:
    url, options = _url("http", http, "step")
    with VirtualStateDict(url, storage_options=options, remote=RemoteOptions(header_bytes=16)) as vsd:
        files = len(vsd.checkpoint.files)
        assert http.stats()["t"]["requests"] == 2 * files + 2
        assert vsd["model.norm.weight"].materialize().shape == (SPEC.hidden_size,)


def test_coalescing_stays_within_waste_bound() -> None:
    opts = RemoteOptions(gap_bytes=1 << 20, max_waste=0.01, request_bytes=8 << 20)
    reqs = coalesce([(0, 10_000), (10_050, 10_000), (20_100, 5)], opts)
    assert [(r.start, r.end) for r in reqs] == [(0, 20_105)]
    # a gap above 1% of the useful bytes is not read
    assert len(coalesce([(0, 100), (200, 100)], opts)) == 2
    # long runs are split into parallel parts of at most request_bytes
    assert [r.end - r.start for r in coalesce([(0, 20 << 20)], opts)] == [8 << 20, 8 << 20, 4 << 20]
    # pieces say where each part of a response lands in the caller's buffer (runs back to back)
    assert coalesce([(10_000, 5_000), (0, 10_000)], opts)[0].pieces == ((5_000, 0, 10_000), (0, 10_000, 5_000))


# ---- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_missing_shard_names_url_and_keys(kind: str, request: pytest.FixtureRequest) -> None:
    server = _server(kind, request)
    url, options = _url(kind, server, "step")
    server.faults.status["model-00002-of"] = 404
    with pytest.raises(CheckpointNotFoundError) as e:
        VirtualStateDict(url, storage_options=options, remote=FAST)
    msg = str(e.value)
    assert "model-00002-of-" in msg and url.rstrip("/").split("//")[-1].split("/", 1)[-1] in msg
    assert "'model." in msg  # the index keys that shard holds


@pytest.mark.parametrize("kind", KINDS)
def test_forbidden_is_an_access_error_without_credentials(kind: str, request: pytest.FixtureRequest) -> None:
    server = _server(kind, request)
    url, options = _url(kind, server, "step")
    with VirtualStateDict(url, storage_options=options, remote=FAST) as vsd:
        server.faults.status["model-00003-of"] = 403
        key = next(k for k in vsd if vsd.entry(k).sources[0].info.file.name.startswith("model-00003-of"))
        with pytest.raises(RemoteAccessError) as e:
            vsd[key].materialize()
    msg = str(e.value)
    assert "model-00003-of-" in msg and "key '" in msg and "403" in msg or "AccessDenied" in msg
    assert "testing" not in msg


@pytest.mark.parametrize("kind", KINDS)
def test_dropped_connections_and_throttling_are_retried(root: Path, kind: str, request: pytest.FixtureRequest) -> None:
    server = _server(kind, request)
    url, options = _url(kind, server, "step")
    with VirtualStateDict(root / "step") as local:
        want = _values(local)
    with VirtualStateDict(url, storage_options=options, remote=RemoteOptions(retries=6, backoff=0.01)) as vsd:
        server.faults.drop[".safetensors"] = 3
        server.faults.throttle[".safetensors"] = 3
        got = _values(vsd)
        assert server.faults.drop[".safetensors"] == server.faults.throttle[".safetensors"] == 0  # all injected
        assert vsd.checkpoint.store.retried >= 3
        # lazysd's retries are the only ones: the server saw exactly the requests lazysd counted
        assert server.stats()["t"]["requests"] == vsd.checkpoint.requests
    assert all(same_bits(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kind", KINDS)
def test_persistent_5xx_gives_up_in_bounded_time(kind: str, request: pytest.FixtureRequest) -> None:
    server = _server(kind, request)
    url, options = _url(kind, server, "step")
    with VirtualStateDict(url, storage_options=options, remote=FAST) as vsd:
        server.faults.throttle[".safetensors"] = 10**6
        t0 = time.monotonic()
        with pytest.raises(RemoteReadError, match=r"gave up after 4 attempt"):
            vsd["model.norm.weight"].materialize()
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("kind", KINDS)
def test_object_replaced_mid_load(root: Path, kind: str, request: pytest.FixtureRequest) -> None:
    server = _server(kind, request)
    name = f"replaced-{kind}"
    shutil.copytree(root / "step", root / name)
    if kind == "s3":  # the HTTP and GCS servers serve the files under root as they are now
        server.upload(root / name, "ckpts", name)
    url, options = _url(kind, server, name)
    with VirtualStateDict(url, storage_options=options, remote=FAST) as vsd:
        keys = list(vsd)
        vsd[keys[0]].materialize()
        # Same size, different bytes: only the ETag (GCS: the generation) tells. The file
        # already read from: each GET must check, not only the first of a file.
        victim = root / name / vsd.entry(keys[0]).sources[0].info.file.name
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.with_suffix(".tmp").write_bytes(bytes(data))
        os.replace(victim.with_suffix(".tmp"), victim)
        if kind == "s3":
            server.client().upload_file(str(victim), "ckpts", f"{name}/{victim.name}")
        with pytest.raises(FileChangedError, match=victim.name):
            for key in keys:
                vsd[key].materialize()


def test_unreachable_endpoint_fails_fast_and_clearly() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for url, options in [
        (f"http://127.0.0.1:{port}/ckpt/", {}),
        (
            "s3://bucket/ckpt/",
            {"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIDSECRETVALUE", "secret": "SUPERSECRET"},
        ),
        ("gs://bucket/ckpt/", {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon"}),
    ]:
        t0 = time.monotonic()
        with pytest.raises((RemoteReadError, CheckpointNotFoundError)) as e:
            VirtualStateDict(url, storage_options=options, remote=FAST)
        assert time.monotonic() - t0 < 15
        assert "127.0.0.1" in str(e.value) or "ckpt" in str(e.value)
        assert "SUPERSECRET" not in str(e.value) and "AKIDSECRETVALUE" not in str(e.value)


def test_credentials_never_shown(s3: MotoS3Server) -> None:
    assert scrub_url("https://user:pa55@host/x/?sig=abc") == "https://host/x/"
    options = s3.storage_options("t")
    with VirtualStateDict("s3://ckpts/step/", storage_options=options) as vsd:
        text = repr(vsd) + repr(vsd.checkpoint) + str(vsd.explain(next(iter(vsd))))
        s3.faults.status["model-00001-of"] = 403
        with pytest.raises(RemoteAccessError) as e:
            for key in vsd:
                vsd[key].materialize()
    for shown in (text, str(e.value)):
        assert "testing" not in shown  # the access key and secret of the test server


def test_http_url_credentials_scrubbed(http: RangeHTTPServer) -> None:
    url = http.url.replace("http://", "http://alice:hunter22@") + "/missing/"
    with pytest.raises(CheckpointNotFoundError) as e:
        VirtualStateDict(url, remote=FAST)
    assert "hunter22" not in str(e.value) and "alice" not in str(e.value)


def test_mmap_is_refused_for_remote(http: RangeHTTPServer) -> None:
    with pytest.raises(ValueError, match="mmap=True maps local files only"):
        VirtualStateDict(f"{http.url}/step/", mmap=True)


def test_local_paths_import_nothing_remote(root: Path) -> None:
    code = (
        "import sys, lazysd; from lazysd import VirtualStateDict; "
        f"v = VirtualStateDict({str(root / 'step')!r}); v[next(iter(v))].materialize(); "
        "bad = [m for m in ('fsspec', 's3fs', 'gcsfs', 'google.auth', 'aiohttp', 'huggingface_hub', 'botocore') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    )


def test_inspect_cli_on_s3_reports_requests(
    root: Path, s3: MotoS3Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lazysd.cli import main

    s3.reset()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert main(["inspect", "s3://ckpts/step/", "--ep", "4"]) == 0
    out = capsys.readouterr().out
    assert "GETs" in out and "ranged GET requests (after coalescing)" in out
    assert "tensor bytes read: 0" in out
    files = len(list((root / "step").glob("*.safetensors")))
    # headers only: config.json, the index and one GET per file, no tensor data
    assert s3.stats()["total"] == {"requests": files + 2, "bytes": s3.stats()["total"]["bytes"]}
    with VirtualStateDict("s3://ckpts/step/") as vsd:
        # the dry run's GET count is what a load then makes
        planned = vsd.rank_plan(1).ranks[0].requests
        _values(vsd)
        assert vsd.checkpoint.read_calls == planned > 0


# ---- several ranks -------------------------------------------------------------------------


def _local(value: Any) -> torch.Tensor:
    return getattr(value, "_local_tensor", value).materialize()


def _tagged(kind: str, options: dict, tag: str) -> dict:
    """``options`` with the client tagged ``tag`` (each rank is counted on its own at the server)."""
    if kind == "http":
        return http_storage_options(tag)
    if kind == "gs":
        return {**options, "session_kwargs": {"headers": {"X-Lazysd-Tag": tag}}}
    return {**options, "config_kwargs": {"user_agent_extra": f"lazysd-tag/{tag}"}}


def _ranks_match_local(rank: int, world: int, root: str, kinds: dict[str, list[str]], sources: dict) -> dict:
    """EP over ``world`` ranks, each checkpoint from the servers ``kinds`` names for it: each
    rank's values bitwise equal to a local load of the same rank, and the bytes and requests
    the server counted for this rank equal to its plan (one process per rank, all checkpoints
    in turn)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    out = {}
    for name, name_kinds in kinds.items():
        with VirtualStateDict(Path(root) / name, mesh) as vsd:
            want = {k: _local(v) for k, v in vsd.items()}
            local_plan = vsd.planned_ranges()
        for kind in name_kinds:
            base, options, stats_url = sources[kind]
            tag = f"{kind}-w{world}-r{rank}"
            # share=None: each rank reads its own whole plan (node sharing would split it)
            opts = _tagged(kind, options, tag)
            with VirtualStateDict(f"{base}{name}/", mesh, storage_options=opts, share=None) as vsd:
                assert list(vsd) == list(want), (name, kind)
                assert [(str(f).rsplit("/", 1)[-1], o, n) for f, o, n in vsd.planned_ranges()] == [
                    (str(f).rsplit("/", 1)[-1], o, n) for f, o, n in local_plan
                ], (name, kind)
                before = server_stats(stats_url).get(tag, {"requests": 0, "bytes": 0})
                requests0 = vsd.checkpoint.requests
                for key, value in vsd.items():
                    assert same_bits(_local(value), want[key]), (name, kind, key)
                after = server_stats(stats_url)[tag]
                out[name, kind] = {
                    "planned": sum(n for _, _, n in vsd.planned_ranges()),
                    "read": vsd.bytes_read,
                    "served": after["bytes"] - before["bytes"],
                    "requests": after["requests"] - before["requests"],
                    "client_requests": vsd.checkpoint.requests - requests0,
                }
    return out


# One rank is test_remote_load_is_bitwise_local (same checks, no process group needed).
@pytest.mark.parametrize("world", [2, 4])
def test_every_family_on_ranks_is_local_bitwise_and_read_as_planned(
    root: Path, http: RangeHTTPServer, s3: MotoS3Server, gcs: FakeGCSServer, world: int
) -> None:
    """EP=2 and EP=4 (gloo, one process per rank) for every family, FP8 with its scales
    included, and Step-3.5: bitwise equal per rank, bytes per rank counted at the server within
    1% of the plan, requests counted there as lazysd reports. EP=2 reads every checkpoint from
    each of S3, GCS and HTTP; EP=4 (four processes on two cores) each from one of them, in turn,
    so that every family and every protocol runs at EP=4 too."""
    names = ["step"] + [family + ("-fp8" if fp8 else "") for family, fp8 in CASES]
    if world == 2:
        kinds = {name: KINDS for name in names}
    else:
        kinds = {name: [KINDS[(i + 2) % len(KINDS)]] for i, name in enumerate(names)}
        assert kinds["deepseek_v3-fp8"] == ["s3"] and {k for ks in kinds.values() for k in ks} == set(KINDS)
    sources = {
        kind: (_base(kind, server), server.storage_options(), _stats_url(kind, server))
        for kind, server in (("s3", s3), ("http", http), ("gs", gcs))
    }
    results = run_ranks(_ranks_match_local, world, (str(root), kinds, sources), timeout=300)
    for name in names:
        whole = sum(n for _, _, n in VirtualStateDict(root / name).planned_ranges())
        for kind in kinds[name]:
            per_rank = [r[name, kind] for r in results]
            for rank, r in enumerate(per_rank):
                assert r["read"] == r["planned"] > 0, (name, kind, rank, r)
                assert r["planned"] <= r["served"] <= r["planned"] * 1.01, (name, kind, rank, r)
                assert r["requests"] == r["client_requests"] > 0, (name, kind, rank, r)
            # experts split: a rank plans less than the whole checkpoint, the ranks together at least all
            assert all(r["planned"] < whole for r in per_rank), (name, kind, per_rank, whole)
            assert sum(r["planned"] for r in per_rank) >= whole, (name, kind)



def _load_shared(rank: int, world: int, url: str, options: dict, stats_url: str, share: str | None, ep: bool) -> dict:
    import lazysd
    from lazysd.testing import Step3p5Model

    tag = f"share-{share}-{ep}-r{rank}"
    options = http_storage_options(tag)
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    if ep:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        shard_parameters(model, mesh, lambda k, p: (Shard(0),) if ".experts." in k else None)
        vsd = VirtualStateDict(url, like=model, storage_options=options, share=share)
    else:
        vsd = VirtualStateDict(url, storage_options=options, share=share)
    with vsd:
        before = server_stats(stats_url).get(tag, {"bytes": 0})["bytes"]
        report = lazysd.load(model, vsd)
        served = server_stats(stats_url)[tag]["bytes"] - before
        need = {k: sum(n for _, _, n in vsd.planned_ranges([k])) for k in vsd}
        boxes = {k: tuple(vsd.local_box(k)) for k in vsd}
    state = {k: getattr(v, "_local_tensor", v).detach().clone() for k, v in model.state_dict().items()}
    return {
        "served": served,
        "read": report.bytes_read,
        "received": report.bytes_received,
        "need": need,
        "boxes": boxes,
        "state": state,
    }


def _load_shared_local(rank: int, world: int, path: str, share: str | None) -> dict:
    import lazysd
    from lazysd.testing import Step3p5Model

    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    with VirtualStateDict(path, share=share) as vsd:
        report = lazysd.load(model, vsd)
        need = {k: sum(n for _, _, n in vsd.planned_ranges([k])) for k in vsd}
    return {"read": report.bytes_read, "received": report.bytes_received, "need": need, "state": model.state_dict()}


def _load_shared_all(rank: int, world: int, url: str, stats_url: str, local: str) -> dict:
    out = {
        (share, ep): _load_shared(rank, world, url, {}, stats_url, share, ep)
        for ep in (False, True)
        for share in ("node", None)
    }
    out.update({(share, "local"): _load_shared_local(rank, world, local, share) for share in ("node", None)})
    return out


def test_four_ranks_of_a_node_read_the_union(root: Path, http: RangeHTTPServer) -> None:
    """Replicated (every rank needs everything) and EP=4 (experts split, the rest replicated),
    from a remote checkpoint (bytes counted at the server) and a local one (lazysd's counts)."""
    results = run_ranks(_load_shared_all, 4, (f"{http.url}/step/", http.url, str(root / "step")), timeout=300)
    for ep in (False, True):
        _check_union([r[("node", ep)] for r in results], [r[(None, ep)] for r in results])
    on, off = [r[("node", "local")] for r in results], [r[(None, "local")] for r in results]
    union = sum(on[0]["need"].values())  # replicated: every rank needs the same
    assert sum(r["read"] for r in on) == union  # 1.00x on the node
    assert sum(r["read"] for r in off) == 4 * union
    assert sum(r["received"] for r in on) == 3 * union
    for a, b in zip(on, off):
        assert all(same_bits(a["state"][k], b["state"][k]) for k in a["state"])


def _check_union(on: list[dict], off: list[dict]) -> None:
    union: dict[tuple, int] = {}
    for r in on:
        for k, n in r["need"].items():
            union[(k, r["boxes"][k])] = n
    total_union = sum(union.values())
    total_sum = sum(sum(r["need"].values()) for r in on)
    served_on = sum(r["served"] for r in on)
    served_off = sum(r["served"] for r in off)
    assert total_union <= served_on <= total_union * 1.01  # the node read the union, 1.00x
    assert total_sum <= served_off <= total_sum * 1.01  # without sharing: the sum
    assert served_off > 1.5 * served_on
    for a, b in zip(on, off):  # same values either way, bitwise
        assert a["state"].keys() == b["state"].keys()
        assert all(same_bits(a["state"][k], b["state"][k]) for k in a["state"])
        assert a["received"] > 0 and b["received"] == 0


# ---- the Hub, HFReader, HFCheckpointView ------------------------------------------------------


@pytest.fixture(scope="module")
def hub(root: Path):  # noqa: ANN201
    pytest.importorskip("huggingface_hub")
    from tests.support.servers import FakeHubServer

    repos = {"org/step": root / "step", "org/dsv3-fp8": root / "deepseek_v3-fp8"}
    with FakeHubServer(repos, gated=("org/gated",)) as server:
        yield server


@pytest.mark.parametrize("form", ["hf-url", "hf-rev", "hf-revision-kwarg", "repo-id"])
def test_hub_reads_ranges_bitwise(root: Path, hub, form: str) -> None:  # noqa: ANN001
    """hf://org/repo[@rev] and remote=True read exact ranges through HfFileSystem (a local
    server speaking the Hub API: repo info, paths-info, ranged resolve URLs)."""
    hub.reset()
    options = {"endpoint": hub.url, "token": False}
    if form == "hf-url":
        vsd = VirtualStateDict("hf://org/dsv3-fp8", storage_options=options)
        local_dir = root / "deepseek_v3-fp8"
    elif form == "hf-rev":
        vsd = VirtualStateDict(f"hf://org/step@{hub.sha}", storage_options=options)
        local_dir = root / "step"
    elif form == "hf-revision-kwarg":
        vsd = VirtualStateDict("hf://org/step", revision=hub.sha, storage_options=options)
        local_dir = root / "step"
    else:
        vsd = VirtualStateDict("org/step", remote=True, revision="main", storage_options=options)
        local_dir = root / "step"
    with vsd, VirtualStateDict(local_dir) as local:
        # pinned to the commit the revision named when opened
        assert vsd.checkpoint.store.root.endswith(f"@{hub.sha}")
        opened = hub.stats()["total"]["bytes"]
        want, got = _values(local), _values(vsd)
        assert all(same_bits(got[k], want[k]) for k in want)
        assert vsd.bytes_read <= hub.stats()["total"]["bytes"] - opened <= vsd.bytes_read * 1.01


def test_hub_missing_repo_is_not_found(hub) -> None:  # noqa: ANN001
    with pytest.raises(CheckpointNotFoundError, match="org/nope"):
        VirtualStateDict("hf://org/nope", storage_options={"endpoint": hub.url, "token": False})
    with pytest.raises(CheckpointNotFoundError, match="org/step@v9"):
        VirtualStateDict("org/step", remote=True, revision="v9", storage_options={"endpoint": hub.url, "token": False})
    with pytest.raises(OptionError, match="names a revision already"):
        VirtualStateDict("hf://org/step@main", revision="v9")


def test_hub_gated_repo_is_an_access_error(hub) -> None:  # noqa: ANN001
    """A repo the token may not read (the Hub answers 403) is said to be so, not "missing"."""
    with pytest.raises(RemoteAccessError, match="org/gated"):
        VirtualStateDict("hf://org/gated", storage_options={"endpoint": hub.url, "token": False})


def test_dcp_hfreader_reads_a_remote_checkpoint(root: Path, s3: MotoS3Server, http: RangeHTTPServer) -> None:
    import torch.distributed.checkpoint as dcp

    from lazysd.dcp import HFReader

    with VirtualStateDict(root / "step") as local:
        want = _values(local)
    for url, options in (("s3://ckpts/step/", s3.storage_options()), (f"{http.url}/step/", None)):
        sd = {k: torch.full(v.shape, -7, dtype=v.dtype) for k, v in want.items()}
        reader = HFReader(url, storage_options=options)
        dcp.load(sd, storage_reader=reader, no_dist=True)
        assert all(same_bits(sd[k], want[k]) for k in want)
        assert reader.bytes_read == sum(e.nbytes for e in reader.vsd.plan.entries.values())
        hf = HFReader(url, native=False, storage_options=options)
        assert len(hf.read_metadata().state_dict_metadata) == len(hf.checkpoint.tensors)


def test_hf_checkpoint_view_reads_a_remote_checkpoint(root: Path, s3: MotoS3Server) -> None:
    from lazysd.automodel import HFCheckpointView
    from lazysd.testing import load_hf_tensors

    want = load_hf_tensors(root / "step")
    view = HFCheckpointView("s3://ckpts/step/", storage_options=s3.storage_options())
    assert set(view) == set(want)
    key = next(iter(want))
    assert same_bits(view[key].materialize(), want[key])


def test_reads_after_close_fail_like_local(http: RangeHTTPServer) -> None:
    vsd = VirtualStateDict(f"{http.url}/step/", storage_options=http_storage_options("t"))
    value = vsd["model.norm.weight"]
    vsd.close()
    with pytest.raises(FileChangedError, match="checkpoint was closed"):
        value.materialize()
