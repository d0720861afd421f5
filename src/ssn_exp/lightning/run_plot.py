"""The certified-accuracy curve of one run (matplotlib Agg canvas: headless, no pyplot state).

The report's multi-run figures live in :mod:`ssn_exp.report.plots`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssn_exp.certify.metrics import certified_accuracy

__all__ = ["plot_run_curve"]


def plot_run_curve(correct, radius, q, metrics: dict, path: Path, radius_box=None) -> None:
    """Certified accuracy (%) against the l1 radius; with ``radius_box`` also the box-constrained curve (dash-dot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rho = np.asarray(radius, dtype=np.float64) / (q or 1)
    top_rho = float(max(rho.max(initial=0.0), 0.0))
    if radius_box is not None:
        top_rho = max(top_rho, float(max(np.max(radius_box, initial=0.0), 0.0)))
    top = top_rho * 1.05 + 1e-3
    grid = np.arange(0, int(top * q) + 1) / q if q is not None and top * q <= 400 else np.linspace(0, top, 400)
    fig = Figure(figsize=(5, 3.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    acc = certified_accuracy(correct, radius, [float(r) for r in grid], q=q)  # integer k when q is set
    ax.plot(
        grid,
        [100 * acc[float(r)] for r in grid],
        drawstyle="steps-post" if q else "default",
        label=f"{metrics['method']} (standard)" if radius_box is not None else metrics["method"],
    )
    if radius_box is not None:
        box = certified_accuracy(correct, radius_box, [float(r) for r in grid])
        ax.plot(grid, [100 * box[float(r)] for r in grid], linestyle="-.", label=f"{metrics['method']} (box)")
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
