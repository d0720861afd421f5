"""``python -m ssn_exp.report PATH...``: tables, curves and a missing-run list over result files."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ssn_exp.atomic import replace_file
from ssn_exp.report.missing import find_missing
from ssn_exp.report.records import PUBLISHED, load_paths, published_dir, sigma_label, tell_procedures_apart
from ssn_exp.report.tables import (
    acr_rows,
    build_best_tables,
    data_radii,
    dedupe_records,
    format_acr_markdown,
    format_latex,
    format_markdown,
    format_passes_markdown,
    format_seed_latex,
    format_seed_markdown,
    method_ranks,
    passes_rows,
    seed_table,
    write_acr_csv,
    write_csv,
    write_passes_csv,
)

__all__ = ["main", "build_parser"]

#: Vector formats ``--format`` writes beside each PNG.
FIGURE_FORMATS = ("pdf", "svg")

PROG = "python -m ssn_exp.report"

DESCRIPTION = """\
Report over certification results (docs/method.md section 7). Reads result files only; trains nothing.

Each PATH is one of:
  - a run directory (metrics.json + certificates.csv, written by `python -m ssn_exp`);
  - a Hydra multirun or sweep directory (job dirs each with .hydra/ and, once finished,
    metrics.json) or any folder above run directories;
  - a folder of published arrays (index.csv + npz).
--published NAME adds the published results shipped with ssn_exp: levine2021, the authors'
per-image certificates of Levine & Feizi (ICML 2021), 135 runs on CIFAR-10 and ImageNet.
Runs are told apart by origin: "ours" for run directories, the folder name (e.g. levine2021)
for published arrays. All numbers are recomputed from the per-example certificates; exact
certificates (a k column, e.g. DSSN's) are compared exactly as integers k/q. Every further radius
column radius_<name> of a run's certificates gives the rows "<method> (<name>)", e.g.
"uniform (box)": the box-constrained certificate of the same samples. Methods are shown by their
label (metrics.json's "label", index.csv's label column; else the method name) and ordered by it.
Runs of one method certified by different procedures (metrics.json's "procedure", e.g. fixed and
sequential) are kept apart: where a report holds more than one procedure for a method, its rows
and lines are named "<method> [<procedure>]", e.g. "uniform [sequential]". So are runs with different
tags (tag=NAME, read from the run directory's name sigma<s>-seed<k>-NAME): "uniform [tag=NAME]".
"""

EPILOG = """\
Printed to stdout (Markdown) and written into --out:
  best_over_sigma.md/.tex/.csv  for every (origin, dataset, method, training, denoiser) group and
                                each radius: the best certified accuracy over the sigma sweep, the
                                sigma achieving it and that model's clean accuracy, written
                                "72.25 (81.50 @ σ=0.75)" (the paper's appendix Table 3). The .tex is a
                                booktabs table; the CSV has one row per (group, radius) with columns
                                dataset,method,training,denoiser,radius,certified_accuracy,sigma,
                                clean_accuracy,origin (accuracies in percent). A group with several
                                seeds uses its smallest seed here.
  acr.md/.csv                   one row per run: origin, dataset, method, training, denoiser, sigma,
                                seed, n, clean accuracy (%), ACR (average certified radius).
  passes.md/.csv                one row per run whose metrics.json counts its forward passes per image:
                                identity, clean and certified accuracy (%) at each radius, ACR, and
                                beside them the forward passes per image (mean; median and 90th
                                percentile where recorded). Not written when no run has them.
  seeds.md/.tex                 seed robustness: standard training, no denoiser, one
                                best-over-sigma row per (dataset, method, origin, seed).
  curves_<dataset>_<training>_<denoiser>.png
                                certified accuracy (%) against l1 radius, one panel per sigma, one
                                line per method, in its name's colour (the same in every figure
                                and report); published runs dashed, ours solid, further
                                radii (box-constrained certificates) dash-dotted in their method's
                                colour (the paper's Figures 10-14); with several sigmas a last panel
                                "best over σ": per line, the best certified accuracy over sigma at
                                each radius. Every figure also as PDF/SVG beside its PNG with
                                --format pdf svg.
  samples_<dataset>_<training>_<denoiser>_<method>[_<procedure>]_sigma<s>_seed<k>.png
                                for every run whose certificates.csv has a samples column (forward
                                passes spent per image, e.g. procedure=sequential): forward passes per
                                image (log scale) against certified radius, one point per image, with
                                vertical lines at the radii of the run's metrics.json.
  missing.txt                   Hydra job dirs without metrics.json (with their overrides and, for a
                                failed job, its error.txt line), jobs of a sweep without any job dir
                                (from the sweep's job list: sweep_jobs.json, written by
                                python -m ssn_exp.sweep, or Hydra's multirun.yaml), and runs
                                that could not be read or were ignored as duplicates.
  report.md                     everything printed to stdout.

Nothing read is ever imported or instantiated: result files, overrides and sweep records are data.
Names built from them keep letters, digits and . _ = - (a short hash where anything else was replaced),
and every file is written inside --out, which must not be the working directory.

Exit status: 0 when results were read and no job is missing or unreadable; 1 when jobs are missing,
runs unreadable or ignored as duplicates (the report is still written, and says so in its "Missing runs" section and on
stderr) unless --allow-missing is given; 2 on bad arguments or when no PATH holds any result.

Examples:
  python -m ssn_exp.report --published levine2021
  python -m ssn_exp.report outputs/sweeps/smoke --published levine2021 --out outputs/cmp
  python -m ssn_exp.report outputs/run1 --radii 0.25 0.5 1.0 --no-plots --csv table.csv
  python -m ssn_exp.report outputs/sweeps/smoke --format pdf
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (``error: ...``, exit status 2) instead of usage + message."""

    def error(self, message: str):
        print(f"error: {' '.join(message.split())} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="run dir, multirun dir or published-array folder")
    parser.add_argument(
        "--published",
        action="append",
        default=[],
        choices=PUBLISHED,
        metavar="NAME",
        help=f"add published results shipped with ssn_exp ({', '.join(PUBLISHED)})",
    )
    parser.add_argument(
        "--out", default="outputs/report", metavar="DIR", help="output folder (created; default: %(default)s)"
    )
    parser.add_argument("--csv", metavar="FILE", help="also write the best-over-sigma CSV here")
    parser.add_argument(
        "--radii",
        type=float,
        nargs="+",
        default=None,
        metavar="R",
        help="radii of the tables (default: the paper's 0.5 1.0 ... 4.0 for published runs, CIFAR-10 and ImageNet "
        "or where a certificate reaches 4.0; else steps of 0.05, 0.1, 0.25 or 0.5 up to the largest certified radius)",
    )
    parser.add_argument(
        "--format",
        nargs="+",
        default=[],
        choices=FIGURE_FORMATS,
        metavar="FMT",
        help=f"also write every figure in these vector formats beside its PNG ({', '.join(FIGURE_FORMATS)})",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="skip the certified-accuracy curves and samples-vs-radius plots"
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="report a partial sweep with exit status 0 (default: 1 when jobs are missing or runs unreadable)",
    )
    return parser


def format_denoiser_markdown(records, radii) -> str:
    """One row per (origin, dataset, training, denoiser, method, sigma) with a denoiser; '' if none."""
    order = {"stability": 0, "mse": 1, "mse_retrain": 2}
    records = list(records)
    ranks = method_ranks(records)
    recs = sorted(
        (r for r in records if r.denoiser != "none"),
        key=lambda r: (
            r.origin != "ours",
            r.origin,
            r.dataset,
            r.training,
            order.get(r.denoiser, 9),
            r.sigma,
            ranks[r.method],
            r.seed,
        ),
    )
    if not recs:
        return ""
    head = "| origin | dataset | training | denoiser | σ | method | clean | " + " | ".join(f"ρ={r:g}" for r in radii)
    lines = [head + " | ACR |", "|" + "---|" * (8 + len(radii))]
    for r in recs:
        acc = r.certified_accuracy(radii)
        cells = " | ".join(f"{100 * acc[float(x)]:.2f}" for x in radii)
        lines.append(
            f"| {r.origin} | {r.dataset} | {r.training} | {r.denoiser} | {sigma_label(r.sigma)} | {r.method} | "
            f"{100 * r.clean_accuracy:.2f} | {cells} | {r.acr():.3f} |"
        )
    return "\n".join(lines)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _check_out(out: Path) -> str | None:
    """Why ``--out`` cannot be the output folder (a file, a link, a file on its way), or None."""
    if out.is_symlink():
        return f"--out {out} is a symbolic link; give a folder (the report never writes through links)"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder; give a folder for the report"
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            return f"--out {out}: {parent} is a file, not a folder"
    return None


def main(argv=None) -> int:
    try:
        return _main(argv)
    except OSError as exc:  # the output folder or a file in it cannot be written
        where = f" {exc.filename}" if exc.filename else ""
        return _error(f"cannot write{where}: {exc.strerror or exc}")


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.radii is not None and any(not math.isfinite(r) or r < 0 for r in args.radii):
        return _error("--radii must be non-negative finite numbers")
    if not args.paths and not args.published:
        return _error("give a PATH (run, multirun or sweep directory) and/or --published levine2021")
    args.paths = [*args.paths, *(str(published_dir(name)) for name in args.published)]
    out = Path(args.out)
    bad_out = _check_out(out)
    if out.resolve() == Path.cwd().resolve():  # (--out '' too) the report would replace report.md & co. there
        bad_out = f"--out {args.out!r} is the working directory; give a folder for the report (e.g. outputs/report)"
    if args.csv and not bad_out and (Path(args.csv).is_dir() or _check_out(Path(args.csv).parent)):
        bad_out = f"--csv {args.csv} cannot be written: give a file name in a folder"
    if bad_out:
        return _error(bad_out)

    records, problems = load_paths(args.paths)
    missing = find_missing(args.paths)
    if not records:
        extra = f"; {len(missing)} unfinished job dir(s) found" if missing else ""
        detail = f" ({problems[0]})" if problems else ""
        return _error(f"no results found in {' '.join(args.paths)}{detail}{extra}")
    records, dup_notes = dedupe_records(tell_procedures_apart(records))
    if args.radii is None:
        args.radii = list(data_radii(records))
    problems = problems + dup_notes

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        path = out / name
        replace_file(path, text if text.endswith("\n") else text + "\n", inside=out)
        written.append(path)

    best = build_best_tables(records, args.radii)
    best_md = format_markdown(best)
    write("best_over_sigma.md", best_md)
    write("best_over_sigma.tex", format_latex(best))
    write("best_over_sigma.csv", write_csv(best))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        replace_file(Path(args.csv), write_csv(best))
        written.append(Path(args.csv))

    acr = acr_rows(records)
    acr_md = format_acr_markdown(acr)
    write("acr.md", acr_md)
    write("acr.csv", write_acr_csv(acr))

    passes = passes_rows(records, args.radii)
    passes_md = format_passes_markdown(passes) if passes else ""
    if passes:
        write("passes.md", passes_md)
        write("passes.csv", write_passes_csv(passes))

    seeds = seed_table(records, args.radii)
    seeds_md = format_seed_markdown(seeds)
    write("seeds.md", seeds_md)
    write("seeds.tex", format_seed_latex(seeds))

    curves: list[Path] = []
    if not args.no_plots:
        from ssn_exp.report.plots import plot_all_curves, plot_all_denoisers, plot_all_samples

        formats = tuple(dict.fromkeys(args.format))
        curves = plot_all_curves(records, out, formats=formats)
        curves += plot_all_denoisers(records, out, formats=formats)
        curves += plot_all_samples(records, out, formats=formats)
        written.extend(curves)

    den_md = format_denoiser_markdown(records, args.radii)
    if den_md:
        write("denoisers.md", den_md)

    missing_lines = [f"missing ({m.kind}): {m}" for m in missing]
    missing_lines += [f"unreadable or ignored: {p}" for p in problems]
    write("missing.txt", "\n".join(missing_lines) if missing_lines else "none")

    n_ours = sum(r.origin == "ours" for r in records)
    origins = sorted({r.origin for r in records})
    parts = [
        "# ssn_exp report",
        "",
        f"{len(records)} runs read ({n_ours} ours, {len(records) - n_ours} published) from: "
        + ", ".join(f"`{p}`" for p in args.paths)
        + f". Origins: {', '.join(origins)}.",
    ]
    if missing_lines:
        parts += [
            "",
            f"> **WARNING: partial results** — {len(missing)} job(s) missing, {len(problems)} run(s) "
            "unreadable or ignored. See *Missing runs* below.",
        ]
    parts += [
        "",
        "## Best certified accuracy over σ",
        "",
        "Cells: best certified accuracy % (clean accuracy % of that model @ its σ).",
        "",
        best_md,
        "",
        "## Average certified radius (ACR) per run",
        "",
        acr_md,
        "",
    ]
    if passes_md:
        parts += [
            "## Certified accuracy and forward passes per image",
            "",
            "Certified accuracy % per run at each radius, ACR, and the forward passes spent per image "
            "(mean; median and 90th percentile where the run recorded them).",
            "",
            passes_md,
            "",
        ]
    parts += [
        "## Seed robustness (standard training, no denoiser)",
        "",
        seeds_md,
        "",
    ]
    if den_md:
        parts += [
            "## Denoiser variants (appendix D)",
            "",
            "Certified accuracy % per variant, method and σ (clean accuracy % first); ACR last.",
            "",
            den_md,
            "",
        ]
    parts += [
        "## Curves",
        "",
    ]
    parts += [f"- `{p}`" for p in curves] if curves else ["_skipped (--no-plots)_" if args.no_plots else "_none_"]
    parts += ["", "## Missing runs", ""]
    if missing_lines:
        absent = sum(m.absent for m in missing)
        parts.append(
            f"**{len(missing) - absent} job(s) without metrics.json, {absent} job(s) of the sweep without a job "
            f"directory, {len(problems)} unreadable or ignored run(s):**"
        )
        parts.append("")
        parts += [f"- {line}" for line in missing_lines]
    else:
        parts.append("None: every job directory has results.")
    parts += ["", "## Files written", ""]
    report_path = out / "report.md"
    parts += [f"- `{p}`" for p in [*written, report_path]]
    text = "\n".join(parts) + "\n"
    replace_file(report_path, text, inside=out)
    sys.stdout.write(text)
    partial = bool(missing) or bool(problems)  # jobs missing, runs unreadable or ignored as duplicates
    if missing_lines:
        summary = (
            f"partial results: {len(missing)} job(s) missing, {len(problems)} unreadable or ignored "
            f"(see {out / 'missing.txt'})"
        )
        if partial and not args.allow_missing:
            print(f"error: {summary}; pass --allow-missing to report a partial sweep", file=sys.stderr)
            return 1
        print(f"warning: {summary}", file=sys.stderr)
    return 0
