"""The certified-accuracy curve of one run (matplotlib Agg canvas: headless, no pyplot state).

The report's multi-run figures live in :mod:`ssn_exp.report.plots`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssn_exp.certify.metrics import certified_accuracy

__all__ = ["plot_run_curve"]


def plot_run_curve(correct, radius, q, metrics: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rho = np.asarray(radius, dtype=np.float64) / (q or 1)
    top = float(max(rho.max(initial=0.0), 0.0)) * 1.05 + 1e-3
    grid = np.arange(0, int(top * q) + 1) / q if q is not None and top * q <= 400 else np.linspace(0, top, 400)
    acc = certified_accuracy(correct, radius, [float(r) for r in grid], q=q)  # integer k when q is set
    ys = [100 * acc[float(r)] for r in grid]
    fig = Figure(figsize=(5, 3.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(grid, ys, drawstyle="steps-post" if q else "default")
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
