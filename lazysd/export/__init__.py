"""Export: native state dicts back to Hugging Face safetensors, lazily and rank by rank.

:class:`HFView` shows HF keys over a native state dict (plain tensors, lazysd's lazy values or
DTensors) by running the adapter's rules backwards; :func:`save_hf` streams such a view into
``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``, a bounded
slice of one tensor at a time, and :func:`save_native` does the same under native keys.

One concept per module, in the order an export runs (after torch.distributed.checkpoint's
``SavePlanner`` and ``HuggingFaceStorageWriter``: plan -> agree -> write -> finish):

* :mod:`~lazysd.export.view`    HFView: HF keys, shapes and values over native tensors.
* :mod:`~lazysd.export.layout`  phase *plan files*: ``(key, dtype, shape)`` -> FileLayout.
* :mod:`~lazysd.export.stage`   phases *create*, *write*, *commit*, *abort* on disk, and the
  ExportLock: a staged output switched in by one atomic rename.
* :mod:`~lazysd.export.config`  the config.json that describes exactly what was written.
* :mod:`~lazysd.export.save`    save_hf / save_native: the phases across ranks (*agree*).

A storage writer for torch.distributed.checkpoint reuses the phases directly, and so writes
the same bytes and commits as atomically as :func:`save_hf`::

    view = HFView(meta_tensors, adapter=...)            # every rank: HF entries from metadata
    layout = plan_files([(e.key, e.dtype, e.shape) for e in view.entries.values()], max_shard_size)
    lock = ExportLock(out_dir).__enter__()              # coordinator: held until commit or abort
    recover(out_dir)                                     # coordinator: undo killed exports' leftovers
    stage = Stage(out_dir, layout, token)                # every rank; token chosen by the coordinator
    stage.create()                                       # coordinator, before any write
    piece, hf_offset = clip(entry.piece, box)            # every rank, per local shard and entry ...
    for offset, block in piece_blocks(shard, entry, piece, hf_offset, origin):
        stage.write(entry.key, offset, block)            # ... bounded blocks, any device
    stage.flush()                                        # every rank: fsync
    stage.commit(config=fitted_config(...), overwrite=...)   # coordinator; stage.abort() on failure
    lock.__exit__(None, None, None)                      # coordinator, in every case

``out_dir`` there is the real directory (``os.path.realpath``), so the stage is its sibling on
the same filesystem; ``out_dir_problem`` gives save_hf's checks of the output directory.

Example:
    >>> import tempfile, torch
    >>> from lazysd.testing import Step3p5Model, Step3p5Spec
    >>> model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
    >>> out = save_hf(model, tempfile.mkdtemp() + "/export", adapter="step3p5")
    >>> sorted(p.name for p in out.iterdir())
    ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
"""

from .config import export_config, fitted_config
from .layout import FileLayout, ShardFile, TensorSlot, parse_size, plan_files
from .save import CHUNK_BYTES, out_dir_problem, piece_blocks, save_hf, save_native
from .stage import ExportLock, Stage, recover
from .view import NATIVE, HFEntry, HFView, clip, converted

__all__ = [
    "CHUNK_BYTES",
    "NATIVE",
    "ExportLock",
    "FileLayout",
    "HFEntry",
    "HFView",
    "ShardFile",
    "Stage",
    "TensorSlot",
    "clip",
    "converted",
    "export_config",
    "fitted_config",
    "out_dir_problem",
    "parse_size",
    "piece_blocks",
    "plan_files",
    "recover",
    "save_hf",
    "save_native",
]
