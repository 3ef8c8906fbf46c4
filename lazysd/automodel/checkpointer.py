"""``use_lazysd_reader``: NeMo Automodel's own ``Checkpointer`` reading through :class:`lazysd.dcp.HFReader`."""

from __future__ import annotations

from typing import Any

from ..dcp import HFReader
from .adapter import Step3p5StateDictAdapter

__all__ = ["use_lazysd_reader"]


def use_lazysd_reader(checkpointer: Any, **options: Any) -> Any:
    """Make a NeMo Automodel ``Checkpointer`` read HF safetensors through :class:`lazysd.dcp.HFReader`.

    One line after building the Checkpointer; its loads (``load_base_model``, ``load_model``)
    then read exact byte ranges, each rank only the bytes of its own shards::

        checkpointer = Checkpointer(config, dp_rank, tp_rank, pp_rank, moe_mesh=moe_mesh)
        use_lazysd_reader(checkpointer)
        checkpointer.load_base_model(model, device, root_dir, "/ckpt/Step-3.5-Flash")

    The route is picked per load, from the model's ``state_dict_adapter``:

    * this module's :class:`Step3p5StateDictAdapter` (the one-import swap): the native route.
      Its ``to_hf(..., for_checkpoint_load=True)`` hands the model's state dict over unchanged,
      ``HFReader(path)`` describes the checkpoint under native keys, and DCP's planner reads
      every parameter's local shard straight into it, transposes fused into the reads;
      ``from_hf`` then finds every value loaded in place and returns nothing to copy. In a
      single process too: the adapter is registered as an Automodel ``StateDictAdapter`` whose
      DCP load needs no temporaries (``supports_low_memory_dcp_load``), so the Checkpointer
      takes its DCP route instead of mapping the whole checkpoint first.
    * any other adapter (Automodel's own) or none: ``HFReader(path, native=False)`` replaces
      Automodel's ``_HuggingFaceStorageReader``: the same HF keys, exact ranges instead of
      mmap readahead, validated headers. The adapter's conversions are unchanged.
    * a load with a ``key_mapping`` (checkpoint keys renamed on the fly), or of a directory
      without safetensors files: Automodel's own reader, unchanged.

    Args:
        checkpointer: a ``nemo_automodel.components.checkpoint.checkpointing.Checkpointer``.
        **options: passed to every :class:`~lazysd.dcp.HFReader` (``threads=``,
            ``max_inflight_bytes=``, ``chunk_bytes=``).

    Returns:
        ``checkpointer``, changed in place (calling this twice changes nothing more).
    """
    if getattr(checkpointer, "_lazysd_reader", None) is not None:
        return checkpointer
    from nemo_automodel.components.checkpoint.state_dict_adapter import (
        StateDictAdapter,  # the caller has Automodel
    )

    StateDictAdapter.register(Step3p5StateDictAdapter)
    route: dict[str, bool | None] = {"native": None}  # set for the duration of one load_model call
    load_model, get_reader = checkpointer.load_model, checkpointer._get_storage_reader

    def lazysd_load_model(model: Any, model_path: str, *args: Any, **kwargs: Any) -> Any:
        part = model[0] if isinstance(model, (list, tuple)) else model
        adapter = getattr(getattr(part, "module", part), "state_dict_adapter", None)  # DDP keeps the model in .module
        native = isinstance(adapter, Step3p5StateDictAdapter)
        route["native"] = native
        if native:
            adapter.native_checkpoint_load = True  # type: ignore[union-attr]
        try:
            return load_model(model, model_path, *args, **kwargs)
        finally:
            route["native"] = None
            if native:
                adapter.native_checkpoint_load = False  # type: ignore[union-attr]

    def lazysd_storage_reader(model_path: str, key_mapping: Any, *args: Any, **kwargs: Any) -> Any:
        native = route["native"]
        if native is None or key_mapping is not None or not HFReader.validate_checkpoint_id(model_path):
            return get_reader(model_path, key_mapping, *args, **kwargs)
        return HFReader(model_path, adapter="step3p5", **options) if native else HFReader(model_path, native=False, **options)

    checkpointer.load_model = lazysd_load_model
    checkpointer._get_storage_reader = lazysd_storage_reader
    checkpointer._lazysd_reader = options
    return checkpointer
