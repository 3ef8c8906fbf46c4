"""Lazy tensor values: shape and dtype now, bytes only when torch really needs them.

``Module.load_state_dict`` first copies the mapping into an ``OrderedDict``, calling
``__getitem__`` for every key before copying anything. A :class:`LazyTensor` survives that
copy for free (it is a storage-less ``torch.Tensor`` wrapper subclass with the right shape,
dtype and device) and is read only at the moment torch uses it:

* ``param.copy_(lazy)`` (the default ``assign=False`` path) reads the bytes straight into
  ``param`` — through transposed views of its halves for concatenated experts — so the load
  costs the model's memory plus bounded staging, never a second copy of a tensor.
* ``assign=True`` wraps the value in ``nn.Parameter`` (which calls ``detach()`` — answered
  with another LazyTensor) and registers it on the module; lazysd's module
  parameter/buffer registration hooks then materialize it once, so the module ends with
  plain ``nn.Parameter``s and plain buffer tensors, never LazyTensors.
* ``torch.Tensor.module_load`` (``torch.__future__.set_swap_module_params_on_conversion``)
  is answered the same way.
* Anything else (``torch.equal``, ``.float()``, arithmetic, ``str(t + 0)``) materializes on
  demand and runs the op on a plain tensor. Basic indexing (``t[3]``, ``t[2:5]``) reads only
  the indexed rows. ``repr`` and ``print(t)`` show metadata only (printing a 10 GB expert
  tensor by accident must not read it); ``print(t.materialize())`` shows the values.
* In-place operations (``t.add_(1)``, ``t.zero_()``, ``t[0] = x``, ``t += 1``, ``out=t``)
  raise :class:`~lazysd.errors.ReadOnlyTensorError`: a value of a read-only Mapping has no
  memory of its own, so the op could only change a throw-away copy and ``t`` would silently
  stay as it was. ``t.materialize()`` (or ``t.clone()``) gives a tensor you can modify.
* Pickling (``torch.save``) stores a plain tensor with the values, which
  ``torch.load(weights_only=True)`` accepts; nothing of lazysd is needed to load it.
* Copying into a meta tensor (``load_state_dict`` into a meta model without ``assign=True``,
  a no-op in torch) reads nothing.

Example:
    >>> w = vsd["model.layers.3.moe.experts.down_projs"]      # doctest: +SKIP
    >>> w                                                       # no bytes read
    LazyTensor(shape=[288, 1280, 4096], dtype=torch.bfloat16, key='model.layers.3.moe.experts.down_projs')
    >>> w[0].float().norm()                                     # reads expert 0 only
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_map

from .errors import ReadOnlyTensorError
from .geometry import Box
from .plan import Entry

if TYPE_CHECKING:
    from .nodeshare import NodeShare
    from .reader import Reader

_METADATA_FUNCS = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.stride,
    torch.Tensor.element_size,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.nelement,
    torch.Tensor.ndimension,
    torch.Tensor.__len__,
    torch.Tensor.is_contiguous,
    torch.Tensor.get_device,
    torch.Tensor.untyped_storage,
    torch.Tensor.data_ptr,
}
# Properties whose answer is more tensor data, not metadata.
_DATA_PROPERTIES = {"data", "T", "mT", "H", "mH", "real", "imag"}


class LazyTensor(torch.Tensor):
    """A native tensor (or a box of one) not yet read from disk.

    Use :meth:`materialize` to get a plain tensor; :attr:`entry` says where it comes from.
    """

    entry: Entry
    box: Box
    _reader: Reader
    # Set by a VirtualStateDict sharing reads with the other ranks of its node
    # (lazysd.nodeshare): fills go through it; None reads straight from storage.
    _share: NodeShare | None = None

    @staticmethod
    def __new__(
        cls,
        entry: Entry,
        reader: Reader,
        box: Box,
        *,
        dtype: torch.dtype,
        device: torch.device,
        requires_grad: bool = False,
    ) -> LazyTensor:
        shape = tuple(hi - lo for lo, hi in box)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=requires_grad)
        # The shape as a tuple: .shape of a subclass goes through __torch_function__.
        self.entry, self.box, self._reader, self._size = entry, box, reader, shape
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    # ---- user API ------------------------------------------------------------------------
    def materialize(
        self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read this tensor into a new plain tensor (on its own device/dtype unless given).

        With ``VirtualStateDict(mmap=True)``, an unchanged CPU tensor is a copy-on-write view
        of the file mapping instead (see :meth:`lazysd.reader.Reader.mapped`), and a converted
        one keeps its sources' memory order (see :meth:`lazysd.reader.Reader.empty`).
        """
        if (
            (device is None or torch.device(device) == self.device)
            and (dtype is None or dtype == self.dtype)
            and self.device.type == "cpu"
        ):
            view = self._reader.mapped(self.entry, self.box, self.dtype)
            if view is not None:
                return view
        with torch._C.DisableTorchFunctionSubclass():
            out = self._reader.empty(self.entry, self.box, dtype or self.dtype, torch.device(device or self.device))
        return self._fill(out, fresh=True)

    def read_into(self, dest: torch.Tensor) -> torch.Tensor:
        """Read this tensor straight into ``dest`` (same shape), in place; a meta ``dest`` reads nothing."""
        if dest.device.type == "meta":
            return dest
        return self._fill(dest)

    def _fill(self, dest: torch.Tensor, *, fresh: bool = False) -> torch.Tensor:
        if self._share is not None:
            return self._share.fill(self.entry, self.box, dest, fresh=fresh)
        return self._reader.fill(self.entry, self.box, dest, fresh=fresh)

    def _alias(self, box: Box | None = None) -> LazyTensor:
        """Another LazyTensor of the same value (or of ``box`` of it), sharing the same way."""
        box = self.box if box is None else box
        alias = LazyTensor(self.entry, self._reader, box, dtype=self.dtype, device=self.device)
        alias._share = self._share
        return alias

    @property
    def key(self) -> str:
        return self.entry.key

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        whole = tuple(self.box) == tuple((0, s) for s in self.entry.shape)
        where = "" if whole else ", box=" + str([list(b) for b in self.box])
        return f"LazyTensor(shape={list(self.shape)}, dtype={self.dtype}, key={self.entry.key!r}{where})"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: int) -> Any:
        # Pickling (e.g. torch.save of a dict of these) stores a plain tensor: the data, not open
        # files, and nothing torch.load(weights_only=True) would refuse. An mmap view is
        # copied first, or its whole file mapping (the storage) would be saved with it.
        plain = self.materialize()
        if plain.untyped_storage().nbytes() != plain.numel() * plain.element_size() or not plain.is_contiguous():
            plain = plain.clone(memory_format=torch.contiguous_format)
        return plain.__reduce_ex__(protocol)

    # ---- narrowing -----------------------------------------------------------------------
    def _narrow(self, index: Any) -> LazyTensor | None:
        """A LazyTensor for ``self[index]`` when index is basic ints/slices on leading dims."""
        items = index if isinstance(index, tuple) else (index,)
        # bool is an int to Python but a mask to torch (t[True] adds a dim): not narrowed here.
        basic = all(
            (isinstance(i, int) and not isinstance(i, bool)) or (isinstance(i, slice) and i.step in (None, 1))
            for i in items
        )
        if len(items) > self.dim() or not basic:
            return None
        box = list(self.box)
        squeeze = []
        for d, item in enumerate(items):
            lo, hi = box[d]
            n = hi - lo
            if isinstance(item, int):
                i = item + n if item < 0 else item
                if not 0 <= i < n:
                    raise IndexError(f"index {item} is out of bounds for dimension {d} with size {n}")
                box[d] = (lo + i, lo + i + 1)
                squeeze.append(d)
            else:
                start, stop, _ = item.indices(n)
                box[d] = (lo + start, lo + max(start, stop))
        narrowed = self._alias(tuple(box))
        narrowed._squeeze = tuple(squeeze)  # type: ignore[attr-defined]
        return narrowed

    # ---- torch integration ---------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is _COPY and len(args) == 2 and isinstance(args[1], LazyTensor) and not isinstance(args[0], LazyTensor):
            # param.copy_(value), load_state_dict's call for every key: first, and without
            # another trip through here for the value's shape (a small tensor's read costs
            # little more than these checks).
            dest, src = args
            if dest.shape == src._size and not is_dtensor(dest):
                return src.read_into(dest)
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        _refuse_in_place(func, name, args, kwargs)
        # Aliases of a LazyTensor stay lazy (nn.Parameter calls detach(), DTensor.from_local view_as()).
        if func in (torch.Tensor.detach, torch.detach, torch.Tensor.view_as) and isinstance(args[0], LazyTensor):
            return args[0]._alias()
        if func is torch.Tensor.module_load and isinstance(args[1], LazyTensor):
            dest, src = args[0], args[1]
            assign = kwargs.get("assign", args[2] if len(args) > 2 else False)
            if assign:
                return src.materialize()
            src.read_into(dest)
            with torch._C.DisableTorchFunctionSubclass():
                return dest.detach()
        if func is torch.Tensor.__getitem__ and isinstance(args[0], LazyTensor):
            narrowed = args[0]._narrow(args[1])
            if narrowed is not None:
                out = narrowed.materialize()
                for d in reversed(narrowed._squeeze):  # type: ignore[attr-defined]
                    out = out.squeeze(d)
                return out
        if func in (torch.Tensor.__repr__, torch.Tensor.__format__):
            return args[0].__repr__()
        if (
            func in _METADATA_FUNCS
            or (name == "__get__" and _property_name(func) not in _DATA_PROPERTIES)
            or func is torch.Tensor.requires_grad_
        ):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.to and _to_meta(args, kwargs):
            args, kwargs = tree_map(lambda x: _stand_in(x, torch.device("meta")), (args, kwargs))
        elif func in _SHAPE_ONLY_FUNCS:
            # Only the shape, dtype and device are used: an uninitialized stand-in, nothing read.
            args, kwargs = tree_map(_stand_in, (args, kwargs))
        else:
            args, kwargs = tree_map(_materialized, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Reached below __torch_function__, e.g. from inside a DTensor op on local shards.
        kwargs = kwargs or {}
        if (
            func is torch.ops.aten.copy_.default
            and isinstance(args[1], LazyTensor)
            and not isinstance(args[0], LazyTensor)
        ):
            if tuple(args[0].shape) == tuple(args[1].shape):
                return args[1].read_into(args[0])
        _refuse_mutation(func, args, kwargs)
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.view_as.default) or (
            func is torch.ops.aten.view.default and list(args[1]) == list(args[0].shape)
        ):
            return args[0]._alias()
        args, kwargs = tree_map(_materialized, (args, kwargs))
        return func(*args, **kwargs)


# In-place methods that change only metadata lazysd keeps (or nothing at all).
_IN_PLACE_ALLOWED = {"requires_grad_", "retain_grad", "share_memory_"}
_IN_PLACE_DUNDERS = {
    f"__{op}__"
    for op in (
        "setitem",
        "iadd",
        "isub",
        "imul",
        "imatmul",
        "itruediv",
        "ifloordiv",
        "imod",
        "ipow",
        "ilshift",
        "irshift",
        "iand",
        "ixor",
        "ior",
    )
}


def _refuse_in_place(func: Any, name: str, args: tuple, kwargs: dict) -> None:
    """Raise if ``func`` would write into a LazyTensor (its self, ``t[i] = x``, ``t += 1``, ``out=``)."""
    target = None
    # The tensor an in-place function writes: its first argument, positional or by name
    # (torch.nn.init.normal_(tensor=t) arrives with keywords only).
    first = args[0] if args else next((kwargs[k] for k in ("tensor", "input", "self") if k in kwargs), None)
    if isinstance(first, LazyTensor):
        dunder = name.startswith("__") and name.endswith("__")
        if name in _IN_PLACE_DUNDERS or (not dunder and name.endswith("_") and name not in _IN_PLACE_ALLOWED):
            target = first
    out = kwargs.get("out")
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, LazyTensor):
            target = t
    if target is not None:
        raise _read_only(target, name)


def _refuse_mutation(func: Any, args: tuple, kwargs: dict) -> None:
    """The dispatch-level twin of :func:`_refuse_in_place`: any aten op whose schema writes into a LazyTensor."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, LazyTensor) and arg.alias_info is not None and arg.alias_info.is_write:
            raise _read_only(value, str(func.__name__ if hasattr(func, "__name__") else func))


def _read_only(t: LazyTensor, op: str) -> ReadOnlyTensorError:
    return ReadOnlyTensorError(
        f"{t.entry.key!r}: {op} would modify a lazy value of a read-only mapping (LazyTensor), which has no memory of "
        "its own: the change would be lost. Call .materialize() (or .clone()) first and modify that tensor"
    )


def _property_name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", "")


_COPY = torch.Tensor.copy_


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (by type name: no torch.distributed import needed)."""
    return type(t).__name__ == "DTensor"


# Functions that use only a tensor's shape, dtype and device, never its values.
_SHAPE_ONLY_FUNCS = {
    torch.empty_like,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.Tensor.new_empty,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_full,
}


def _to_meta(args: tuple, kwargs: dict) -> bool:
    """``t.to("meta")`` (or ``device="meta"``): the result holds no data, so none is read."""
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(device, torch.Tensor):
        device = device.device
    try:
        return device is not None and not isinstance(device, torch.dtype) and torch.device(device).type == "meta"
    except (RuntimeError, TypeError):
        return False


def _stand_in(x: Any, device: torch.device | None = None) -> Any:
    """An uninitialized plain tensor in place of a LazyTensor (shape and dtype kept; its device unless given)."""
    if not isinstance(x, LazyTensor):
        return x
    with torch._C.DisableTorchFunctionSubclass():
        return torch.empty(x.shape, dtype=x.dtype, device=device or x.device)


def _materialized(x: Any) -> Any:
    return x.materialize() if isinstance(x, LazyTensor) else x


def _materialized_value(value: Any) -> torch.Tensor | None:
    """A LazyTensor, or a DTensor whose local shard is one, read into plain memory."""
    if isinstance(value, LazyTensor):
        return value.materialize()
    local = getattr(value, "_local_tensor", None)
    if isinstance(local, LazyTensor):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local.materialize(),
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    return None


def _register_parameter_hook(module: torch.nn.Module, name: str, param: Any) -> Any:
    real = _materialized_value(param)
    return None if real is None else torch.nn.Parameter(real, requires_grad=param.requires_grad)


def _register_buffer_hook(module: torch.nn.Module, name: str, tensor: Any) -> Any:
    return _materialized_value(tensor)


# Installed once, process-wide, on import: they act only on LazyTensors, which exist only
# through lazysd, and make `load_state_dict(..., assign=True)` leave plain tensors behind.
torch.nn.modules.module.register_module_parameter_registration_hook(_register_parameter_hook)
torch.nn.modules.module.register_module_buffer_registration_hook(_register_buffer_hook)
