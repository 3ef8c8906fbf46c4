"""Node sharing on the plain Mapping path (``model.load_state_dict(vsd)``, lazysd.nodeshare).

Real gloo ranks on one machine (one node): values bitwise equal to unshared loads, the node
reading the union of its ranks' needs (lazysd's counts locally, the server's remotely), ranks
loading other keys or in another order, a rank killed mid-load, and shared memory left empty.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lazysd import VirtualStateDict
from lazysd.testing import Step3p5Spec, make_checkpoint
from tests.support.checks import same_bits
from tests.support.dist import _entry, run_ranks

SPEC = Step3p5Spec.tiny(
    hidden_size=128, moe_intermediate_size=64, moe_num_experts=8, share_expert_dim=32, intermediate_size=64
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("share") / "step", SPEC, layout="split", seed=11)


@pytest.fixture
def shm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private directory in shared memory for the ranks' published boxes (checked empty after)."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path_factory.getbasetemp()
    where = Path(tempfile.mkdtemp(prefix="lzsd-test-share-", dir=base))
    yield where
    import shutil

    shutil.rmtree(where, ignore_errors=True)


def _model(rank: int, mesh):  # noqa: ANN001, ANN202
    """The tiny Step3p5 model; with ``mesh``, experts ``Shard(0)`` over its "ep" dim (DTensors)."""
    from lazysd.testing import Step3p5Model

    torch.manual_seed(rank)
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    if mesh is None:
        return model
    from torch.distributed.tensor import Replicate, Shard

    from tests.support.dist import shard_parameters

    placements = tuple(Shard(0) if n == "ep" else Replicate() for n in mesh.mesh_dim_names)
    shard_parameters(model, mesh, lambda key, param: placements if ".experts." in key else None)
    for key, param in model.named_parameters():
        if ".experts." in key:
            param.requires_grad_(False)
    return model


def _mesh(world: int, ep: int | None):  # noqa: ANN202
    if ep is None:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: getattr(v, "_local_tensor", v).detach().clone() for k, v in model.state_dict().items()}


def _load(rank: int, world: int, path: str, shm: str, ep: int | None, share: str | None, stats_url: str) -> dict:
    """One ``model.load_state_dict(vsd)``: what this rank read, took, needed, and its values
    (and, from a server at ``stats_url``, the bytes it served this rank for the load)."""
    from tests.support.servers import http_storage_options, server_stats

    os.environ["LAZYSD_SHM_DIR"] = shm
    mesh = _mesh(world, ep)
    model = _model(rank, mesh)
    tag = f"share-{share}-{ep}-r{rank}"
    options = {"storage_options": http_storage_options(tag)} if stats_url else {}
    with VirtualStateDict(path, mesh, share=share, **options) as vsd:
        torch.distributed.barrier()  # every rank has opened it (a rank done before another opened reads alone)
        served = server_stats(stats_url).get(tag, {"bytes": 0})["bytes"] if stats_url else 0
        model.load_state_dict(vsd)
        served = server_stats(stats_url)[tag]["bytes"] - served if stats_url else 0
        need = {(k, tuple(vsd.local_box(k))): sum(n for _, _, n in vsd.planned_ranges([k])) for k in vsd}
        out = {"read": vsd.bytes_read, "received": vsd.bytes_received, "need": need, "state": _state(model)}
        out["served"], out["tensors"] = served, vsd.stats.tensors
    import torch.distributed as dist

    dist.barrier()  # every rank has closed its VirtualStateDict: the node directory must be gone
    out["left"] = sorted(os.listdir(shm))
    return out


def _load_both(rank: int, world: int, path: str, shm: str, ep: int | None, stats_url: str = "") -> dict:
    return {share: _load(rank, world, path, shm, ep, share, stats_url) for share in ("node", None)}


def _check(results: list[dict], *, served: bool = False) -> None:
    on, off = [r["node"] for r in results], [r[None] for r in results]
    union: dict[tuple, int] = {}
    for r in on:
        union.update(r["need"])
    total_union, total_sum = sum(union.values()), sum(sum(r["need"].values()) for r in on)
    assert sum(r["read"] for r in on) == total_union  # 1.00x: the node read the union
    assert sum(r["read"] for r in off) == total_sum  # unshared: the sum
    assert total_sum > 1.5 * total_union
    for a, b in zip(on, off):
        assert sum(a["need"].values()) == a["read"] + a["received"]  # what it needs, read or taken
        assert b["received"] == 0
        assert a["tensors"] == b["tensors"] == len(a["need"])  # every value counted once, read or taken
        assert a["state"].keys() == b["state"].keys()
        assert all(same_bits(a["state"][k], b["state"][k]) for k in a["state"])
        assert a["left"] == b["left"] == []  # nothing left in shared memory
    if served:
        assert total_union <= sum(r["served"] for r in on) <= total_union * 1.01
        assert total_sum <= sum(r["served"] for r in off) <= total_sum * 1.01


@pytest.mark.parametrize(("world", "ep"), [(2, None), (4, None), (4, 2)], ids=["2-replicated", "4-replicated", "4-ep2"])
def test_ranks_of_a_node_read_the_union(ckpt: Path, shm: Path, world: int, ep: int | None) -> None:
    """Replicated tensors (every rank needs them) and, with EP=2 on 4 ranks, experts too
    (ranks 0 and 2 hold the same experts, as do 1 and 3)."""
    _check(run_ranks(_load_both, world, (str(ckpt), str(shm), ep), timeout=240))


def test_remote_node_reads_the_union_at_the_server(ckpt: Path, shm: Path) -> None:
    """From an HTTP server honouring ranges: the bytes it serves to the node are the union."""
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    from tests.support.servers import RangeHTTPServer

    with RangeHTTPServer(ckpt.parent) as http:
        url = f"{http.url}/{ckpt.name}/"
        _check(run_ranks(_load_both, 4, (url, str(shm), 2, http.url), timeout=240), served=True)


def _load_differently(rank: int, world: int, path: str, shm: str) -> dict:
    """Rank 0: every key in reverse order; rank 1: every other key, then three by hand
    (``vsd[k].materialize()``, as in a notebook); rank 2: nothing at all."""
    os.environ["LAZYSD_SHM_DIR"] = shm
    mesh = _mesh(world, 2)
    model = _model(rank, mesh)
    t0 = time.monotonic()
    with VirtualStateDict(path, mesh) as vsd:
        torch.distributed.barrier()
        keys = list(vsd)
        if rank == 0:
            model.load_state_dict({k: vsd[k] for k in reversed(keys)})
            got = _state(model)
        elif rank == 1:
            model.load_state_dict({k: vsd[k] for k in keys[::2]}, strict=False)
            got = {k: v for k, v in _state(model).items() if k in keys[::2]}
            for k in keys[1:7:2]:
                got[k] = getattr(vsd[k], "_local_tensor", vsd[k]).materialize()
        elif rank == 2:
            got = {}
        else:
            model.load_state_dict(vsd)
            got = _state(model)
        received = vsd.bytes_received
    with VirtualStateDict(path, mesh, share=None) as alone:
        want = {k: getattr(alone[k], "_local_tensor", alone[k]).materialize() for k in got}
    import torch.distributed as dist

    dist.barrier()
    return {
        "same": all(same_bits(got[k], want[k]) for k in want),
        "keys": len(got),
        "seconds": time.monotonic() - t0,
        "received": received,
        "left": sorted(os.listdir(shm)),
    }


def test_ranks_loading_other_keys_in_other_orders(ckpt: Path, shm: Path) -> None:
    """Ranks that load other subsets, in other orders, or nothing: right values, no waiting
    for a rank that never comes (well under the 300 s a wait may last), shared memory empty."""
    results = run_ranks(_load_differently, 4, (str(ckpt), str(shm)), timeout=240)
    assert all(r["same"] for r in results), results
    assert [r["keys"] > 0 for r in results] == [True, True, False, True]
    assert all(r["seconds"] < 60 for r in results)
    assert sum(r["received"] for r in results) > 0  # some boxes were still taken from others
    assert all(r["left"] == [] for r in results)


def _load_or_die(rank: int, world: int, path: str, shm: str, out: str) -> dict:
    """Rank 2 kills itself (SIGKILL: no clean-up of its own) in its first read from storage,
    holding the claim of the box it reads; or, had it read nothing, before closing."""
    os.environ["LAZYSD_SHM_DIR"] = shm
    mesh = _mesh(world, None)
    model = _model(rank, mesh)

    opened = []

    def progress(stats, entry) -> None:  # noqa: ANN001
        if rank == 2 and opened and opened[0].bytes_read:  # called inside a read, holding its claim
            os.kill(os.getpid(), signal.SIGKILL)

    with VirtualStateDict(path, progress=progress) as vsd:
        opened.append(vsd)
        torch.distributed.barrier()
        model.load_state_dict(vsd)
        received = vsd.bytes_received
        if rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    with VirtualStateDict(path, share=None) as alone:
        want = {k: v.materialize() for k, v in alone.items()}
    got = _state(model)
    return {"same": all(same_bits(got[k], want[k]) for k in want), "received": received}


def test_a_rank_killed_mid_load_leaves_no_shared_memory(ckpt: Path, shm: Path) -> None:
    """Rank 2 of 3 dies holding a claim or a published box: the others finish with the right
    values, read what it would have read, and the last of them removes the node directory."""
    world = 3
    with tempfile.TemporaryDirectory(prefix="lazysd-kill-") as tmp:
        ctx = multiprocessing.get_context("forkserver")
        args = (str(ckpt), str(shm), tmp)
        procs = [
            ctx.Process(target=_entry, args=(r, _load_or_die, world, str(Path(tmp) / "rdzv"), tmp, args))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 240
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "ranks did not finish"
        assert procs[2].exitcode == -signal.SIGKILL
        for r in (0, 1):
            status, value = pickle.loads(Path(tmp, f"rank{r}.pkl").read_bytes())
            assert status == "ok", value
            assert value["same"]
    assert os.listdir(shm) == []


def test_leftovers_of_dead_ranks_are_swept(ckpt: Path, shm: Path) -> None:
    """A node directory no live process holds (every rank killed) goes at the next sweep;
    one that a live process holds, and one just being made, stay."""
    import fcntl

    from lazysd.shm import STALE_SECONDS, sweep

    names = {n: f"lazysd-node-{(n.encode().hex() * 4)[:32]}" for n in ("dead", "held", "yong", "olds")}
    dead, held, young, old = (shm / names[n] for n in ("dead", "held", "yong", "olds"))
    (shm / "lazysd-other").mkdir()  # not a node directory: never swept
    for d in (dead, held, young, old):
        d.mkdir()
    for d in (dead, held):
        (d / "members").touch()
        (d / "0123abcd").write_bytes(b"x" * 100)  # a published box
    fd = os.open(held / "members", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    stale = time.time() - STALE_SECONDS - 5
    os.utime(old, (stale, stale))
    try:
        assert sorted(sweep(str(shm))) == sorted([dead.name, old.name])
        assert sorted(os.listdir(shm)) == sorted([held.name, young.name, "lazysd-other"])
    finally:
        os.close(fd)


def test_a_single_process_never_shares(ckpt: Path, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSD_SHM_DIR", str(shm))
    with VirtualStateDict(ckpt) as vsd:
        assert vsd._nodeshare is None
        sum(v.float().sum() for v in vsd.values())
        assert vsd.bytes_received == 0
    assert os.listdir(shm) == []


def _attach(vsd: VirtualStateDict, rank: int, store, **options) -> None:  # noqa: ANN001
    """Share ``vsd``'s values as rank ``rank`` of 2 on ``store`` (both ranks on this node)."""
    from lazysd.nodeshare import NodeShare
    from lazysd.shm import node_name

    store.set(f"lazysd/share/node/{1 - rank}", node_name())  # the other rank is on this node
    vsd._nodeshare = NodeShare(vsd.checkpoint, vsd.reader, None, rank=rank, world=2, store=store, **options)


def test_two_versions_of_a_checkpoint_never_mix(
    tmp_path: Path, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 read (and published) a tensor before the checkpoint's files were replaced,
    rank 1 opened it after: same path, keys and shapes, other file identities. Rank 1 reads
    its own version instead of taking rank 0's."""
    monkeypatch.setenv("LAZYSD_SHM_DIR", str(shm))
    store = torch.distributed.HashStore()
    path = make_checkpoint(tmp_path / "ckpt", SPEC, layout="split", seed=1)
    key = "model.embed_tokens.weight"
    with VirtualStateDict(path) as old:
        _attach(old, 0, store)
        a = old[key].materialize()
        share = old._nodeshare
        assert old.bytes_read == a.numel() * a.element_size() and share.bytes_published == old.bytes_read
        make_checkpoint(tmp_path / "new", SPEC, layout="split", seed=2)
        for f in (tmp_path / "new").iterdir():
            os.replace(f, path / f.name)  # new inodes under the old names, as save_hf does
        with VirtualStateDict(path) as new:
            _attach(new, 1, store)
            b = new[key].materialize()
            assert new.bytes_received == 0 and new.bytes_read == old.bytes_read
            assert not torch.equal(a, b)
            with VirtualStateDict(path, share=None) as plain:
                assert same_bits(b, plain[key].materialize())
    assert os.listdir(shm) == []


def test_a_box_stuck_with_another_rank_is_read_after_the_wait(
    ckpt: Path, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim held by a rank that never publishes (stuck, stopped in a debugger): the
    waiting rank reads the box itself after ``wait_seconds``, with the right values."""
    from lazysd import shm as node_shm

    monkeypatch.setenv("LAZYSD_SHM_DIR", str(shm))
    store = torch.distributed.HashStore()
    key = "model.norm.weight"
    with VirtualStateDict(ckpt) as vsd, VirtualStateDict(ckpt, share=None) as plain:
        _attach(vsd, 1, store, wait_seconds=0.5)
        share = vsd._nodeshare
        where = share._state.join(share._job, share._identity)
        value = vsd[key]
        name = os.path.join(where, share._digest(vsd.entry(key), value.box, value.dtype, "cpu").hex())
        stuck = node_shm.claim(name)  # the other rank's claim, never released
        try:
            t0 = time.monotonic()
            got = value.materialize()
            assert 0.5 <= time.monotonic() - t0 < 60  # waited, then read: no hang (bound loose for loaded machines)
        finally:
            os.close(stuck)
        assert same_bits(got, plain[key].materialize())
        assert vsd.bytes_received == 0 and vsd.bytes_read == got.numel() * got.element_size()
    assert os.listdir(shm) == []


def _load_twice(rank: int, world: int, path: str, shm: str) -> dict:
    """The same VirtualStateDict loaded twice (and a second model): shared both times."""
    os.environ["LAZYSD_SHM_DIR"] = shm
    with VirtualStateDict(path) as vsd:
        torch.distributed.barrier()
        model = _model(rank, None)
        model.load_state_dict(vsd)
        first = (vsd.bytes_read, vsd.bytes_received)
        again = _model(rank + 10, None)
        again.load_state_dict(vsd)
        second = (vsd.bytes_read - first[0], vsd.bytes_received - first[1])
        same = all(same_bits(a, b) for a, b in zip(_state(model).values(), _state(again).values()))
    import torch.distributed as dist

    dist.barrier()
    return {"first": first, "second": second, "same": same, "left": sorted(os.listdir(shm))}


def test_loading_twice_shares_twice(ckpt: Path, shm: Path) -> None:
    results = run_ranks(_load_twice, 2, (str(ckpt), str(shm)), timeout=240)
    need = sum(results[0]["first"])
    for which in ("first", "second"):
        assert sum(r[which][0] for r in results) == need  # read once on the node
        assert sum(r[which][1] for r in results) == need  # and taken by the other rank
    assert all(r["same"] and r["left"] == [] for r in results)
