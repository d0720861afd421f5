"""The certified-accuracy curve of one run (matplotlib Agg canvas: headless, no pyplot state).

The report's multi-run figures live in :mod:`ssn_exp.report.plots`.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from ssn_exp.certify.metrics import certified_count

__all__ = ["plot_run_curve", "run_curve", "CURVE_POINTS"]

#: At most this many radii on a run's curve.
CURVE_POINTS = 400


def _top(radius, q, extra) -> float:
    """The right end of the curve: 5% beyond the largest radius (standard or further)."""
    rho = np.asarray(radius, dtype=np.float64) / (q or 1)
    top_rho = float(max(rho.max(initial=0.0), 0.0))
    for values in (extra or {}).values():
        top_rho = max(top_rho, float(max(np.max(values, initial=0.0), 0.0)))
    return top_rho * 1.05 + 1e-3


def run_curve(correct, radius, q, extra: dict | None = None) -> tuple[list, np.ndarray, dict]:
    """The radii of a run's curve and the certified accuracy (%) at each; ``extra``: further radii by name (e.g.
    ``{"box": radius_box}``), whose curves come back by name.

    With ``q`` (DSSN: ``radius`` holds the integer numerators k) the radii are exact fractions k/q, every
    multiple of 1/q up to the top when there are at most CURVE_POINTS of them, else every s-th for the
    smallest s that keeps within CURVE_POINTS: each point is decided exactly (never through a float such as
    the decimal reading of k/255). Without ``q`` they are CURVE_POINTS evenly spaced floats.
    """
    top = _top(radius, q, extra)
    if q is not None:
        last = int(top * q)
        step = -(-(last + 1) // CURVE_POINTS)
        grid: list = [Fraction(k, q) for k in range(0, last + 1, step)]
    else:
        grid = [float(r) for r in np.linspace(0, top, CURVE_POINTS)]
    n = len(np.asarray(correct))
    acc = 100.0 * (
        np.array([certified_count(correct, radius, r, q) for r in grid]) / n
    )  # as the report: % of a fraction
    curves = {
        name: 100.0 * (np.array([certified_count(correct, values, r) for r in grid]) / n)
        for name, values in (extra or {}).items()
    }
    return grid, acc, curves


def plot_run_curve(correct, radius, q, metrics: dict, path: Path, extra: dict | None = None) -> None:
    """Certified accuracy (%) against the l1 radius; with ``extra`` radii (e.g. box) their curves too (dash-dot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid, acc, curves = run_curve(correct, radius, q, extra)
    x = [float(r) for r in grid]
    top = _top(radius, q, extra)
    fig = Figure(figsize=(5, 3.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(
        x,
        acc,
        drawstyle="steps-post" if q else "default",
        label=f"{metrics['method']} (standard)" if curves else metrics["method"],
    )
    for name, values in curves.items():
        ax.plot(x, values, linestyle="-.", label=f"{metrics['method']} ({name})")
    if curves:
        ax.legend(fontsize=8)
    ax.set_xlabel("ℓ1 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{metrics['dataset']}: {metrics['method']} σ={metrics['sigma']:g} ({metrics['training']}), "
        f"clean {100 * metrics['clean_accuracy']:.1f}%",
        fontsize=9,
    )
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
