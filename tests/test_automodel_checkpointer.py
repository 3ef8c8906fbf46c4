"""lazysd.automodel inside NeMo Automodel's own Checkpointer (skipped where Automodel is not installed).

NeMo Automodel is not a CI dependency; these tests run where it is installed
(``pip install nemo-automodel``). Each loads a tiny Step3p5 checkpoint with
``Checkpointer.load_base_model`` into Automodel's real ``Step3p5ForCausalLM`` — with its own
adapter, with lazysd's (the import swap), and with lazysd's plus ``use_lazysd_reader`` — in one
process (Automodel's single-process route) and on 2 gloo ranks with experts sharded by
Automodel's ``ExpertParallel`` (its DCP route), and checks every parameter bitwise against
lazysd's ``VirtualStateDict``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("nemo_automodel", reason="NeMo Automodel is not installed (optional, not a CI dependency)")
pytest.importorskip("transformers", reason="NeMo Automodel's Step3p5 model needs transformers")

from lazysd.testing import Step3p5Spec, make_checkpoint
from tests.support.automodel import automodel_step3p5
from tests.support.dist import run_ranks


def _model(path: str, method: str, mesh):
    # Parameters start at 7, so anything the load leaves out shows.
    return automodel_step3p5(path, mesh, swap=method in ("swap", "reader"), fill=7)


def _load(rank: int, world: int, path: str, method: str) -> dict:
    import torch.distributed as dist
    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer
    from nemo_automodel.components.checkpoint.config import CheckpointingConfig
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lazysd import VirtualStateDict
    from lazysd.automodel import use_lazysd_reader
    from lazysd.dcp import HFReader

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)) if world > 1 else None
    model = _model(path, method, mesh)
    config = CheckpointingConfig(
        enabled=True, checkpoint_dir=f"{path}-unused", model_save_format="safetensors", save_consolidated=False
    )
    checkpointer = Checkpointer(config, dp_rank=rank, tp_rank=0, pp_rank=0, moe_mesh=mesh)
    readers: list = []
    if method in ("reader", "own+reader"):
        assert use_lazysd_reader(checkpointer) is checkpointer
        assert use_lazysd_reader(checkpointer) is checkpointer  # a second call changes nothing
        make = checkpointer._get_storage_reader
        checkpointer._get_storage_reader = lambda *a, **k: readers.append(make(*a, **k)) or readers[-1]
    locals_before = {
        k: (v.to_local() if isinstance(v, DTensor) else v).data_ptr() for k, v in model.state_dict().items()
    }
    checkpointer.load_base_model(model, torch.device("cpu"), "/nonexistent", path)
    with VirtualStateDict(path, mesh) as vsd:
        ideal = sum(n for _, _, n in vsd.planned_ranges())
        for key, value in model.state_dict().items():
            got = value.to_local() if isinstance(value, DTensor) else value
            want = vsd[key].to_local() if isinstance(vsd[key], DTensor) else vsd[key]
            assert torch.equal(got, want.materialize().to(got.dtype)), key
    view_loaded = (
        getattr(model.state_dict_adapter, "view_loaded_native_keys", set()) if method in ("swap", "reader") else set()
    )
    out = {"view_loaded": len(view_loaded), "params": len(locals_before)}
    if method == "own+reader":
        # Automodel's own adapter keeps its HF keys: the drop-in reader on its DCP route; its
        # single-process route maps the files itself and asks for no reader.
        if world > 1:
            assert len(readers) == 1 and isinstance(readers[0], HFReader) and not readers[0].native
            assert readers[0].bytes_read == ideal
        else:
            assert readers == []
    if method == "reader":
        # The native route: one HFReader over native keys, every parameter filled in place,
        # this rank's bytes exactly.
        assert len(readers) == 1 and isinstance(readers[0], HFReader) and readers[0].native
        assert readers[0].bytes_read == ideal
        after = {k: (v.to_local() if isinstance(v, DTensor) else v).data_ptr() for k, v in model.state_dict().items()}
        assert after == locals_before
        assert model.state_dict_adapter.native_checkpoint_load is False  # only during the load
    if world > 1:
        dist.barrier()
    return out


# Registration with Automodel's StateDictAdapter (use_lazysd_reader) lasts for the process:
# "swap" runs before it, as it would in a process that never calls use_lazysd_reader.
METHODS = ("own", "swap", "own+reader", "reader")


def _load_all(rank: int, world: int, path: str) -> dict:
    return {m: _load(rank, world, path, m) for m in METHODS}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_checkpoint(tmp_path_factory.mktemp("am") / "ckpt", Step3p5Spec.tiny(), layout="sharded"))


@pytest.mark.parametrize("world", [1, 2])
def test_checkpointer_loads_bitwise_on_both_routes(ckpt: str, world: int) -> None:
    """world 1: Automodel's single-process route; world 2: its DCP route, experts on 2 EP ranks."""
    for out in run_ranks(_load_all, world, (ckpt,), timeout=600):
        # Nothing left for Automodel to copy: every native key was loaded in place (the swap on
        # the DCP route writes through its views; the reader's native route everywhere).
        assert out["reader"]["view_loaded"] == out["reader"]["params"]
        if world > 1:
            assert out["swap"]["view_loaded"] == out["swap"]["params"]


def test_a_path_without_safetensors_keeps_automodels_reader(ckpt: str, tmp_path: Path) -> None:
    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer
    from nemo_automodel.components.checkpoint.config import CheckpointingConfig

    from lazysd.automodel import use_lazysd_reader
    from lazysd.dcp import HFReader

    checkpointer = Checkpointer(
        CheckpointingConfig(enabled=True, checkpoint_dir=str(tmp_path)), dp_rank=0, tp_rank=0, pp_rank=0
    )
    use_lazysd_reader(checkpointer)
    # Outside a load_model call, or with a key_mapping, Automodel's own reader is used.
    assert not isinstance(checkpointer._get_storage_reader(ckpt, None, is_init_step=True), HFReader)
    assert not isinstance(checkpointer._get_storage_reader(str(tmp_path), None, is_init_step=True), HFReader)
