"""Headless plots for every experiment: one helper, one look.

``line_plot`` draws named series (x, y) on one axis and writes a PNG atomically. ``multi_plot``
draws several panels side by side. ``interval_plot`` draws means with their intervals over named
categories (no numeric axis, no line joining categories). Both use the Agg backend, so they work without a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from proxnets.utils.io import atomic_path  # noqa: E402

__all__ = ["line_plot", "multi_plot", "interval_plot", "Panel"]

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


class Panel(dict):
    """One axis of :func:`multi_plot`: ``Panel(series=..., xlabel=..., ylabel=..., title=..., logx=, logy=,
    kind="line"|"scatter")``."""


def _draw(ax, series: Series, *, xlabel="", ylabel="", title="", logx=False, logy=False, kind="line", hlines=None):
    for name, (x, y) in series.items():
        if kind == "scatter":
            ax.scatter(list(x), list(y), label=name, s=18)
        else:
            marker = "o" if len(x) <= 25 else None
            ax.plot(list(x), list(y), label=name, marker=marker, markersize=3)
    for value, label in (hlines or {}).items() if isinstance(hlines, dict) else []:
        ax.axhline(value, color="gray", linestyle="--", linewidth=0.8, label=label)
    if logx:
        ax.set_xscale("log")
    elif series and all(float(v).is_integer() for x, _ in series.values() for v in x):
        # counts (epochs, iterations, depth): no tick at a fractional epoch
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logy:
        ax.set_yscale("symlog" if logy == "symlog" else "log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)


def line_plot(path: str | os.PathLike, series: Series, **kwargs) -> Path:
    """Plot ``{name: (x, y)}`` to ``path`` (PNG). kwargs: xlabel, ylabel, title, logx, logy, kind, hlines."""
    return multi_plot(path, [Panel(series=series, **kwargs)])


def multi_plot(path: str | os.PathLike, panels: Sequence[Mapping], *, suptitle: str = "", width: float = 4.6) -> Path:
    """Several panels in one row, each given as a mapping of :func:`line_plot` arguments."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel = dict(panel)
        _draw(ax, panel.pop("series"), **panel)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def interval_plot(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, tuple[float, float, float]]],
    *,
    ylabel: str = "",
    title: str = "",
) -> Path:
    """``{series: {category: (mean, low, high)}}`` as points with error bars, one slot per category.

    Series are offset side by side within a slot so that their intervals do not hide each other.
    """
    categories = list(dict.fromkeys(c for g in groups.values() for c in g))
    fig, ax = plt.subplots(figsize=(max(4.6, 1.2 * len(categories) + 2), 3.6))
    width = 0.6 / max(len(groups), 1)
    for k, (name, values) in enumerate(groups.items()):
        xs, means, lows, highs = [], [], [], []
        for i, c in enumerate(categories):
            if c in values:
                m, lo, hi = values[c]
                xs.append(i - 0.3 + width * (k + 0.5))
                means.append(m)
                lows.append(m - lo)
                highs.append(hi - m)
        ax.errorbar(xs, means, yerr=[lows, highs], fmt="o", capsize=4, markersize=4, label=name)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
