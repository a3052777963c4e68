"""The audit's figures (matplotlib, Agg): alpha sweep, ROC curves, membership AUC against alpha."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .schema import SCORE_LABELS, _group_name, _score_names, _sorted_groups

__all__ = ["plot_alpha_sweep", "plot_roc", "plot_auc_alpha"]


def _new_figure(width: float, height: float, ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the caller.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save_figure(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _value(row: dict[str, Any], metric: str, group: str) -> float:
    value = row[metric].get(group)
    return np.nan if value is None else value


def plot_alpha_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Exposure per k, extraction per k and perplexity against alpha; fixed rows as lines."""
    sweep = sorted((r for r in rows if r["kind"] == "alpha"), key=lambda r: r["alpha"])
    fixed = [r for r in rows if r["kind"] != "alpha"]
    xs = [r["alpha"] for r in sweep]
    groups = _sorted_groups({g for r in rows for g in list(r["exposure_by_k"]) + list(r["extraction_by_k"])})
    styles = ["--", ":", "-."]
    fig, axes = _new_figure(14, 4.2, 3)
    panels = [("exposure_by_k", "exposure (bits)"), ("extraction_by_k", "extraction rate")]
    for ax, (metric, ylabel) in zip(axes, panels):
        for i, g in enumerate(groups):
            color = f"C{i}"
            name = _group_name(g)
            if sweep:
                ax.plot(xs, [_value(r, metric, g) for r in sweep], "o-", color=color, label=name)
            for j, r in enumerate(fixed):
                ax.axhline(_value(r, metric, g), color=color, ls=styles[j % 3], lw=1,
                           label=None if sweep else name if j == 0 else None)
        ax.set_ylabel(ylabel)
    ax = axes[2]
    if sweep:
        ax.plot(xs, [r["perplexity"] for r in sweep], "o-", color="k", label="model")
    for j, r in enumerate(fixed):
        ax.axhline(r["perplexity"], color="gray", ls=styles[j % 3], lw=1, label=r["label"])
    ax.set_ylabel("retain perplexity")
    for ax in axes:
        ax.set_xlabel("alpha")
        if not sweep:
            ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    for j, r in enumerate(fixed):  # explain the line styles once
        axes[0].plot([], [], color="gray", ls=styles[j % 3], label=r["label"])
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("alpha sweep (dashed/dotted: fixed models)")
    _save_figure(fig, path)


def _roc_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """alpha 0 and alpha 1 when present (else every non-reference row), plus the reference."""
    by_alpha = {r["alpha"]: r for r in rows if r["kind"] == "alpha"}
    chosen = [by_alpha[a] for a in (0.0, 1.0) if a in by_alpha]
    if not chosen:
        chosen = [r for r in rows if r["kind"] != "reference"][:4]
    return chosen + [r for r in rows if r["kind"] == "reference"]


def plot_roc(rows: list[dict[str, Any]], path: Path) -> None:
    """ROC curve per membership score: alpha 0 and 1 (or the fixed rows) and the reference (dashed)."""
    names = _score_names(rows)
    fig, axes = _new_figure(4.3 * len(names), 4.2, len(names))
    for ax, name in zip(axes, names):
        for r in _roc_rows(rows):
            m = r["mia"][name]
            style = "--" if r["kind"] == "reference" else "-"
            ax.plot(m["fpr"], m["tpr"], ls=style, label=f"{r['label']} (AUC {m['auc']:.2f})")
        ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
        ax.set_title(f"MIA score: {SCORE_LABELS[name]}")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    _save_figure(fig, path)


def plot_auc_alpha(rows: list[dict[str, Any]], path: Path) -> None:
    """Every membership attack's AUC (with its interval) against alpha; fixed rows (the model as
    is, baselines, the reference) as horizontal lines in the attack's colour."""
    names = _score_names(rows)
    sweep = sorted((r for r in rows if r["kind"] == "alpha"), key=lambda r: r["alpha"])
    fixed = [r for r in rows if r["kind"] != "alpha"]
    styles = ["--", ":", "-."]
    fig, (ax,) = _new_figure(7, 4.5, 1)
    for i, name in enumerate(names):
        color = f"C{i}"
        if sweep:
            xs = [r["alpha"] for r in sweep]
            ys = [r["mia"][name]["auc"] for r in sweep]
            ax.plot(xs, ys, "o-", color=color, label=SCORE_LABELS[name])
            cis = [r["mia"][name].get("auc_ci") for r in sweep]
            if all(cis):
                ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], color=color, alpha=0.12, lw=0)
        for j, r in enumerate(fixed):
            ax.axhline(r["mia"][name]["auc"], color=color, ls=styles[j % 3], lw=1,
                       label=None if sweep or j else SCORE_LABELS[name])
    for j, r in enumerate(fixed):  # explain the line styles once
        ax.plot([], [], color="gray", ls=styles[j % 3], label=r["label"])
    ax.axhline(0.5, color="k", lw=0.8, alpha=0.5)
    ax.set_xlabel("alpha")
    ax.set_ylabel("membership AUC (0.5 = chance)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("membership attacks against alpha (band: 95 % interval; lines: fixed models)")
    _save_figure(fig, path)
