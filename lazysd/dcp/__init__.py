"""torch.distributed.checkpoint (DCP) storage over Hugging Face safetensors checkpoints.

:class:`HFReader` is a DCP ``StorageReader``: ``dcp.load(state_dict, storage_reader=HFReader(path))``
fills a state dict straight from an HF checkpoint. With ``native=True`` (the default) the
checkpoint is described to DCP under the model's native keys, shapes and dtypes (the plan
lazysd builds from the headers), so a native model's ``state_dict()`` — plain tensors or
DTensors with any mix of ``Shard(d)`` and ``Replicate`` — loads with DCP's own planners, no
``to_hf``/``from_hf`` round trip, each rank reading only the bytes of its shards. With
``native=False`` it is described under the HF keys unchanged: a drop-in for torch's
``HuggingFaceStorageReader`` that reads exact byte ranges instead of whole files.

:class:`HFWriter` is a DCP ``StorageWriter``: ``dcp.save(native_state_dict,
storage_writer=HFWriter(out, adapter="step3p5"))`` writes an HF checkpoint (shards, index,
config) byte-identical to :func:`lazysd.save_hf` of the same state, each rank writing only the
shards DCP's planner gives it.

How DCP drives a reader (every rank unless noted)::

    reset(checkpoint_id)          only when dcp.load is given checkpoint_id=
    read_metadata()               native (or HF) keys, shapes, dtypes: headers only
    set_up_storage_reader(...)    remembers the metadata
    prepare_local_plan(plan)      sorts this rank's read items into file order
    prepare_global_plan(plans)    coordinator only; plans unchanged
    read_data(plan, planner)      each ReadItem: the box storage_offsets + lengths of one
                                  tensor, read into planner.resolve_tensor(item)

Example:
    >>> import tempfile, torch
    >>> import torch.distributed.checkpoint as dcp
    >>> from lazysd.testing import Step3p5Model, Step3p5Spec, make_checkpoint
    >>> src = make_checkpoint(tempfile.mkdtemp(), Step3p5Spec.tiny())
    >>> model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
    >>> sd = model.state_dict()
    >>> dcp.load(sd, storage_reader=HFReader(src))      # single process: no_dist
    >>> model.load_state_dict(sd)
    <All keys matched successfully>

The reader lives in :mod:`lazysd.dcp.reader`, the writer in :mod:`lazysd.dcp.writer`.
"""

from __future__ import annotations

from .reader import HFReader
from .writer import HFWriter

__all__ = ["HFReader", "HFWriter"]
