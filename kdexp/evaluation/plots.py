"""PNG figures of the analyses (matplotlib, headless ``Agg`` backend).

    fig, axes = figure(1, 2)
    curve(axes[0], x, mean, stderr, label="kd (fkl)")
    save(fig, run_dir / "exposure.png")

Every helper draws on an axis it is given, so that one figure can hold several panels and
several runs; ``nan`` values (a step no sequence reached, an empty bin) are simply not drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def figure(rows: int, cols: int, width: float = 4.6, height: float = 3.4):
    """A figure of ``rows x cols`` panels and its axes as a flat list."""
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, list(axes.flat)


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def curve(ax, x: Sequence[float], mean: Sequence[float], stderr: Sequence[float] | None = None,
          label: str | None = None, c: str | None = None, style: str = "-") -> None:
    """A line with a shaded band of one standard error (where the error is known)."""
    x, y = np.asarray(x, dtype=float), np.asarray(mean, dtype=float)
    ax.plot(x, y, style, color=c, label=label, lw=1.6, marker="o" if len(x) <= 12 else None, ms=3)
    if stderr is not None:
        e = np.asarray(stderr, dtype=float)
        ok = np.isfinite(e) & np.isfinite(y)
        if ok.any():
            ax.fill_between(x[ok], (y - e)[ok], (y + e)[ok], color=c, alpha=0.2, lw=0)


def bars(ax, groups: Sequence[str], series: dict[str, Sequence[float]],
         errors: dict[str, Sequence[float]] | None = None) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series in each group."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        err = None if errors is None else np.nan_to_num(np.asarray(errors[name], dtype=float))
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=err, label=name,
               color=color(i), capsize=2)
    ax.set_xticks(x, groups)


def reliability(ax, edges: Sequence[float], confidence: Sequence[float], accuracy: Sequence[float],
                label: str, c: str) -> None:
    """A reliability diagram's line: accuracy against mean confidence per bin, and the diagonal."""
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    conf, acc = np.asarray(confidence, dtype=float), np.asarray(accuracy, dtype=float)
    ok = np.isfinite(conf) & np.isfinite(acc)
    ax.plot(conf[ok], acc[ok], "o-", color=c, label=label, lw=1.6, ms=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def min_span(ax, span: float) -> None:
    """Widen the y-axis to at least ``span`` around its centre, so that an axis autoscaled to a
    few hundredths does not draw noise as a trend."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def finish(ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def save(fig, path: Path, title: str | None = None) -> Path:
    """Write ``fig`` as a PNG (written to a temporary name, then renamed) and close it."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
