"""Model families lazysd knows, one small data file each, and detection from config.json.

Registered families: ``step3p5``, ``step3p7``, ``deepseek_v3``, ``qwen3_moe``, ``glm4_moe``,
``mixtral``, ``gpt_oss``.

Detection (:func:`detect`): config.json's ``model_type`` picks the family; when it names no
registered family, a nested ``text_config.model_type`` is tried. A config with no
``model_type`` at all is matched by its keys: the one family whose rules claim every
checkpoint key wins. An unknown ``model_type``, or keys that fit no family or several, is an
:class:`~lazysd.errors.UnknownModelError` that lists the supported families and the keys no
family claims (or the families that fit). ``VirtualStateDict(path, adapter=...)`` skips detection.

Declaring your own family takes a few lines: name the native keys and the HF tensors they are
built from, pass the adapter as ``adapter=``, or :func:`register` it so that its
``model_type`` is detected::

    from lazysd.rules import Adapter, Part, Rule
    L = "model.layers.{layer}"
    MY = Adapter("mymoe", ("mymoe",), rules=(
        Rule(L + ".moe.experts.gate_and_up_projs", cat_dim=2, kind="experts", parts=(
            Part(L + ".moe.experts.{expert}.w_gate.weight", dims=(None, 1, 0)),  # [I, D] -> [1, D, I]
            Part(L + ".moe.experts.{expert}.w_up.weight", dims=(None, 1, 0)))),
        Rule(L + ".moe.experts.down_projs", kind="experts",
             parts=(Part(L + ".moe.experts.{expert}.w_down.weight", dims=(None, 1, 0)),)),
        Rule("{name:**}"),                  # every other key: unchanged
    ))
    vsd = VirtualStateDict(path, adapter=MY)

Rules are tried in order and the first whose part matches a key claims it, so specific rules
come before catch-alls like ``{name:**}``. ``tests/test_families.py`` runs this recipe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import UnknownModelError
from ..rules import Adapter
from .deepseek_v3 import ADAPTER as DEEPSEEK_V3
from .glm4_moe import ADAPTER as GLM4_MOE
from .gpt_oss import ADAPTER as GPT_OSS
from .mixtral import ADAPTER as MIXTRAL
from .qwen3_moe import ADAPTER as QWEN3_MOE
from .step3p5 import ADAPTER as STEP3P5
from .step3p7 import ADAPTER as STEP3P7

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Make ``adapter`` available to detection and to ``adapter="name"``."""
    _REGISTRY[adapter.name] = adapter
    return adapter


def known() -> dict[str, Adapter]:
    """Registered adapters by name."""
    return dict(_REGISTRY)


def detect(config: Mapping[str, Any], keys: Iterable[str] = (), *, where: str = "config.json") -> Adapter:
    """The adapter for a checkpoint's config.json (and, failing that, its tensor keys).

    Args:
        config: the parsed config.json.
        keys: the checkpoint's HF keys; they decide only when config.json has no
            ``model_type`` (or several families share it), and explain a failure.

    Raises:
        UnknownModelError: no registered family fits, or several do; the message lists the
            supported families and up to 10 keys that no family claims.

    Example:
        >>> detect({"model_type": "qwen3_moe"}).name
        'qwen3_moe'
        >>> detect({"model_type": "llava", "text_config": {"model_type": "mixtral"}}).name
        'mixtral'
    """
    types = [config.get("model_type"), (config.get("text_config") or {}).get("model_type") if isinstance(config.get("text_config"), Mapping) else None]
    keys = list(keys)
    left: dict[str, list[str]] = {}  # adapter name -> its unclaimed keys, computed once

    def unclaimed(a: Adapter) -> list[str]:
        if a.name not in left:
            left[a.name] = a.unclaimed(keys)
        return left[a.name]

    for model_type in types:
        found = [a for a in _REGISTRY.values() if isinstance(model_type, str) and model_type in a.model_types]
        if len(found) > 1 and keys:
            found = [a for a in found if not unclaimed(a)] or found
        if len(found) == 1:
            return found[0]
        if found:
            break
    supported = ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in _REGISTRY.values())
    named = [t for t in types if t is not None]
    shown = " / ".join(repr(t) for t in named)
    leftover = {a.name: unclaimed(a) for a in _REGISTRY.values()} if keys else {}
    fits = [name for name, left in leftover.items() if not left]
    if not named and len(fits) == 1:
        return _REGISTRY[fits[0]]  # no model_type at all: the keys decide
    head = f"model_type {shown} is not supported" if named else "no model_type"
    message = f"{where}: {head} (supported: {supported})"
    if len(fits) > 1:
        message += f"; ambiguous: the keys fit several families ({', '.join(fits)})"
    elif fits:
        message += f"; the keys fit {fits[0]} (pass adapter={fits[0]!r} if that is what this is)"
    elif keys:
        nobody = [k for k in keys if all(k in left for left in leftover.values())]
        listed = "".join(f"\n  {k}" for k in nobody[:10]) + (f"\n  ... {len(nobody) - 10} more" if len(nobody) > 10 else "")
        message += "; keys no family claims:" + (listed or " none (each family misses different keys)")
    raise UnknownModelError(message + "\npass adapter= to choose or declare one")


def resolve_adapter(
    adapter: Adapter | str | None, config: Mapping[str, Any], *, keys: Iterable[str] = (), where: str = "config.json"
) -> Adapter:
    """``adapter`` as given, by registered name, or detected from ``config`` (and ``keys``)."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in _REGISTRY:
            raise UnknownModelError(f"adapter {adapter!r} is not registered (registered: {', '.join(sorted(_REGISTRY))})")
        return _REGISTRY[adapter]
    return detect(config, keys, where=where)


register(STEP3P5)
register(STEP3P7)
register(DEEPSEEK_V3)
register(QWEN3_MOE)
register(GLM4_MOE)
register(MIXTRAL)
register(GPT_OSS)
