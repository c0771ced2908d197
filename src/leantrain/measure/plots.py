"""PNG charts (matplotlib, headless): bar panels for comparisons, a curve for sweeps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402


def bar_panels(labels: list[str], panels: list[tuple[str, list[float]]], path: Path,
               title: str, highlight: int | None = None, reference: float | None = 1.0,
               intervals: list[tuple[float, float] | None] | None = None) -> None:
    """Horizontal bars, one panel per (axis title, values), the same labels down each panel.

    `highlight` marks one row (e.g. the winner); `reference` draws a line in the first panel;
    `intervals` (low, high) per row become error bars in the first panel.
    """
    height = 0.45 * len(labels) + 1.5
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), height), sharey=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    colors = ["tab:orange" if i == highlight else "tab:blue" for i in range(len(labels))]
    for k, (ax, (name, values)) in enumerate(zip(axes, panels, strict=True)):
        ax.barh(range(len(labels)), values, color=colors)
        if k == 0 and intervals is not None:
            rows = [(i, v, iv) for i, (v, iv) in enumerate(zip(values, intervals, strict=True))
                    if iv is not None]
            if rows:
                ax.errorbar([v for _, v, _ in rows], [i for i, _, _ in rows],
                            xerr=[[v - iv[0] for _, v, iv in rows],
                                  [iv[1] - v for _, v, iv in rows]],
                            fmt="none", ecolor="black", capsize=3, linewidth=1)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlabel(name)
        if k == 0 and reference is not None:
            ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
        ax.margins(x=0.18)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
