"""Each byte read from storage at most once per node: ranks share what they all need.

Under expert parallelism every rank of a node needs the same replicated tensors (embeddings,
attention, norms, shared experts), and, when EP is smaller than the node, the same experts
too. Reading them on every rank multiplies what the node pulls from storage (NFS, object
storage) by the number of ranks. :func:`share_node` instead:

1. gathers, once, which ``(key, box, dtype)`` each rank is about to load (plain metadata);
2. gives every box that several ranks of one node need to one of them (the one with the
   fewest bytes to read so far, so reading is balanced);
3. each rank reads the boxes it owns, straight into its own parameter, all ranks at once;
4. owners send those bytes to the other ranks of the node that need them (point-to-point on
   the default process group, straight into the receivers' parameters: no staging).

So the bytes a node reads are the union of its ranks' needs, not their sum. Ranks are on the
same node when their host names agree. :func:`lazysd.load` does this by default with a
process group (``VirtualStateDict(..., share=None)`` turns it off). It is collective: every
rank must call ``lazysd.load``. The plain Mapping (``model.load_state_dict(vsd)``, values
read one key at a time, in any order, on any subset of ranks) shares through
:mod:`lazysd.nodeshare` instead, which needs no collective; its ownership of boxes for
reading ahead is the same :func:`lazysd.nodeshare.owners`.

Example:
    >>> report = lazysd.load(model, "s3://bucket/ckpt/", storage_options=opts)   # doctest: +SKIP
    >>> report.bytes_read, report.bytes_received                                 # doctest: +SKIP
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .nodeshare import owners

if TYPE_CHECKING:
    from .virtual import VirtualStateDict


@dataclass(frozen=True)
class Shared:
    """What :func:`share_node` did on this rank."""

    filled: dict[str, torch.Tensor]  # key -> destination now holding its value
    bytes_read: int  # bytes of owned boxes read from storage
    bytes_received: int  # bytes received from other ranks of the node
    tensors_received: int  # boxes received rather than read
    node_ranks: tuple[int, ...]  # global ranks on this node


def destination_of(value: Any, assign: bool, param: torch.Tensor | None) -> torch.Tensor | None:
    """Where a key's bytes can land directly: the parameter itself (or its local shard)."""
    if assign or param is None:
        return None
    local = getattr(param, "_local_tensor", param)
    if type(local) is not torch.Tensor and not isinstance(local, torch.nn.Parameter):
        return None
    if local.device.type != "cpu" or not local.is_contiguous():
        return None
    lazy = getattr(value, "_local_tensor", value)
    return local.detach() if tuple(local.shape) == tuple(lazy.shape) else None


def lazy_destination(value: Any, assign: bool, param: torch.Tensor | None) -> tuple[Any, torch.Tensor] | None:
    """``(lazy value, where its bytes land)`` for a lazy value (or a DTensor of one), else None.

    The parameter itself where :func:`destination_of` allows it; with ``assign``, a fresh
    tensor laid out as the reader would allocate it.
    """
    lazy = getattr(value, "_local_tensor", value)
    if not hasattr(lazy, "entry"):
        return None
    dest = destination_of(value, assign, param)
    if dest is None and assign:
        with torch._C.DisableTorchFunctionSubclass():
            dest = lazy._reader.empty(lazy.entry, lazy.box, lazy.dtype, lazy.device)
    return None if dest is None else (lazy, dest)


def share_node(
    vsd: VirtualStateDict, values: dict[str, Any], params: dict[str, torch.Tensor], *, assign: bool
) -> Shared:
    """Load the boxes of ``values`` that several ranks of this node need, once per node.

    Args:
        vsd: the (distributed) VirtualStateDict the values come from.
        values: key -> value about to be loaded (LazyTensor or DTensor of one).
        params: key -> the model's parameter/buffer (destinations when ``assign=False``).
        assign: with True, fresh tensors are allocated (and returned) instead.

    Every rank of the process group must call this with its own values, in the same call
    (it runs one ``all_gather_object`` and point-to-point sends).
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    dests: dict[str, torch.Tensor] = {}
    needs: list[tuple[str, tuple[tuple[int, int], ...], str, int]] = []
    for key, value in values.items():
        found = lazy_destination(value, assign, params.get(key))
        if found is None:
            continue
        lazy, dest = found
        if dest.device.type != "cpu" or not dest.is_contiguous():
            continue  # shared by point-to-point sends into CPU memory only
        dests[key] = dest
        read = sum(n for _, _, n in vsd.reader.ranges(lazy.entry, lazy.box))
        needs.append((key, tuple(tuple(b) for b in lazy.box), str(dest.dtype), read))
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (socket.gethostname(), needs))
    host = everyone[rank][0]
    node = tuple(r for r in range(world) if everyone[r][0] == host)
    items, owner, cost = owners({r: everyone[r][1] for r in node})
    mine = {item[0]: item for item, ranks in items if rank in ranks}
    bytes_received = tensors_received = 0
    owned = [item for item, ranks in items if owner[item] == rank]
    bytes_read = sum(cost[item] for item in owned)

    def read(item: tuple[str, tuple[tuple[int, int], ...], str]) -> None:
        lazy = getattr(values[item[0]], "_local_tensor", values[item[0]])
        # Straight from storage: the owner sends the bytes itself, nothing goes through
        # the shared memory of lazysd.nodeshare.
        lazy._reader.fill(lazy.entry, lazy.box, dests[item[0]])

    # 3. read what this rank owns (several tensors at once from remote storage: each costs a
    # round trip; local reads are bounded by the disk, one tensor at a time is enough)
    if vsd.checkpoint.local:
        for item in owned:
            read(item)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8, thread_name_prefix="lazysd-share") as pool:
            list(pool.map(read, owned))
    works = []
    for i, (item, ranks) in enumerate(items):  # 4. send to / receive from the node's ranks
        if rank not in ranks:
            continue
        flat = dests[item[0]].view(-1).view(torch.uint8)  # bytes: any dtype, FP8 included
        if owner[item] == rank:
            works += [dist.isend(flat, dst=r, tag=i) for r in ranks if r != rank]
        else:
            works.append(dist.irecv(flat, src=owner[item], tag=i))
            bytes_received += flat.numel()
            tensors_received += 1
    for w in works:
        w.wait()
    return Shared({key: dests[key] for key in mine}, bytes_read, bytes_received, tensors_received, node)
