"""NeMo Automodel's own Checkpointer loading Step3p5 through lazysd: the swap plus one line.

    pip install nemo-automodel
    torchrun --nproc-per-node 2 examples/automodel_checkpointer.py                    # CPU, gloo
    torchrun --nproc-per-node 8 examples/automodel_checkpointer.py --ckpt /ckpt/Step-3.5-Flash

Each rank builds Automodel's ``Step3p5ForCausalLM`` on the meta device, shards its experts over
an ``ep`` mesh with Automodel's ``ExpertParallel`` (several ranks), allocates it, swaps in
``lazysd.automodel.Step3p5StateDictAdapter`` and calls ``use_lazysd_reader(checkpointer)``;
``Checkpointer.load_base_model`` then reads each rank's shards straight into its parameters
(exact byte ranges, no HF-shaped temporaries). Without ``--ckpt`` rank 0 generates a small
synthetic checkpoint first. Rank 0 prints the bytes it read and the model's first loss.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from nemo_automodel.components.checkpoint.checkpointing import Checkpointer
from nemo_automodel.components.checkpoint.config import CheckpointingConfig
from nemo_automodel.components.models.common import BackendConfig
from nemo_automodel.components.models.step3p5.model import Step3p5ForCausalLM
from nemo_automodel.components.moe.parallelizer import ExpertParallel
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module
from transformers import PretrainedConfig

from lazysd.automodel import Step3p5StateDictAdapter, use_lazysd_reader
from lazysd.testing import Step3p5Spec, make_checkpoint


def step3p5_config(path: str) -> PretrainedConfig:
    """The checkpoint's config.json as Automodel's model reads it."""
    d = json.loads(Path(path, "config.json").read_text())
    d["layer_types"] = d["layer_types"][: d["num_hidden_layers"]]  # the MTP layers' entries are not decoder layers
    d.setdefault("rope_parameters", {"rope_theta": d["rope_theta"], "rope_type": "default"})
    return PretrainedConfig(**d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="Step3p5 checkpoint directory (default: a synthetic one)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = args.ckpt
    if path is None:
        tmp = [tempfile.mkdtemp(prefix="lazysd-automodel-") if rank == 0 else None]
        if rank == 0:
            make_checkpoint(Path(tmp[0]) / "ckpt", Step3p5Spec.tiny())
        dist.broadcast_object_list(tmp, src=0)
        path = os.path.join(tmp[0], "ckpt")
    ep = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)) if world > 1 else None

    backend = BackendConfig(attn="sdpa", linear="torch", rms_norm="torch", experts="torch", dispatcher="torch")
    with torch.device("meta"):
        model = Step3p5ForCausalLM(step3p5_config(path), backend=backend)
    if ep is not None:
        for layer in model.model.layers.values():
            if layer.moe is not None:
                parallelize_module(layer.moe.experts, ep, ExpertParallel())
    model = model.to_empty(device="cpu")

    # The swap: lazysd's adapter where the model holds Automodel's (same constructor).
    own = model.state_dict_adapter
    model.state_dict_adapter = Step3p5StateDictAdapter(own.config, own.moe_config, own.backend, dtype=own.dtype)

    config = CheckpointingConfig(enabled=True, checkpoint_dir=os.path.join(tempfile.gettempdir(), "lazysd-automodel-out"), save_consolidated=False)
    checkpointer = Checkpointer(config, dp_rank=rank, tp_rank=0, pp_rank=0, moe_mesh=ep)
    use_lazysd_reader(checkpointer)  # the one line
    checkpointer.load_base_model(model, torch.device("cpu"), root_dir=tempfile.gettempdir(), model_name=path)

    ids = torch.arange(8).reshape(1, 8) % model.config.vocab_size
    logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    if rank == 0:
        print(f"loaded {path} on {world} rank(s) through lazysd; first loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
