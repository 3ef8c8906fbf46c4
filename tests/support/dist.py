"""Run a function on several real gloo ranks (CPU processes) and collect what each returns.

Example:
    >>> run_ranks(my_check, world_size=4, args=(str(path),))   # doctest: +SKIP
    [result_of_rank0, result_of_rank1, ...]

``fn(rank, world_size, *args)`` runs in a process forked from a fork server that has
imported torch and lazysd once (spawning would re-import torch in every rank, ~10 s each on a
busy 2-core machine; forking the caller is unsafe once it has used OpenMP threads) with the default process
group already initialized (gloo, file rendezvous); it must be importable at module level.
An exception on any rank fails the call with that rank's traceback; a hang is cut off after
``timeout`` seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, rdzv: str, out_dir: str, args: tuple[Any, ...]) -> None:
    import torch
    import torch.distributed as dist

    # As torchrun does: ranks sharing a machine split its cores (oversubscribed intra-op
    # threads spin against each other and can slow a load down tenfold).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    result: tuple[str, Any]
    try:
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size)
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        result = ("error", traceback.format_exc())
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


multiprocessing.set_forkserver_preload(["torch", "torch.distributed.tensor", "lazysd", "lazysd.testing"])


def run_ranks(
    fn: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (), *, timeout: float = 120.0
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each rank its own process."""
    with tempfile.TemporaryDirectory(prefix="lazysd-ranks-") as tmp:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, str(Path(tmp) / "rdzv"), tmp, args),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        import time

        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")
        results = []
        for rank in range(world_size):
            status, value = pickle.loads(Path(tmp, f"rank{rank}.pkl").read_bytes())
            if status == "error":
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            results.append(value)
        return results


def shard_parameters(model: Any, mesh: Any, plan: Callable[[str, Any], Any]) -> None:
    """Turn ``model``'s parameters into DTensors (local shards filled with -1) with the
    placements ``plan(key, param)`` returns; None leaves a parameter as it is."""
    import torch
    from torch.distributed.tensor import DTensor

    from lazysd.distributed import Target, contiguous_stride, local_box_of

    for key, param in list(model.named_parameters()):
        placements = plan(key, param)
        if placements is None:
            continue
        box = local_box_of(tuple(param.shape), Target(mesh, tuple(placements)))
        local = torch.full([hi - lo for lo, hi in box], -1.0, dtype=param.dtype)
        dt = DTensor.from_local(
            local, mesh, placements, run_check=False, shape=param.shape, stride=contiguous_stride(tuple(param.shape))
        )
        module_name, _, name = key.rpartition(".")
        setattr(model.get_submodule(module_name), name, torch.nn.Parameter(dt, requires_grad=param.requires_grad))


def torchrun(script: Path, *args: str, env: dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under ``torch.distributed.run`` on ``nproc`` CPU ranks; its output.

    torch 2.13's gloo teardown aborts now and then after the work is done ("terminate called
    without an active exception", about 1 run in 15; a six-line gloo script without lazysd
    does the same): such a run is made once more, and a second failure is reported.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(script), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    if out.returncode != 0 and "terminate called without an active exception" in out.stderr:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    return out
