"""Load a Step3p5 checkpoint with expert parallelism and run a forward pass.

    torchrun --nproc-per-node 4 examples/load_expert_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/load_expert_parallel.py --ckpt /ckpt/Step-3.5-Flash   # GPUs, NCCL

Each rank builds the native model on the meta device, then
``model.load_state_dict(VirtualStateDict(path, mesh), assign=True)`` gives it DTensor expert
parameters that hold only this rank's experts — read from disk by this rank alone, straight
into its device memory — and whole copies of everything else. Without ``--ckpt`` rank 0
generates a small synthetic checkpoint first; with it, the model is built from the
checkpoint's own config.json (its expert count must divide by the number of ranks).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lazysd import VirtualStateDict
from lazysd.testing import Step3p5Model, Step3p5Spec, make_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint directory (default: generate a synthetic one)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))

    if args.ckpt:
        # Sizes from the checkpoint itself (it decides, not this script).
        with VirtualStateDict(args.ckpt) as probe:
            path, config, family = probe.checkpoint.path, probe.checkpoint.config, probe.adapter.name
        if family != "step3p5":
            raise SystemExit(f"{path}: a {family} checkpoint; this example builds the Step3p5 reference model only")
        spec = Step3p5Spec.from_config(config, where=str(path / "config.json"))
        if spec.moe_num_experts % world:
            raise SystemExit(f"{path}: {spec.moe_num_experts} experts do not split over {world} ranks; use a world size that divides it")
    else:
        spec = Step3p5Spec.tiny(moe_num_experts=4 * world, hidden_size=128, moe_intermediate_size=64)
        path = Path(tempfile.gettempdir()) / f"lazysd-example-ep{world}"
        if rank == 0 and not (path / "config.json").exists():
            make_checkpoint(path, spec, layout="split")
    dist.barrier()

    with VirtualStateDict(path, mesh, device=device) as vsd:
        model = Step3p5Model(spec, layout="native", device="meta")
        result = model.load_state_dict(vsd, assign=True)
        experts = model.state_dict()[f"model.layers.{spec.moe_layers[0]}.moe.experts.gate_and_up_projs"]
        tokens = torch.arange(12, device=device).remainder(spec.vocab_size)[None]
        with torch.no_grad():
            logits = model(tokens)
        line = (
            f"rank {rank}/{world}: {result}; experts {tuple(experts.to_local().shape)} of {tuple(experts.shape)} "
            f"({experts.placements}); read {vsd.bytes_read:,} bytes (plan: {sum(n for _, _, n in vsd.planned_ranges()):,}); "
            f"next token {int(logits[0, -1].argmax())}\n"
        )
        sys.stdout.write(line)  # one write per line, so ranks sharing a terminal do not interleave
        sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
