"""GPU check: experts loaded straight into CUDA memory over NCCL (world size 1).

    python benchmarks/gpu_check.py [--size 2e9] [--dir /tmp/lazysd-bench]

Needs one CUDA GPU. Generates a Step3p5 checkpoint of about ``--size`` bytes once, then:
1. ``load_state_dict(VirtualStateDict(path, mesh), assign=True)`` into a meta model with an
   NCCL ``ep`` mesh of one rank: expert parameters become CUDA DTensors, every tensor is
   staged through pinned host buffers and permuted on the device;
2. ``load_state_dict(VirtualStateDict(path))`` into a model already allocated on the GPU;
and checks both bitwise against a CPU load. Prints host-to-device throughput of each.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=2e9)
    parser.add_argument("--dir", default="/tmp/lazysd-bench")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine")

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lazysd import VirtualStateDict
    from lazysd.testing import Step3p5Model, Step3p5Spec, ensure_checkpoint

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("ep",))

    spec = Step3p5Spec.sized(int(args.size))
    path = ensure_checkpoint(Path(args.dir) / f"gpu-{args.size:.0e}", spec, verbose=True)
    with VirtualStateDict(path) as vsd:
        reference = {k: v.materialize() for k, v in vsd.items()}
    nbytes = sum(t.nbytes for t in reference.values())

    def timed(fn) -> float:  # noqa: ANN001
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    meta = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device="meta")
    vsd = VirtualStateDict(path, mesh, device=device)
    s1 = timed(lambda: meta.load_state_dict(vsd, assign=True))
    allocated = Step3p5Model(spec, layout="native", dtype=torch.bfloat16, device=device)
    s2 = timed(lambda: allocated.load_state_dict(VirtualStateDict(path)))

    for name, model in (("assign=True on an ep mesh", meta), ("copy into CUDA params", allocated)):
        for key, value in model.state_dict().items():
            local = value.full_tensor() if hasattr(value, "full_tensor") else value
            assert local.is_cuda and torch.equal(local.cpu(), reference[key]), (name, key)
    print(f"checkpoint {nbytes / 2**30:.2f} GiB on {torch.cuda.get_device_name(device)}")
    print("| method | seconds | host-to-device GiB/s |\n|---|---:|---:|")
    print(f"| assign=True, NCCL ep mesh (DTensor experts) | {s1:.2f} | {nbytes / s1 / 2**30:.2f} |")
    print(f"| load_state_dict into CUDA params | {s2:.2f} | {nbytes / s2 / 2**30:.2f} |")
    print("bitwise equal to the CPU load: yes")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
