"""PNG charts (matplotlib, headless): bar panels for comparisons, a curve for sweeps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

FONT = 10  # points at 100%: the smallest text on any chart


def bar_panels(labels: list[str], panels: list[tuple[str, list[float]]], path: Path,
               title: str, highlight: int | None = None, reference: float | None = 1.0,
               intervals: list[tuple[float, float] | None] | None = None,
               columns: int = 2) -> None:
    """Horizontal bars, one panel per (axis title, values), the same labels in each, laid out
    as a grid of `columns` (a readable page, not a strip); text at least `FONT` points.

    `highlight` marks one row (e.g. the winner); `reference` draws a line in the first panel;
    `intervals` (low, high) per row become error bars in the first panel.
    """
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    height = 0.5 * len(labels) + 1.6
    fig, grid = plt.subplots(rows, columns, figsize=(6.5 * columns, height * rows),
                             squeeze=False)
    axes = [ax for row in grid for ax in row]
    colors = ["tab:orange" if i == highlight else "tab:blue" for i in range(len(labels))]
    for k, (ax, (name, values)) in enumerate(zip(axes, panels, strict=False)):
        ax.barh(range(len(labels)), values, color=colors)
        if k == 0 and intervals is not None:
            marked = [(i, v, iv) for i, (v, iv) in enumerate(zip(values, intervals, strict=True))
                      if iv is not None]
            if marked:
                ax.errorbar([v for _, v, _ in marked], [i for i, _, _ in marked],
                            # max(0): a median a rounding error outside its interval
                            # (rounds that all agree) must not make matplotlib refuse
                            xerr=[[max(v - iv[0], 0.0) for _, v, iv in marked],
                                  [max(iv[1] - v, 0.0) for _, v, iv in marked]],
                            fmt="none", ecolor="black", capsize=3, linewidth=1)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=FONT)
        ax.set_title(name, fontsize=FONT + 1)
        ax.tick_params(labelsize=FONT)
        ax.set_yticks(range(len(labels)), labels, fontsize=FONT)
        ax.invert_yaxis()
        if k == 0 and reference is not None:
            ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
        ax.margins(x=0.22)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=FONT + 2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve(x: list[float], series: list[tuple[str, list[float]]], path: Path, title: str,
          xlabel: str, ylabel: str, log_x: bool = False, mark_x: float | None = None,
          mark_label: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in series:
        ax.plot(x[:len(values)], values, label=name)
    if mark_x is not None:
        ax.axvline(mark_x, color="tab:red", linestyle="--", label=mark_label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=FONT)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
