"""Report tables (docs/method.md section 7): best-over-sigma, ACR per run, seed robustness.

Everything here works on :class:`ssn_exp.report.records.RunRecord` lists and only reads results:
numbers are recomputed from the per-example certificates, never from a training run.
Accuracies are kept as fractions in the data structures and written in percent (2 decimals).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ssn_exp.atomic import replace_file
from ssn_exp.certify.metrics import PAPER_RADII, BestRow, best_over_sigma
from ssn_exp.report.records import FORWARD_PASS_KEYS, RunRecord, sigma_label

__all__ = [
    "data_radii",
    "BEST_CSV_COLUMNS",
    "ACR_CSV_COLUMNS",
    "GroupBest",
    "dedupe_records",
    "select_seed",
    "build_best_tables",
    "seed_table",
    "format_cell",
    "format_markdown",
    "format_latex",
    "format_seed_markdown",
    "format_seed_latex",
    "write_csv",
    "acr_rows",
    "format_acr_markdown",
    "write_acr_csv",
    "PASSES_COLUMNS",
    "passes_rows",
    "format_passes_markdown",
    "write_passes_csv",
    "sort_key",
    "method_ranks",
    "method_labels",
]

#: Exactly these first 8 columns; ``origin`` comes last.
BEST_CSV_COLUMNS = (
    "dataset",
    "method",
    "training",
    "denoiser",
    "radius",
    "certified_accuracy",
    "sigma",
    "clean_accuracy",
    "origin",
)
ACR_CSV_COLUMNS = (
    "origin",
    "dataset",
    "method",
    "training",
    "denoiser",
    "sigma",
    "seed",
    "n",
    "clean_accuracy",
    "acr",
)

# Display order of data sets, trainings and denoisers (unknown names sort after the known ones, alphabetically).
# Methods are ordered by their records' labels (:func:`method_ranks`), never by name here.
_ORDER = {
    "dataset": ("cifar10", "imagenet"),
    "training": ("standard", "stability"),
    "denoiser": ("none", "stability", "mse", "mse_retrain"),
}
_PRETTY = {
    "cifar10": "CIFAR-10",
    "imagenet": "ImageNet",
    "standard": "Standard",
    "stability": "Stability",
    "none": "None",
    "mse": "MSE",
    "mse_retrain": "MSE (retrained)",
}


def _rank(kind: str, value: str) -> tuple[int, str]:
    order = _ORDER[kind]
    return (order.index(value), "") if value in order else (len(order), value)


def _origin_rank(origin: str) -> tuple[int, str]:
    return (0, "") if origin == "ours" else (1, origin)


def method_ranks(records: Iterable[RunRecord]) -> dict[str, tuple]:
    """The sort key of every method of ``records``: by label (case-insensitive), each method's further-radius
    records (e.g. "uniform (box)") right after it, whatever their labels. The first record of a method gives its
    label (its own records before those of its further radii)."""
    records = list(records)
    by_label: dict[str, tuple[str, str]] = {}
    for r in sorted(records, key=lambda r: r.variant != ""):  # stable: a method's own records first
        by_label.setdefault(r.base_method, (r.base_label.casefold(), r.base_label))
    return {r.method: (*by_label[r.base_method], r.base_method, r.variant) for r in records}


def method_labels(records: Iterable[RunRecord]) -> dict[str, str]:
    """The display label of every method of ``records`` (the first record of a method gives it)."""
    labels: dict[str, str] = {}
    for r in records:
        labels.setdefault(r.method, r.label)
    return labels


def _method_rank(method: str, ranks: dict[str, tuple] | None) -> tuple:
    if ranks is not None and method in ranks:
        return ranks[method]
    return (method.casefold(), method, method, "")


#: Steps of :func:`data_radii`, finest first.
RADIUS_STEPS = (0.05, 0.1, 0.25, 0.5)
#: Data sets whose tables keep the paper's radii (those of its published results).
PAPER_DATASETS = ("cifar10", "imagenet")


def data_radii(records: Iterable[RunRecord], columns: int = 8) -> tuple[float, ...]:
    """The tables' radii when ``--radii`` is not given: the paper's (:data:`PAPER_RADII`) where published runs or
    runs on the paper's data sets (:data:`PAPER_DATASETS`) are in the report, or a certificate reaches the last of
    them; else multiples of the finest step of
    :data:`RADIUS_STEPS` that gives at most ``columns`` radii up to the largest radius certified for a correct
    example (on digits every paper radius past 0.5 would read 0.00)."""
    records = list(records)
    largest = max((float(r.rho[r.correct].max()) for r in records if r.correct.any()), default=0.0)
    if any(r.origin != "ours" or r.dataset in PAPER_DATASETS for r in records) or largest >= PAPER_RADII[-1]:
        return PAPER_RADII
    step = next((s for s in RADIUS_STEPS if largest / s <= columns), RADIUS_STEPS[-1])
    return tuple(round(step * i, 6) for i in range(1, max(1, int(largest / step + 1e-9)) + 1))


def sort_key(
    origin: str, dataset: str, method: str, training: str, denoiser: str, ranks: dict[str, tuple] | None = None
) -> tuple:
    """Paper order: cifar10, imagenet; standard, stability training; no denoiser first; then methods by label
    (``ranks`` from :func:`method_ranks`; without it, by name); ours before published."""
    return (
        _rank("dataset", dataset),
        _rank("training", training),
        _rank("denoiser", denoiser),
        _method_rank(method, ranks),
        _origin_rank(origin),
    )


def pretty(name: str) -> str:
    return _PRETTY.get(name, name)


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def radius_label(r: float) -> str:
    return str(float(r))


# ---------------------------------------------------------------------------------------------
# Selecting records


def _identity(rec: RunRecord) -> tuple:
    return (rec.origin, *rec.group, round(float(rec.sigma), 6), int(rec.seed), rec.procedure, rec.run_tag)


def dedupe_records(records: Iterable[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """Drop repeated runs (same origin, group, sigma, seed, procedure and tag); return the kept ones and notes.

    The same source read twice (a path given twice) is dropped silently; a second, different run
    with the same identity is dropped with a note (best-over-sigma would otherwise pick the better
    of two attempts, which is not what the paper's table reports).
    """
    seen: dict[tuple, RunRecord] = {}
    notes = []
    for rec in records:
        key = _identity(rec)
        if key in seen:
            first = seen[key]
            if Path(first.source).resolve() != Path(rec.source).resolve():
                procedure = f", procedure={rec.procedure}" if rec.procedure else ""
                procedure += f", tag={rec.run_tag}" if rec.run_tag else ""
                notes.append(
                    f"{rec.source}: duplicate of {first.source} (same {'/'.join(rec.group)}, "
                    f"sigma={sigma_label(rec.sigma)}, seed={rec.seed}{procedure}); ignored"
                )
            continue
        seen[key] = rec
    return list(seen.values()), notes


def select_seed(records: Sequence[RunRecord]) -> tuple[int | None, list[RunRecord]]:
    """The smallest seed present and the records with it (the main table uses one seed per group)."""
    if not records:
        return None, []
    seed = min(int(r.seed) for r in records)
    return seed, [r for r in records if int(r.seed) == seed]


# ---------------------------------------------------------------------------------------------
# Best over sigma


@dataclass
class GroupBest:
    """Best-over-sigma results of one (origin, dataset, method, training, denoiser) group and seed."""

    origin: str
    dataset: str
    method: str
    training: str
    denoiser: str
    seed: int
    rows: list[BestRow]  # one per radius
    sigmas: list[float]  # the sigma sweep that was searched
    seeds: list[int]  # every seed present in the group (the table row uses ``seed``)
    label: str = ""  # the method's display label; the method when empty

    def __post_init__(self):
        if not self.label:
            self.label = self.method

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.origin, self.dataset, self.method, self.training, self.denoiser)

    @property
    def radii(self) -> list[float]:
        return [r.radius for r in self.rows]


def _group_records(records: Iterable[RunRecord]) -> dict[tuple, list[RunRecord]]:
    records = list(records)
    ranks = method_ranks(records)
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in records:
        groups.setdefault((rec.origin, *rec.group), []).append(rec)
    return dict(sorted(groups.items(), key=lambda kv: sort_key(*kv[0], ranks=ranks)))


def _best(key: tuple, seed: int, recs: Sequence[RunRecord], radii, seeds) -> GroupBest:
    rows = best_over_sigma([r.summary(radii) for r in recs], radii)
    return GroupBest(
        *key, seed=seed, rows=rows, sigmas=sorted({float(r.sigma) for r in recs}), seeds=seeds, label=recs[0].label
    )


def build_best_tables(records: Iterable[RunRecord], radii: Iterable[float] = PAPER_RADII) -> list[GroupBest]:
    """Best-over-sigma rows for every (origin, dataset, method, training, denoiser) group.

    Each group uses its smallest seed (``GroupBest.seed``); see :func:`seed_table` for all seeds.
    Ties go to the smaller sigma (:func:`ssn_exp.certify.metrics.best_over_sigma`).
    """
    radii = [float(r) for r in radii]
    out = []
    for key, recs in _group_records(records).items():
        seeds = sorted({int(r.seed) for r in recs})
        seed, chosen = select_seed(recs)
        out.append(_best(key, seed, chosen, radii, seeds))
    return out


def seed_table(
    records: Iterable[RunRecord],
    radii: Iterable[float] = PAPER_RADII,
    method: str | None = None,
    training: str = "standard",
    denoiser: str = "none",
) -> list[GroupBest]:
    """The appendix's seed-robustness table: one best-over-sigma row per (origin, dataset, method, seed).

    By default for every method (``method``: only that one), standard training, no denoiser.
    """
    radii = [float(r) for r in radii]
    out = []
    for key, recs in _group_records(records).items():
        if key[3:] != (training, denoiser) or method not in (None, key[2]):
            continue
        seeds = sorted({int(r.seed) for r in recs})
        for seed in seeds:
            out.append(_best(key, seed, [r for r in recs if int(r.seed) == seed], radii, seeds))
    return out


def format_cell(row: BestRow) -> str:
    """The paper's style: ``72.25 (81.50 @ σ=0.75)``."""
    return f"{pct(row.certified_accuracy)} ({pct(row.clean_accuracy)} @ σ={sigma_label(row.sigma)})"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def format_markdown(tables: Sequence[GroupBest]) -> str:
    """Markdown: one row per group, one column per radius, cells ``cert (clean @ σ=s)``."""
    if not tables:
        return "_no runs_"
    radii = tables[0].radii
    header = ["origin", "dataset", "method", "training", "denoiser", "σ sweep"] + [
        f"ρ={radius_label(r)}" for r in radii
    ]
    body = []
    for t in tables:
        sweep = f"{len(t.sigmas)}: {sigma_label(t.sigmas[0])}–{sigma_label(t.sigmas[-1])}"
        body.append([*t.key, sweep] + [format_cell(r) for r in t.rows])
    text = _md_table(header, body)
    multi = [t for t in tables if len(t.seeds) > 1]
    if multi:
        text += "\n\nGroups with several seeds use the smallest one here (all seeds: seed table):\n"
        text += "\n".join(f"- {'/'.join(t.key)}: seed {t.seed} of {', '.join(map(str, t.seeds))}" for t in multi)
    return text


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def _tex_cell(row: BestRow) -> str:
    return (
        f"{pct(row.certified_accuracy)} "
        f"{{\\scriptsize ({pct(row.clean_accuracy)} @ $\\sigma{{=}}{sigma_label(row.sigma)}$)}}"
    )


def _latex(tables: Sequence[GroupBest], label_cols: Sequence[tuple[str, callable]], caption: str, label: str) -> str:
    radii = tables[0].radii if tables else list(PAPER_RADII)
    ncol = len(label_cols) + len(radii)
    lines = [
        "% Generated by python -m ssn_exp.report. Needs \\usepackage{booktabs} (and graphicx for \\resizebox).",
        "\\begin{table*}[t]",
        "\\centering",
        f"\\caption{{{caption}}}",
        f"\\label{{{label}}}",
        "\\resizebox{\\textwidth}{!}{%",
        "\\begin{tabular}{" + "l" * len(label_cols) + "r" * len(radii) + "}",
        "\\toprule",
        " & ".join([name for name, _ in label_cols] + [f"$\\rho={radius_label(r)}$" for r in radii]) + " \\\\",
        "\\midrule",
    ]
    prev_dataset = None
    for t in tables:
        if prev_dataset is not None and t.dataset != prev_dataset:
            lines.append("\\midrule")
        prev_dataset = t.dataset
        cells = [_tex_escape(str(get(t))) for _, get in label_cols] + [_tex_cell(r) for r in t.rows]
        lines.append(" & ".join(cells) + " \\\\")
    if not tables:
        lines.append(f"\\multicolumn{{{ncol}}}{{c}}{{no runs}} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{table*}", ""]
    return "\n".join(lines)


def format_latex(tables: Sequence[GroupBest]) -> str:
    """A booktabs ``table*`` with the best-over-sigma rows, ready to paste into a paper."""
    cols = [
        ("Dataset", lambda t: pretty(t.dataset)),
        ("Method", lambda t: t.label),
        ("Training", lambda t: pretty(t.training)),
        ("Denoiser", lambda t: pretty(t.denoiser)),
    ]
    if len({t.origin for t in tables}) > 1:
        cols.append(("Source", lambda t: "ours" if t.origin == "ours" else f"published ({t.origin})"))
    caption = (
        "Certified accuracy (\\%) under the $\\ell_1$ norm at each radius $\\rho$: the best over the "
        "$\\sigma$ sweep, with that model's clean accuracy and its $\\sigma$ in parentheses."
    )
    return _latex(tables, cols, caption, "tab:best-over-sigma")


def format_seed_markdown(tables: Sequence[GroupBest]) -> str:
    if not tables:
        return "_no runs for this table_"
    radii = tables[0].radii
    header = ["origin", "dataset", "method", "seed"] + [f"ρ={radius_label(r)}" for r in radii]
    body = [[t.origin, t.dataset, t.method, t.seed] + [format_cell(r) for r in t.rows] for t in tables]
    return _md_table(header, body)


def format_seed_latex(tables: Sequence[GroupBest]) -> str:
    cols = [("Dataset", lambda t: pretty(t.dataset))]
    if len({t.origin for t in tables}) > 1:
        cols.append(("Source", lambda t: "ours" if t.origin == "ours" else f"published ({t.origin})"))
    cols += [("Method", lambda t: t.label), ("Seed", lambda t: t.seed)]
    what = f" ({tables[0].training} training, denoiser: {tables[0].denoiser})" if tables else ""
    caption = (
        f"Robustness to the random seed{what}: best certified accuracy (\\%) over $\\sigma$ per seed, "
        "with clean accuracy and $\\sigma$ in parentheses."
    )
    return _latex(tables, cols, caption, "tab:seeds")


def best_csv_rows(tables: Sequence[GroupBest]) -> list[dict[str, str]]:
    rows = []
    for t in tables:
        for r in t.rows:
            rows.append(
                {
                    "dataset": t.dataset,
                    "method": t.method,
                    "training": t.training,
                    "denoiser": t.denoiser,
                    "radius": radius_label(r.radius),
                    "certified_accuracy": pct(r.certified_accuracy),
                    "sigma": sigma_label(r.sigma),
                    "clean_accuracy": pct(r.clean_accuracy),
                    "origin": t.origin,
                }
            )
    return rows


def _write(rows: Sequence[dict], columns: Sequence[str], path) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        replace_file(Path(path), buf.getvalue())
    return buf.getvalue()


def write_csv(tables: Sequence[GroupBest], path=None) -> str:
    """Long-format CSV, one row per (group, radius); columns :data:`BEST_CSV_COLUMNS`. Returns the text."""
    return _write(best_csv_rows(tables), BEST_CSV_COLUMNS, path)


# ---------------------------------------------------------------------------------------------
# ACR per run


def acr_rows(records: Iterable[RunRecord]) -> list[dict[str, str]]:
    """One row per run: identity, n, clean accuracy (%) and ACR, in paper order."""
    return [{**_run_identity(r), "acr": f"{r.acr():.4f}"} for r in _paper_order(records)]


def _paper_order(records: Iterable[RunRecord]) -> list[RunRecord]:
    """Runs in paper order: origin, data set, training, denoiser and method ranks, then sigma and seed."""
    records = list(records)
    ranks = method_ranks(records)
    return sorted(records, key=lambda r: (sort_key(r.origin, *r.group, ranks=ranks), float(r.sigma), int(r.seed)))


def _run_identity(r: RunRecord) -> dict[str, str]:
    """A run's identity, n and clean accuracy (%): the first columns of the ACR and forward-pass tables."""
    return {
        "origin": r.origin,
        "dataset": r.dataset,
        "method": r.method,
        "training": r.training,
        "denoiser": r.denoiser,
        "sigma": sigma_label(r.sigma),
        "seed": str(r.seed),
        "n": str(r.n),
        "clean_accuracy": pct(r.clean_accuracy),
    }


def format_acr_markdown(rows: Sequence[dict]) -> str:
    if not rows:
        return "_no runs_"
    return _md_table(ACR_CSV_COLUMNS, [[row[c] for c in ACR_CSV_COLUMNS] for row in rows])


def write_acr_csv(rows: Sequence[dict], path=None) -> str:
    return _write(rows, ACR_CSV_COLUMNS, path)


# ---------------------------------------------------------------------------------------------
# Forward passes per run

#: The columns of the per-run table of certified accuracy and forward passes, before one column per radius
#: (``ρ=<r>``) and after them (ACR and the forward passes per image: mean, median, 90th percentile).
PASSES_COLUMNS = ACR_CSV_COLUMNS[: ACR_CSV_COLUMNS.index("acr")]  # a run's identity and clean accuracy
_PASSES_TAIL = ("acr", "forward_passes", "forward_passes_median", "forward_passes_p90")


def _passes(value) -> str:
    """A forward-pass count as written in the table: an integer as one, a mean to one decimal; "" when unknown."""
    if value is None:
        return ""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def passes_rows(records: Iterable[RunRecord], radii: Iterable[float] = PAPER_RADII) -> list[dict[str, str]]:
    """One row per run whose metrics.json records forward passes per image: identity, clean and certified
    accuracy (%) at each radius, ACR, and the forward passes per image beside them (mean; median and 90th
    percentile where recorded, else empty), in paper order. Runs without the statistics (published arrays, files
    of earlier versions) have no row."""
    radii = [float(r) for r in radii]
    records = [r for r in records if FORWARD_PASS_KEYS[0] in r.extra]
    rows = []
    for r in _paper_order(records):
        acc = r.certified_accuracy(radii)
        row = _run_identity(r)
        row.update({f"ρ={radius_label(x)}": pct(acc[x]) for x in radii})
        row["acr"] = f"{r.acr():.4f}"
        for column, key in zip(_PASSES_TAIL[1:], FORWARD_PASS_KEYS, strict=True):
            row[column] = _passes(r.extra.get(key))
        rows.append(row)
    return rows


def _passes_columns(rows: Sequence[dict]) -> list[str]:
    return list(rows[0]) if rows else [*PASSES_COLUMNS, *_PASSES_TAIL]


def format_passes_markdown(rows: Sequence[dict]) -> str:
    if not rows:
        return "_no runs with forward-pass counts_"
    columns = _passes_columns(rows)
    header = [c if c not in _PASSES_TAIL[1:] else _PASSES_HEADER[c] for c in columns]
    return _md_table(header, [[row[c] for c in columns] for row in rows])


_PASSES_HEADER = {
    "forward_passes": "forward passes / image",
    "forward_passes_median": "median",
    "forward_passes_p90": "p90",
}


def write_passes_csv(rows: Sequence[dict], path=None) -> str:
    return _write(rows, _passes_columns(rows), path)
