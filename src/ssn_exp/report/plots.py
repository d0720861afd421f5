"""Certified-accuracy curves per sigma comparing the methods (the paper's Figures 10-14).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change). Lines are named by the
records' labels; each method gets a colour of :data:`PALETTE` from a hash of its name (:func:`method_color`), the
same in every figure and every report, its further-radius records (e.g. box) the same colour, dash-dotted.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ssn_exp.atomic import replace_file, safe_name
from ssn_exp.report.records import RunRecord, sigma_label
from ssn_exp.report.tables import dedupe_records, method_ranks, pretty, select_seed, sort_key

__all__ = [
    "PALETTE",
    "method_color",
    "method_colors",
    "curve",
    "radius_grid",
    "curves_figure",
    "plot_curves",
    "plot_all_curves",
    "curve_filename",
    "samples_figure",
    "samples_filename",
    "plot_all_samples",
]

#: The methods' colours (:func:`method_color` picks one by a hash of the method's name).
PALETTE = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)


#: Salt of :func:`method_color`'s hash, chosen so that the shipped methods and their procedure variants
#: ("<method> [sequential]", "<method> [fixed]"), Laplace included, get ten distinct colours (the methods: none grey or olive).
_COLOR_SALT = "colour174674:"


def method_color(method: str) -> str:
    """The colour of a method (a base method's name, e.g. "uniform [sequential]") in every figure of every report:
    :data:`PALETTE` at a hash of the name, so it never depends on which other methods a figure holds."""
    digest = hashlib.sha256((_COLOR_SALT + method).encode()).digest()
    return PALETTE[int.from_bytes(digest[:8], "big") % len(PALETTE)]


def method_colors(records: Iterable[RunRecord]) -> dict[str, str]:
    """A colour per method of ``records`` (:func:`method_color` of its base method's name): a further-radius record
    ("uniform (box)") shares its base method's colour."""
    return {r.method: method_color(r.base_method) for r in records}


def _plain(text: str) -> str:
    """Text from result files shown as written: matplotlib would read ``$...$`` as mathtext (and fail on bad TeX)."""
    return str(text).replace("$", r"\$")


def max_certified_radius(rec: RunRecord) -> float:
    """Largest radius certified for a correct example (0 if none)."""
    rho = rec.rho[rec.correct]
    return float(max(np.max(rho), 0.0)) if rho.size else 0.0


def radius_grid(rmax: float, points: int = 201) -> np.ndarray:
    """0 ... the next multiple of 0.25 above rmax (so the final drop shows), rounded to 6 decimals."""
    top = (math.floor(rmax / 0.25) + 1) * 0.25
    return np.round(np.linspace(0.0, top, points), 6)


def curve(rec: RunRecord, grid: Sequence[float]) -> np.ndarray:
    """Certified accuracy (%) at each radius of grid (exact integer comparison for DSSN records).

    Radii go to the metric as given: fractions exactly, floats by their shortest decimal (the grid of
    :func:`radius_grid` is rounded to 6 decimals, so each point is the decimal it prints as).
    """
    grid = list(grid)
    acc = rec.certified_accuracy(grid)
    return 100.0 * np.array([acc[float(r)] for r in grid])


def _linestyle(rec: RunRecord) -> str:
    """Ours solid, published dashed, further radii (e.g. box-constrained certificates) dash-dotted."""
    if rec.variant:
        return "-."
    return "--" if rec.origin != "ours" else "-"


def curve_filename(dataset: str, training: str, denoiser: str) -> str:
    """``curves_<dataset>_<training>_<denoiser>.png``, each part a :func:`ssn_exp.atomic.safe_name`."""
    return f"curves_{safe_name(dataset)}_{safe_name(training)}_{safe_name(denoiser)}.png"


def _legend_columns(handles, panels: int) -> int:
    """Columns of a figure legend below ``panels`` panels side by side: at most three entries per two panels'
    widths, in rows of near-equal length (6 entries under 3 panels: 2 rows of 3), so no entry is cut off."""
    most = max(2, (3 * panels) // 2)
    rows = math.ceil(len(handles) / most)
    return max(1, math.ceil(len(handles) / max(rows, 1)))


def _figure_legend(fig, handles: dict, panels: int) -> None:
    """A legend below the panels, with as many columns as fit (:func:`_legend_columns` at most): columns are taken
    away, then the figure widened, until the legend lies inside the figure (no entry is cut off)."""
    ncols = _legend_columns(handles, panels)
    while True:
        legend = fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols)
        fig.canvas.draw()
        box, edge = legend.get_window_extent(), fig.bbox
        if box.x0 >= edge.x0 and box.x1 <= edge.x1:
            return
        legend.remove()
        if ncols > 1:
            ncols -= 1
        else:
            fig.set_figwidth(fig.get_figwidth() * box.width / edge.width + 0.2)


def _save(fig, path, inside=None, formats: Sequence[str] = ()) -> list[Path]:
    """The figure as a PNG at ``path`` and in each of ``formats`` (e.g. "pdf", "svg": vector figures) beside it,
    each written atomically (a temporary file and a rename): a reader never sees half a file, and a symbolic link
    at a path is replaced, never written through. ``inside``: the output folder the files must lie in
    (:func:`ssn_exp.atomic.replace_file`); without it, ``path``'s folder is created. Returns the paths written."""
    path = Path(path)
    if inside is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", *formats):
        target = path if fmt == "png" else path.with_suffix(f".{fmt}")
        buf = io.BytesIO()
        # (no date in a PDF or SVG: the same figure gives the same bytes)
        meta = {"CreationDate": None} if fmt == "pdf" else {"Date": None} if fmt == "svg" else None
        fig.savefig(buf, dpi=110, format=fmt, metadata=meta)
        replace_file(target, buf.getvalue(), inside=inside)
        paths.append(target)
    return paths


def plot_curves(
    records: Sequence[RunRecord],
    path,
    title: str | None = None,
    points: int = 201,
    colors: dict[str, str] | None = None,
    inside=None,
    formats: Sequence[str] = (),
) -> Path:
    """One PNG (:func:`curves_figure`): a panel per sigma, a line per (method, origin); ``inside`` and ``formats``
    (further files beside it) as :func:`_save`. Returns the PNG's path."""
    return _save(curves_figure(records, title, points, colors), path, inside, formats)[0]


def curves_figure(
    records: Sequence[RunRecord], title: str | None = None, points: int = 201, colors: dict[str, str] | None = None
):
    """A matplotlib ``Figure``: a panel per sigma, a line per (method, origin) named by its label; published runs
    dashed, further radii (box certificates) dash-dotted.

    ``records`` should share dataset, training and denoiser; for each (origin, method, sigma) the
    smallest seed is drawn. ``colors``: method -> colour (the others: :func:`method_colors` of ``records``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records, _ = dedupe_records(records)
    colors = {**method_colors(records), **(colors or {})}
    ranks = method_ranks(records)
    by_line: dict[tuple, list[RunRecord]] = {}
    for rec in records:
        by_line.setdefault((rec.origin, rec.method, round(float(rec.sigma), 6)), []).append(rec)
    chosen = {key: select_seed(recs)[1][0] for key, recs in by_line.items()}
    sigmas = sorted({key[2] for key in chosen})
    if not sigmas:
        raise ValueError("no records to plot")
    envelope = len(sigmas) > 1
    panels = len(sigmas) + envelope
    ncols = min(5, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    handles = {}
    for i, sigma in enumerate(sigmas):
        ax = axes[i // ncols][i % ncols]
        lines = [(key, rec) for key, rec in chosen.items() if key[2] == sigma]
        lines.sort(key=lambda kr: (ranks[kr[0][1]], kr[0][0] != "ours", kr[0][0]))
        grid = radius_grid(max(max_certified_radius(rec) for _, rec in lines), points)
        for (origin, method, _), rec in lines:
            published = origin != "ours"
            label = _plain(f"{rec.label} ({'published' if published else 'ours'})")
            if published and len({k[0] for k in chosen if k[0] != "ours"}) > 1:
                label = _plain(f"{rec.label} (published, {origin})")
            (h,) = ax.plot(
                grid,
                curve(rec, grid),
                color=colors[method],
                linestyle=_linestyle(rec),
                linewidth=1.4,
                label=label,
            )
            handles.setdefault(label, h)
        _panel(ax, f"σ = {sigma_label(sigma)}", grid, i, ncols, nrows, panels)
    if envelope:  # the paper's figures: at each radius the best certified accuracy over sigma, per line
        ax = axes[len(sigmas) // ncols][len(sigmas) % ncols]
        grid = radius_grid(max(max_certified_radius(rec) for rec in chosen.values()), points)
        lines = sorted({key[:2] for key in chosen}, key=lambda k: (ranks[k[1]], k[0] != "ours", k[0]))
        for origin, method in lines:
            recs = [rec for key, rec in chosen.items() if key[:2] == (origin, method)]
            best = np.max([curve(rec, grid) for rec in recs], axis=0)
            ax.plot(grid, best, color=colors[method], linestyle=_linestyle(recs[0]), linewidth=1.4, label=method)
        _panel(ax, "best over σ", grid, len(sigmas), ncols, nrows, panels)
    for j in range(panels, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if title:
        fig.suptitle(_plain(title))
    _figure_legend(fig, handles, ncols)
    return fig


def _panel(ax, title: str, grid, i: int, ncols: int, nrows: int, panels: int) -> None:
    """Title, limits, grid and axis labels of the ``i``-th of ``panels`` curve panels in ``nrows`` x ``ncols``."""
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, grid[-1])
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if i % ncols == 0:
        ax.set_ylabel("certified accuracy (%)")
    if i // ncols == nrows - 1 or i + ncols >= panels:
        ax.set_xlabel("ℓ1 radius")


def plot_all_curves(
    records: Iterable[RunRecord], out_dir, points: int = 201, formats: Sequence[str] = ()
) -> list[Path]:
    """A figure per (dataset, training, denoiser) into out_dir (a PNG, and each of ``formats`` beside it); returns
    the written paths. A method has the same colour in every figure (:func:`method_colors`)."""
    records = list(records)
    colors = method_colors(records)
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in records:
        groups.setdefault((rec.dataset, rec.training, rec.denoiser), []).append(rec)
    paths = []
    for (dataset, training, denoiser), recs in sorted(
        groups.items(), key=lambda kv: sort_key("ours", kv[0][0], "", kv[0][1], kv[0][2])
    ):
        title = f"{pretty(dataset)}, {training} training, denoiser: {denoiser}"
        path = Path(out_dir) / curve_filename(dataset, training, denoiser)
        paths += _save(curves_figure(recs, title, points, colors), path, out_dir, formats)
    return paths


DENOISER_ORDER = ("stability", "mse", "mse_retrain")


def plot_denoisers(
    records: Sequence[RunRecord],
    path,
    title: str | None = None,
    points: int = 201,
    colors: dict[str, str] | None = None,
    inside=None,
    formats: Sequence[str] = (),
) -> Path | None:
    """The paper's Figure 9: a row per denoiser variant, a panel per sigma, a line per method.

    ``colors``: method -> colour (the others: :func:`method_colors` of ``records``); ``inside`` and ``formats`` as
    :func:`_save`. Returns the PNG's path, or None without records."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records, _ = dedupe_records([r for r in records if r.denoiser != "none"])
    if not records:
        return None
    colors = {**method_colors(records), **(colors or {})}
    ranks = method_ranks(records)
    variants = [v for v in DENOISER_ORDER if any(r.denoiser == v for r in records)]
    variants += sorted({r.denoiser for r in records} - set(variants))
    sigmas = sorted({round(float(r.sigma), 6) for r in records})
    fig = Figure(figsize=(3.2 * len(sigmas), 2.6 * len(variants) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(variants), len(sigmas), squeeze=False, sharey=True)
    handles = {}
    for i, variant in enumerate(variants):
        for j, sigma in enumerate(sigmas):
            ax = axes[i][j]
            recs = [r for r in records if r.denoiser == variant and round(float(r.sigma), 6) == sigma]
            recs.sort(key=lambda r: (ranks[r.method], r.origin != "ours", r.origin, r.seed))
            seen = set()
            grid = radius_grid(max((max_certified_radius(r) for r in recs), default=0.0), points)
            for r in recs:
                if (r.origin, r.method) in seen:
                    continue
                seen.add((r.origin, r.method))
                published = r.origin != "ours"
                label = _plain(f"{r.label} ({'published' if published else 'ours'})")
                (h,) = ax.plot(grid, curve(r, grid), color=colors[r.method], linestyle=_linestyle(r))
                handles.setdefault(label, h)
            ax.set_title(_plain(f"{variant}, σ = {sigma_label(sigma)}"), fontsize=9)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("certified accuracy (%)")
            if i == len(variants) - 1:
                ax.set_xlabel("ℓ1 radius")
    if title:
        fig.suptitle(_plain(title))
    if handles:
        _figure_legend(fig, handles, len(sigmas))
    return _save(fig, path, inside, formats)[0]


def plot_all_denoisers(records: Iterable[RunRecord], out_dir, formats: Sequence[str] = ()) -> list[Path]:
    """A Figure 9 per (dataset, training) with denoiser variants; colours as :func:`plot_all_curves` gives them."""
    records = list(records)
    colors = method_colors(records)
    by_data: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.denoiser != "none":
            by_data.setdefault((r.dataset, r.training), []).append(r)
    paths = []
    for (dataset, training), recs in sorted(by_data.items()):
        title = f"{pretty(dataset)}, {training} training: denoiser variants (appendix D, Figure 9)"
        name = f"denoisers_{safe_name(dataset)}_{safe_name(training)}.png"
        p = plot_denoisers(recs, Path(out_dir) / name, title, colors=colors, inside=out_dir, formats=formats)
        if p is not None:
            paths += [p, *(p.with_suffix(f".{fmt}") for fmt in formats)]
    return paths


# ---------------------------------------------------------------------------------------------
# Forward passes against certified radius (runs whose certificates have a samples column)


def samples_filename(rec: RunRecord) -> str:
    """``samples_<dataset>_<training>_<denoiser>_<method>[_<procedure>]_sigma<s>_seed<k>.png``, each part a
    :func:`ssn_exp.atomic.safe_name` of what the result files say (a procedure where the report tells procedures
    apart: "uniform [sequential]" -> "uniform_sequential")."""
    parts = [rec.dataset, rec.training, rec.denoiser, rec.noise_method, *([rec.procedure] if rec.tag else [])]
    parts += [f"tag={rec.run_tag}"] if rec.tag and rec.run_tag else []
    parts += [f"sigma{sigma_label(rec.sigma)}", f"seed{rec.seed}"]
    return "samples_" + "_".join(map(safe_name, parts)) + ".png"


def samples_figure(rec: RunRecord, title: str | None = None):
    """A matplotlib ``Figure``: forward passes spent on each example (log scale) against its certified radius,
    correct and misclassified examples apart (an abstention, radius < 0, is drawn at 0), with a vertical line at
    each radius of the run's own metrics (the radii a sequential test decides)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if rec.samples is None or len(rec.samples) == 0:
        raise ValueError(f"{rec.source}: no forward passes per example to plot")
    fig = Figure(figsize=(5.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rho = np.maximum(rec.rho, 0.0)
    for mask, color, name in ((rec.correct, "tab:blue", "correct"), (~rec.correct, "tab:red", "misclassified")):
        if mask.any():
            ax.scatter(rho[mask], rec.samples[mask], s=9, alpha=0.6, color=color, label=f"{name} ({int(mask.sum())})")
    for radius in rec.metric_radii:
        ax.axvline(radius, color="tab:gray", linewidth=0.7, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("certified ℓ1 radius")
    ax.set_ylabel("forward passes per image")
    ax.grid(alpha=0.3, which="both")
    mean = float(np.mean(rec.samples))
    ax.set_title(_plain(title or f"{rec.label}, σ = {sigma_label(rec.sigma)}: mean {mean:.0f} passes"), fontsize=9)
    ax.legend(fontsize=8)
    return fig


def plot_all_samples(records: Iterable[RunRecord], out_dir, formats: Sequence[str] = ()) -> list[Path]:
    """A samples-vs-radius PNG (:func:`samples_figure`) into ``out_dir`` for every run whose certificates record
    the forward passes spent per example (its own certificate; a further radius shares the run's passes)."""
    records, _ = dedupe_records([r for r in records if r.samples is not None and not r.variant])
    ranks = method_ranks(records)
    records.sort(key=lambda r: (sort_key(r.origin, *r.group, ranks=ranks), float(r.sigma), int(r.seed)))
    paths, used = [], set()
    for rec in records:
        name = samples_filename(rec)
        stem, k = name.removesuffix(".png"), 1
        while name in used:  # two runs whose sigmas print alike (0.5 and 0.5000001)
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        title = f"{pretty(rec.dataset)}, {rec.label}, σ = {sigma_label(rec.sigma)}, seed {rec.seed}"
        title += f"\nmean {float(np.mean(rec.samples)):.0f} forward passes per image"
        paths += _save(samples_figure(rec, title), Path(out_dir) / name, out_dir, formats)
    return paths
