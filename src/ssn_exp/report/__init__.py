"""Reports over certification results (layer 4, docs/method.md section 7): read result files, write tables and plots.

Only reads results (:mod:`ssn_exp.report.records`); never imports training code. Matplotlib is imported
lazily by :func:`plot_curves` / :func:`plot_all_curves`. Command line: ``python -m ssn_exp.report``.
"""

from ssn_exp.report.cli import main
from ssn_exp.report.missing import MissingRun, find_missing, read_overrides
from ssn_exp.report.tables import (
    ACR_CSV_COLUMNS,
    BEST_CSV_COLUMNS,
    GroupBest,
    acr_rows,
    build_best_tables,
    dedupe_records,
    format_acr_markdown,
    format_cell,
    format_latex,
    format_markdown,
    format_seed_latex,
    format_seed_markdown,
    seed_table,
    write_acr_csv,
    write_csv,
)


def plot_curves(*args, **kwargs):
    """See :func:`ssn_exp.report.plots.plot_curves` (imports matplotlib on first use)."""
    from ssn_exp.report.plots import plot_curves as _plot_curves

    return _plot_curves(*args, **kwargs)


def plot_all_curves(*args, **kwargs):
    """See :func:`ssn_exp.report.plots.plot_all_curves` (imports matplotlib on first use)."""
    from ssn_exp.report.plots import plot_all_curves as _plot_all_curves

    return _plot_all_curves(*args, **kwargs)


__all__ = [
    "main",
    "MissingRun",
    "find_missing",
    "read_overrides",
    "ACR_CSV_COLUMNS",
    "BEST_CSV_COLUMNS",
    "GroupBest",
    "acr_rows",
    "build_best_tables",
    "dedupe_records",
    "format_acr_markdown",
    "format_cell",
    "format_latex",
    "format_markdown",
    "format_seed_latex",
    "format_seed_markdown",
    "seed_table",
    "write_acr_csv",
    "write_csv",
    "plot_curves",
    "plot_all_curves",
]
