"""A drop-in ``Step3p5StateDictAdapter`` for NeMo Automodel users, run by lazysd's engine.

Change one import and keep the training code::

    # from nemo_automodel.components.models.step3p5.state_dict_adapter import Step3p5StateDictAdapter
    from lazysd.automodel import Step3p5StateDictAdapter

The class and the two module functions keep the public signatures of NeMo Automodel's Step3p5
state-dict adapter. Conversions are not hand-written loops: the Step3p5 rules of
:mod:`lazysd.adapters` say which HF tensors make which native tensor, :func:`lazysd.plan.resolve`
turns them into plan entries, and :mod:`lazysd.reverse` runs them backwards for ``to_hf``.

Layouts (E experts, D hidden, I expert intermediate)::

    HF                                         native
    model.layers.L.moe.gate_proj.weight [E,I,D] \\
    model.layers.L.moe.up_proj.weight   [E,I,D]  > model.layers.L.moe.experts.gate_and_up_projs [E,D,2I]
    model.layers.L.moe.down_proj.weight [E,D,I]  -> model.layers.L.moe.experts.down_projs       [E,I,D]
    model.layers.L.moe.router_bias      [E]      -> model.layers.L.moe.gate.e_score_correction_bias
    anything else                                -> same key, same tensor (MTP layers included)

Inside NeMo Automodel's own ``Checkpointer`` the swap pays off on both of its routes:

* its DCP route (several ranks): ``to_hf(..., for_checkpoint_load=True)`` returns HF-shaped
  views of the model's parameters (of DTensor local shards too), so DCP writes checkpoint bytes
  straight into the model, and ``from_hf`` recognises them and rebuilds nothing
  (``supports_write_through_checkpoint_load``);
* its single-process route: ``from_hf`` of the mapped checkpoint keeps ``down_projs`` a view,
  as Automodel's adapter does, and never allocates more than it.

:func:`use_lazysd_reader` adds the reader: one line makes the Checkpointer read through
:class:`lazysd.dcp.HFReader`, exact byte ranges, each rank only its shards, with no memory
beyond the model::

    use_lazysd_reader(checkpointer)
    checkpointer.load_base_model(model, device, root_dir, "/ckpt/Step-3.5-Flash")

Lazy by construction: when ``from_hf`` is given lazy values (:class:`HFCheckpointView`, or any
:class:`~lazysd.lazy.LazyTensor` of one whole stored tensor), expert tensors come back as
LazyTensors planned over the same files, so a loader that copies them into parameters reads
each byte once, straight into the parameter, and with a mesh only this rank's experts. Eager
dicts give plain tensors, converted by torch ops that the same plan entries drive.

Duck-typed arguments — the only attributes read:

* ``moe_config.n_routed_experts`` (optional): checked against dim 0 of every expert tensor,
  and the global expert count of EP-sharded outputs.
* ``moe_config.moe_inter_dim`` (optional): checked against the half-width of
  ``gate_and_up_projs`` in ``to_hf``.
* ``config`` and ``backend`` are stored (as ``self.config``/``self.backend``) and not read.

``quantization`` in ``to_hf``: accepted and ignored, as in the public adapter, which forwards
it and never reads it for Step3p5 (the release is bf16 with no scale tensors to emit).

Where this adapter knowingly differs from the public one, and why:

1. DTensors are built with an explicit global shape and stride (``DTensor.from_local(...,
   shape=, stride=)``), taken from the reference DTensor's sharded dims or from the plan.
   Inferring the global shape from the local shard (the public fallback) multiplies the local
   size by the mesh size, which is wrong for uneven splits (e.g. 10 experts over 4 ranks).
2. EP ranges follow DTensor's own ``Shard(0)`` split (``torch.chunk`` sizes, e.g. 10 experts
   over 4 ranks: 3,3,3,1), not the public "first ``E % n`` ranks take one more" rule (3,3,2,2).
   Both agree whenever ``E`` divides evenly; when they do not, only DTensor's split gives a
   DTensor whose ``full_tensor()`` and redistributions are correct and that matches
   parameters sharded by ``distribute_tensor`` (a trailing rank may then hold no experts,
   e.g. 5 over 4: 2,2,1,0).
3. On plain tensors with an ``ep_shard`` mesh dim of size > 1, the native dim 1 is sliced to
   this rank's ``Shard(1)`` piece too (older public versions slice only experts while still
   declaring ``Shard(1)``, doubling dim 1 of the global shape). Uneven ``ep_shard`` splits are
   allowed (the public code raises), since global shapes are explicit.
4. A gate without its up (or the reverse) raises :class:`~lazysd.errors.MissingSourceError`
   naming the key; the public adapter drops it silently.
5. A DTensor ``gate_and_up_projs`` sharded on its last (gate|up) dim, or gate/up DTensors whose
   meshes or placements differ, raise :class:`~lazysd.errors.PlacementError`: splitting or
   concatenating local shards there would mix gate and up rows.
6. ``to_hf`` keeps each key's own prefix (``model.``, ``model.language_model.`` or none); the
   public adapter writes the prefix remembered from the last ``from_hf`` call that saw expert
   keys, so its ``to_hf`` depends on call history. ``from_hf`` never changes adapter state.
7. Keys must match fully (``model.layers.3.moe.gate_proj.weight_scale`` is passed through, not
   taken for an expert weight as the public prefix-only ``re.match`` would).
8. Expert dim 0 is checked against ``moe_config.n_routed_experts`` and gate/up shapes and
   dtypes against each other (:class:`~lazysd.errors.ShapeMismatchError`, naming the keys).
9. The local-shard shape handed to :func:`_create_dtensor_from_local_or_reference` is checked
   against the shard the placements give this rank (:class:`~lazysd.errors.PlacementError`).
"""

from .adapter import Step3p5StateDictAdapter
from .checkpointer import use_lazysd_reader
from .dtensors import create_dtensor_from_local_or_reference as _create_dtensor_from_local_or_reference
from .dtensors import swap_shard_placements_1_2 as _swap_shard_placements_1_2
from .view import HFCheckpointView

__all__ = ["HFCheckpointView", "Step3p5StateDictAdapter", "use_lazysd_reader"]
# NeMo Automodel's helper names, kept for code that imports them from its adapter module.
_COMPAT = (_create_dtensor_from_local_or_reference, _swap_shard_placements_1_2)
