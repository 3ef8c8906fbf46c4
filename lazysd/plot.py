"""Plots of checkpoint metadata: bytes per layer by module kind, bytes per rank of a plan.

matplotlib is an optional extra (``pip install lazysd[plot]``), imported only inside these
functions so that ``import lazysd`` never needs it. Nothing here reads tensor data.

Example:
    >>> from lazysd.plot import plot_layer_bytes, plot_rank_bytes
    >>> ax = plot_layer_bytes(vsd)                       # doctest: +SKIP
    >>> ax = plot_rank_bytes(vsd.rank_plan(ep=8))        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .rules import KINDS

if TYPE_CHECKING:
    from .dryrun import LoadPlan
    from .inspect import Selection
    from .virtual import VirtualStateDict

_GIB = 1 << 30


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lazysd plots need matplotlib: pip install 'lazysd[plot]'") from e
    return plt


def _unit(largest: float) -> tuple[float, str]:
    for scale, name in ((_GIB, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if largest >= scale:
            return scale, name
    return 1, "B"


def _stacked(ax: Any, labels: list[str], series: Mapping[str, list[int]]) -> None:
    """Stacked bars of ``series`` (kind -> values per label), in the unit their largest total suits."""
    totals = [sum(vals[i] for vals in series.values()) for i in range(len(labels))]
    scale, unit = _unit(max(totals, default=0))
    bottom = [0.0] * len(labels)
    for kind, vals in series.items():
        heights = [v / scale for v in vals]
        ax.bar(labels, heights, bottom=bottom, label=kind)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel(unit)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))


def plot_layer_bytes(vsd: VirtualStateDict | Selection, *, ax: Any = None) -> Any:
    """Stacked bars: bytes of each layer (``'-'``: outside layers) by module kind.

    Args:
        vsd: a VirtualStateDict or a :class:`~lazysd.inspect.Selection` of it.
        ax: matplotlib Axes to draw on; a new figure when omitted.

    Returns:
        The Axes.
    """
    plt = _pyplot()
    if ax is None:
        # Constrained layout makes room for the legend (outside the axes) and the labels, so
        # savefig outside Jupyter (which crops to the drawn artists itself) clips nothing.
        _, ax = plt.subplots(figsize=(10, 3.5), layout="constrained")
    summary = vsd.summarize(by=("layer", "kind"))
    layers = list(dict.fromkeys(r.group[0] for r in summary.rows))
    kinds = [k for k in KINDS if any(r.group[1] == k for r in summary.rows)]
    cells = summary.as_dict()
    _stacked(ax, layers, {k: [cells.get((layer, k), 0) for layer in layers] for k in kinds})
    ax.set_xlabel("layer")
    ax.set_title("bytes per layer by module kind")
    ax.tick_params(axis="x", labelsize="small", labelrotation=90 if len(layers) > 24 else 0)
    return ax


def plot_rank_bytes(plan: LoadPlan, *, ax: Any = None) -> Any:
    """Stacked bars: bytes each rank of a dry-run plan reads, by module kind.

    Args:
        plan: from ``vsd.rank_plan(ep, ...)``.
        ax: matplotlib Axes to draw on; a new figure when omitted.

    Returns:
        The Axes.
    """
    plt = _pyplot()
    if ax is None:
        # Width for the bars plus the legend beside them.
        _, ax = plt.subplots(figsize=(max(4, 0.3 * len(plan.ranks)) + 3, 3.5), layout="constrained")
    labels = [str(r.rank) for r in plan.ranks]
    kinds = [k for k in KINDS if any(r.by_kind.get(k) for r in plan.ranks)]
    _stacked(ax, labels, {k: [r.by_kind.get(k, 0) for r in plan.ranks] for k in kinds})
    ax.set_xlabel("rank")
    ax.set_title(f"bytes read per rank, {plan.layout.mesh} (imbalance {plan.imbalance:.3f})", fontsize="medium")
    return ax
