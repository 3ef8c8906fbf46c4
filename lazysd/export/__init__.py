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

A storage writer for torch.distributed.checkpoint reuses the phases directly::

    layout = plan_files(entries, max_shard_size)      # every rank, same result
    with ExportLock(out_dir):                         # coordinator, around everything below
        stage = Stage(out_dir, layout, token)         # token agreed by all ranks
        stage.create()                                # coordinator, before any write
        stage.write(key, offset, block); stage.flush()  # every rank, its own blocks
        stage.commit(config=...)                      # coordinator; stage.abort() on failure

Example:
    >>> import tempfile, torch
    >>> from lazysd.testing import Step3p5Model, Step3p5Spec
    >>> model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
    >>> out = save_hf(model, tempfile.mkdtemp() + "/export", adapter="step3p5")
    >>> sorted(p.name for p in out.iterdir())
    ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
"""

from .layout import FileLayout, ShardFile, TensorSlot, parse_size, plan_files
from .save import save_hf, save_native
from .stage import ExportLock, Stage
from .view import NATIVE, HFEntry, HFView

__all__ = [
    "NATIVE",
    "ExportLock",
    "FileLayout",
    "HFEntry",
    "HFView",
    "ShardFile",
    "Stage",
    "TensorSlot",
    "parse_size",
    "plan_files",
    "save_hf",
    "save_native",
]
