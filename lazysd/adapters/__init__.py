"""Model families lazysd knows, one small data file each, and detection from config.json.

Declare your own family in a few lines and pass it as ``adapter=`` or :func:`register` it::

    from lazysd.rules import Adapter, Rule, Part
    MY = Adapter("mymoe", ("mymoe",), rules=(Rule("{name}.weight"), ...))
    vsd = VirtualStateDict(path, adapter=MY)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnknownModelError
from ..rules import Adapter
from .step3p5 import ADAPTER as STEP3P5

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Make ``adapter`` available to detection and to ``adapter="name"``."""
    _REGISTRY[adapter.name] = adapter
    return adapter


def known() -> dict[str, Adapter]:
    """Registered adapters by name."""
    return dict(_REGISTRY)


def model_type_of(config: Mapping[str, Any]) -> str | None:
    """The config's ``model_type``, falling back to a nested ``text_config``'s."""
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        return model_type
    text = config.get("text_config")
    if isinstance(text, Mapping) and isinstance(text.get("model_type"), str):
        return text["model_type"]
    return None


def detect(config: Mapping[str, Any], *, where: str = "config.json") -> Adapter:
    """The adapter for a checkpoint's config.json.

    Raises:
        UnknownModelError: no registered adapter handles the ``model_type``.
    """
    model_type = model_type_of(config)
    for adapter in _REGISTRY.values():
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(sorted(t for a in _REGISTRY.values() for t in a.model_types))
    raise UnknownModelError(
        f"{where}: model_type {model_type!r} is not supported (supported: {supported}); "
        "pass adapter= to choose or declare one"
    )


def resolve_adapter(adapter: Adapter | str | None, config: Mapping[str, Any], *, where: str = "config.json") -> Adapter:
    """``adapter`` as given, by registered name, or detected from ``config``."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in _REGISTRY:
            raise UnknownModelError(f"adapter {adapter!r} is not registered (registered: {', '.join(sorted(_REGISTRY))})")
        return _REGISTRY[adapter]
    return detect(config, where=where)


register(STEP3P5)
