"""The config.json an export writes: the source's, made to describe exactly the tensors written.

A config is copied byte for byte unless it contradicts the export, and then rewritten with
only the contradicting fields changed:

* ``quantization_config`` goes when no FP8 tensor is written (a dequantized DeepSeek-V3
  export holds bf16 weights without scales; a loader trusting the old field would read them
  as FP8 blocks). With ``fp8="keep"`` the FP8 weights and scales are written and it stays.
* ``num_nextn_predict_layers`` becomes the number of MTP layers written (0 for a main-model
  only export), so inference engines do not look for MTP weights that are not there.
* ``torch_dtype`` (and ``dtype``) becomes the ``dtype=`` the export cast to.

Example:
    >>> import torch
    >>> cfg = {"num_hidden_layers": 2, "num_nextn_predict_layers": 1,
    ...        "quantization_config": {"quant_method": "fp8"}}
    >>> out = export_config(cfg, dtypes=[torch.bfloat16], layers=[0, 1], num_layers=2, text_config=None, dtype=None)
    >>> json.loads(out)
    {'num_hidden_layers': 2, 'num_nextn_predict_layers': 0}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import config_value
from ..errors import ExportError
from ..plan import MTP_LAYER_FIELDS
from ..rules import Adapter
from .view import NATIVE, HFEntry, is_fp8

__all__ = ["config_layers", "export_config", "fitted_config"]

_DTYPE_FIELDS = ("torch_dtype", "dtype")


def export_config(
    config: Mapping[str, Any] | str | os.PathLike[str],
    *,
    dtypes: Iterable[torch.dtype],
    layers: Iterable[int],
    num_layers: int | None,
    text_config: str | None,
    dtype: torch.dtype | None,
) -> bytes:
    """The bytes of config.json for an export.

    Args:
        config: the config as a dict, or the path of a config.json.
        dtypes: dtypes of the tensors written.
        layers: decoder layer indices of the HF keys written (MTP layers count from
            ``num_layers``).
        num_layers: main decoder layers (None: MTP fields are left alone).
        text_config: the field holding a nested text config (multimodal families), if any.
        dtype: the cast the export applied, if any.

    Raises:
        ExportError: a config path that cannot be read or is not a JSON object.
    """
    raw: bytes | None = None
    if isinstance(config, Mapping):
        data = json.loads(json.dumps(dict(config)))  # a deep copy, and proof that it is JSON
    else:
        path = Path(config)
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
        except OSError as e:
            raise ExportError(f"config {path}: cannot be read ({e.strerror or e}); pass a dict or the path of a config.json") from None
        except ValueError as e:
            raise ExportError(f"config {path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ExportError(f"config {path}: holds a {type(data).__name__}, not a JSON object")
    changed = _fit(data, set(dtypes), set(layers), num_layers, text_config, dtype)
    if raw is not None and not changed:
        return raw
    return (json.dumps(data, indent=2) + "\n").encode()


def _fit(data: dict[str, Any], dtypes: set[torch.dtype], layers: set[int], num_layers: int | None, text_config: str | None, dtype: torch.dtype | None) -> bool:
    """Change ``data`` in place to describe the export; whether anything changed."""
    text = data.get(text_config) if text_config else None
    nodes = [data] + ([text] if isinstance(text, dict) else [])
    changed = False
    if not any(is_fp8(d) for d in dtypes):
        for node in nodes:
            if "quantization_config" in node:
                del node["quantization_config"]
                changed = True
    if num_layers is not None:
        mtp = sum(1 for n in layers if n >= num_layers)
        for node in nodes:
            for field in MTP_LAYER_FIELDS:
                if field in node and node[field] != mtp:
                    node[field] = mtp
                    changed = True
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for node in nodes:
            for field in _DTYPE_FIELDS:
                if field in node and node[field] != name:
                    node[field] = name
                    changed = True
    return changed


def fitted_config(
    config: Mapping[str, Any] | str | os.PathLike[str], entries: Iterable[HFEntry], *, adapter: Adapter, num_layers: int | None, dtype: torch.dtype | None
) -> bytes:
    """:func:`export_config` for the HF entries of a view: their dtypes and layer indices.

    ``num_layers`` defaults to the config's own count of main layers (the adapter's field).
    """
    entries = list(entries)
    if num_layers is None and adapter is not NATIVE:
        num_layers = config_layers(config, adapter)
    layer_re = adapter.layer_pattern.regex
    layers = {int(m.group("layer")) for e in entries if (m := layer_re.match(e.key)) is not None}
    return export_config(config, dtypes={e.dtype for e in entries}, layers=layers, num_layers=num_layers, text_config=adapter.text_config, dtype=dtype)


def config_layers(config: Mapping[str, Any] | str | os.PathLike[str], adapter: Adapter) -> int | None:
    """Main decoder layers according to the config, if it says (unreadable configs: None here,
    reported by :func:`export_config`)."""
    try:
        data = dict(config) if isinstance(config, Mapping) else json.loads(Path(config).read_bytes())
    except (OSError, ValueError):
        return None
    text = data.get(adapter.text_config, data) if adapter.text_config else data
    value = config_value(text, *adapter.num_layers) if isinstance(text, Mapping) else None
    return value if type(value) is int else None
