"""The report (docs/method.md section 7): tables, curves and missing runs over published arrays and our run dirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import read_csv_header, run_report_main
from ssn_exp.noises import DSSN, SSN, Uniform
from ssn_exp.report import (
    BEST_CSV_COLUMNS,
    build_best_tables,
    find_missing,
    format_latex,
    format_markdown,
    main,
    seed_table,
    write_csv,
)
from ssn_exp.report.records import load_paths

TABLE3_SEED0 = {
    "accuracy": "72.25 63.07 56.21 51.33 46.76 42.66 38.26 33.64",
    "sigma": "0.75 1.25 2.25 3.0 3.5 3.5 3.5 3.5",
    "clean": "81.50 77.85 71.17 67.98 65.40 65.40 65.40 65.40",
}
Q = 255
LABELS = {cls.name: cls.label for cls in (Uniform, SSN, DSSN)}  # what summarize writes as metrics.json's "label"


def write_run(
    run_dir: Path,
    method: str,
    sigma: float,
    correct_radii: list[float],
    n: int,
    seed: int = 0,
    dataset: str = "cifar10",
    training: str = "standard",
    denoiser: str = "none",
    overrides: list[str] | None = None,
    box_radii: list[float] | None = None,
) -> Path:
    """A run dir by hand: the first len(correct_radii) examples are correct with these radii, the rest wrong.

    For dssn, radii are given as integers k (rho = k/255); else as floats.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    dssn = method == "dssn"
    extra = "k" if dssn else "p_lower" + (",radius_box" if box_radii is not None else "")
    lines = [f"index,label,prediction,correct,radius,seconds,{extra},counts"]
    for i in range(n):
        label = i % 10
        ok = i < len(correct_radii)
        pred = label if ok else (label + 1) % 10
        r = correct_radii[i] if ok else (3 if dssn else 0.1)
        rho = r / Q if dssn else r
        box = "" if box_radii is None else f",{(box_radii[i] if ok else 0.1)!r}"
        lines.append(f"{i},{label},{pred},{int(ok)},{rho!r},0.01,{r if dssn else 0.9}{box},{pred}:5")
    (run_dir / "certificates.csv").write_text("\n".join(lines) + "\n")
    meta = {
        "method": method,
        "label": LABELS[method],
        "sigma": sigma,
        "lambda": sigma * 3**0.5,
        "q": Q if dssn else None,
        "dataset": dataset,
        "training": training,
        "denoiser": denoiser,
        "seed": seed,
        "n_examples": n,
        "clean_accuracy": len(correct_radii) / n,
        "certified_accuracy": {},
        "acr": 0.0,
        "seconds_per_example": 0.01,
        "forward_passes_per_example": 1,
    }
    (run_dir / "metrics.json").write_text(json.dumps(meta))
    return run_dir


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    """A synthetic Hydra multirun: DSSN at two sigmas and two seeds, one uniform run, one unfinished job."""
    root = tmp_path_factory.mktemp("multirun") / "sweep"
    n = 20

    def job(i, method, sigma, seed, radii):
        ov = [f"method={method}", f"sigma={sigma}", f"seed={seed}"]
        write_run(root / str(i), method, sigma, radii, n, seed=seed, overrides=ov)

    # seed 0, sigma 0.5: clean 16/20; 10 correct at rho = 1 exactly (k=255), 6 at k=127 (< 0.5)
    job(0, "dssn", 0.5, 0, [255] * 10 + [127] * 6)
    # seed 0, sigma 1.0: clean 14/20; 12 correct at rho = 2 exactly; 2 at k=254 (just below 1.0)
    job(1, "dssn", 1.0, 0, [510] * 12 + [254] * 2)
    # seed 1: sigma 0.5 wins everywhere up to 1.0 (exactly)
    job(2, "dssn", 0.5, 1, [255] * 18)
    job(3, "dssn", 1.0, 1, [510] * 5 + [0] * 5)
    job(4, "uniform", 0.5, 0, [0.75] * 8 + [0.2] * 4)
    # an unfinished job: .hydra but no metrics.json
    (root / "5" / ".hydra").mkdir(parents=True)
    (root / "5" / ".hydra" / "overrides.yaml").write_text("- method=ssn\n- sigma=2.0\n- seed=0\n")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


@pytest.fixture(scope="module")
def reference_report(tmp_path_factory):
    """The report over all 135 published runs (with plots), run once."""
    out = tmp_path_factory.mktemp("ref_report")
    csv_path = out / "extra" / "table.csv"
    rc, stdout, stderr = run_report_main(["--published", "levine2021", "--out", out, "--csv", csv_path])
    assert rc == 0, stderr
    return out, csv_path, stdout


def _dssn_row(rows, origin="levine2021", dataset="cifar10"):
    sel = [
        r
        for r in rows
        if (r["dataset"], r["method"], r["training"], r["denoiser"], r["origin"])
        == (dataset, "dssn", "standard", "none", origin)
    ]
    return sel


def test_reference_report_reproduces_table3_seed0(reference_report):
    out, csv_path, stdout = reference_report
    for path in (out / "best_over_sigma.csv", csv_path):
        columns, rows = read_csv_header(path)
        assert columns == list(BEST_CSV_COLUMNS)
        assert columns[:8] == "dataset,method,training,denoiser,radius,certified_accuracy,sigma,clean_accuracy".split(
            ","
        )
        sel = _dssn_row(rows)
        assert [r["radius"] for r in sel] == ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]
        assert " ".join(r["certified_accuracy"] for r in sel) == TABLE3_SEED0["accuracy"]
        assert " ".join(r["sigma"] for r in sel) == TABLE3_SEED0["sigma"]
        assert " ".join(r["clean_accuracy"] for r in sel) == TABLE3_SEED0["clean"]
        groups = {(r["dataset"], r["method"], r["training"], r["denoiser"]) for r in rows}
        assert ("imagenet", "dssn", "standard", "none") in groups
        assert ("cifar10", "ssn", "stability", "none") in groups
        assert len(groups) == 21

    cells = [
        f"{a} ({c} @ σ={s})"
        for a, s, c in zip(*(TABLE3_SEED0[k].split() for k in ("accuracy", "sigma", "clean")), strict=True)
    ]
    row = "| levine2021 | cifar10 | dssn | standard | none | 15: 0.15–3.5 | " + " | ".join(cells) + " |"
    md = (out / "best_over_sigma.md").read_text()
    assert row in md.splitlines()
    assert row in stdout.splitlines()
    assert "| levine2021 | imagenet | dssn | stability | none |" in md
    tex = (out / "best_over_sigma.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "MSE (retrained)" in tex
    assert "72.25 {\\scriptsize (81.50 @ $\\sigma{=}0.75$)}" in tex
    assert "& DSSN &" in tex and "& SSN &" in tex and "& Uniform &" in tex  # index.csv's labels
    # seed table: one seed-0 row per dataset and method, the same numbers
    seeds_md = (out / "seeds.md").read_text()
    assert "| levine2021 | cifar10 | dssn | 0 | " + " | ".join(cells) + " |" in seeds_md.splitlines()
    assert "| levine2021 | imagenet | dssn | 0 |" in seeds_md
    # methods in the order of their labels: DSSN, SSN, Uniform
    seed_methods = [line.split(" | ")[2] for line in seeds_md.splitlines() if "| cifar10 |" in line]
    assert seed_methods == ["dssn", "ssn", "uniform"]


def test_reference_report_writes_acr_curves_and_no_missing(reference_report):
    out, _, stdout = reference_report
    columns, rows = read_csv_header(out / "acr.csv")
    assert columns == "origin,dataset,method,training,denoiser,sigma,seed,n,clean_accuracy,acr".split(",")
    assert len(rows) == 135
    assert {r["n"] for r in rows} == {"10000", "500"}
    dssn = [r for r in rows if (r["dataset"], r["method"], r["training"], r["denoiser"], r["sigma"]) == (
        "cifar10", "dssn", "standard", "none", "0.75")]  # fmt: skip
    assert len(dssn) == 1 and dssn[0]["clean_accuracy"] == "81.50" and 0 < float(dssn[0]["acr"]) < 2
    pngs = sorted(p.name for p in out.glob("curves_*.png"))
    assert "curves_cifar10_standard_none.png" in pngs and "curves_imagenet_stability_none.png" in pngs
    assert len(pngs) == 7 and all((out / p).stat().st_size > 1000 for p in pngs)
    assert (out / "missing.txt").read_text().strip() == "none"
    assert "## Missing runs" in stdout and "None: every job directory has results." in stdout


def test_multirun_report(multirun, tmp_path):
    out = tmp_path / "report"
    rc, stdout, stderr = run_report_main([multirun, "--out", out])
    assert rc == 1  # a partial sweep: the report is written, the exit status says it is partial
    assert stderr.strip().splitlines()[-1].startswith("error: partial results") and "--allow-missing" in stderr
    # the unfinished job is listed, with its overrides, on stdout and in missing.txt
    missing = (out / "missing.txt").read_text()
    assert str(multirun / "5") in missing and "method=ssn sigma=2.0 seed=0" in missing
    assert str(multirun / "4") not in missing
    assert "WARNING: partial results" in stdout and "1 job(s) without metrics.json" in stdout
    assert "partial results" in stderr
    # tables
    columns, rows = read_csv_header(out / "best_over_sigma.csv")
    assert columns == list(BEST_CSV_COLUMNS)
    assert {r["origin"] for r in rows} == {"ours"}
    sel = _dssn_row(rows, origin="ours")
    got = [(r["radius"], r["certified_accuracy"], r["sigma"], r["clean_accuracy"]) for r in sel]
    # seed 0 only (smallest seed); rho = k/q compared exactly: k=255 counts at 1.0, k=254 does not
    assert got[:4] == [
        ("0.5", "70.00", "1.0", "70.00"),
        ("1.0", "60.00", "1.0", "70.00"),
        ("1.5", "60.00", "1.0", "70.00"),
        ("2.0", "60.00", "1.0", "70.00"),
    ]
    assert got[4] == ("2.5", "0.00", "0.5", "80.00")  # all zero: tie goes to the smaller sigma
    uni = [r for r in rows if r["method"] == "uniform"]
    assert [r["certified_accuracy"] for r in uni[:2]] == ["40.00", "0.00"]
    for name in ("best_over_sigma.md", "best_over_sigma.tex", "acr.md", "acr.csv", "seeds.md", "seeds.tex"):
        assert (out / name).stat().st_size > 0, name
    _, acr = read_csv_header(out / "acr.csv")
    assert len(acr) == 5
    a = next(r for r in acr if r["method"] == "dssn" and r["sigma"] == "1.0" and r["seed"] == "0")
    assert a["n"] == "20" and a["clean_accuracy"] == "70.00"
    assert float(a["acr"]) == pytest.approx((12 * 2.0 + 2 * 254 / 255) / 20, abs=1e-4)
    # curves: one figure for (cifar10, standard, none), non-empty PNG
    png = out / "curves_cifar10_standard_none.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # seed table: one row per method and seed
    seed_rows = [line for line in (out / "seeds.md").read_text().splitlines() if line.startswith("| ours |")]
    assert len(seed_rows) == 3
    assert seed_rows[0].startswith("| ours | cifar10 | dssn | 0 | 70.00 (70.00 @ σ=1.0) | 60.00 (70.00 @ σ=1.0) |")
    assert seed_rows[1].startswith(
        "| ours | cifar10 | dssn | 1 | 90.00 (90.00 @ σ=0.5) | 90.00 (90.00 @ σ=0.5) | 25.00"
    )
    assert seed_rows[2].startswith("| ours | cifar10 | uniform | 0 | 40.00 (60.00 @ σ=0.5) |")
    assert "seed 0 of 0, 1" in (out / "best_over_sigma.md").read_text()


def test_reference_and_our_runs_together(reference_dir, multirun, tmp_path):
    out = tmp_path / "both"
    rc, stdout, _ = run_report_main([reference_dir, multirun / "0", multirun / "4", "--out", out, "--no-plots"])
    assert rc == 0
    _, rows = read_csv_header(out / "best_over_sigma.csv")
    assert {r["origin"] for r in rows} == {"ours", "levine2021"}
    assert len(_dssn_row(rows, origin="ours")) == 8
    assert " ".join(r["certified_accuracy"] for r in _dssn_row(rows)) == TABLE3_SEED0["accuracy"]
    assert "| ours | cifar10 | dssn | standard | none |" in stdout
    assert "| levine2021 | cifar10 | dssn | standard | none |" in stdout
    seeds = (out / "seeds.md").read_text()
    assert "| ours | cifar10 | dssn | 0 |" in seeds and "| levine2021 | cifar10 | dssn | 0 |" in seeds
    assert "Source" in (out / "best_over_sigma.tex").read_text()
    assert not list(out.glob("*.png"))
    # run dirs given directly: no missing jobs
    assert (out / "missing.txt").read_text().strip() == "none"


def test_box_certificates_get_their_own_rows_and_curves(tmp_path):
    """A uniform run with radius_box: the report adds "uniform (box)" beside "uniform", from the same examples."""
    run = write_run(tmp_path / "u", "uniform", 1.0, [1.2] * 6 + [0.6] * 4, 20, box_radii=[1.7] * 6 + [0.6] * 4)
    out = tmp_path / "rep"
    rc, stdout, _ = run_report_main([run, "--out", out, "--radii", "0.5", "1.0", "1.5"])
    assert rc == 0
    _, rows = read_csv_header(out / "best_over_sigma.csv")
    acc = {(r["method"], r["radius"]): r["certified_accuracy"] for r in rows}
    assert acc == {
        ("uniform", "0.5"): "50.00",
        ("uniform", "1.0"): "30.00",
        ("uniform", "1.5"): "0.00",
        ("uniform (box)", "0.5"): "50.00",
        ("uniform (box)", "1.0"): "30.00",
        ("uniform (box)", "1.5"): "30.00",
    }
    assert [r["method"] for r in rows][:3] == ["uniform"] * 3  # the box row right after its method
    assert "| ours | cifar10 | uniform (box) | standard | none |" in stdout
    assert "Uniform (box)" in (out / "best_over_sigma.tex").read_text()
    _, acr = read_csv_header(out / "acr.csv")
    assert {r["method"]: r["acr"] for r in acr} == {"uniform": "0.4800", "uniform (box)": "0.6300"}
    assert (out / "curves_cifar10_standard_none.png").stat().st_size > 1000


def test_nothing_to_report_on_is_a_one_line_error(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--published levine2021" in err[0]


def test_no_results_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "does_not_exist"):
        rc = main([str(path), "--out", str(tmp_path / "out")])
        captured = capsys.readouterr()
        assert rc == 2
        assert captured.out == ""
        assert len(captured.err.strip().splitlines()) == 1 and "no results" in captured.err
    assert not (tmp_path / "out").exists()


def test_unreadable_run_is_reported(multirun, tmp_path):
    root = tmp_path / "sweep"
    write_run(root / "0", "dssn", 0.5, [255] * 3, 4, overrides=["method=dssn", "sigma=0.5"])
    write_run(root / "1", "dssn", 1.0, [255] * 3, 4, overrides=["method=dssn", "sigma=1.0"])
    (root / "1" / "metrics.json").write_text("{not json")
    rc, stdout, stderr = run_report_main([root, "--out", tmp_path / "out", "--no-plots", "--allow-missing"])
    assert rc == 0
    missing = (tmp_path / "out" / "missing.txt").read_text()
    assert f"unreadable or ignored: {root / '1'}: unreadable" in missing
    assert "1 unreadable or ignored run(s)" in stdout and "partial results" in stderr


def test_help_and_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "ssn_exp.report", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    for word in ("--out", "--csv", "--radii", "--no-plots", "multirun", "index.csv", "missing.txt", "seeds.md"):
        assert word in proc.stdout, word


def test_library_functions(multirun):
    records, problems = load_paths([multirun])
    assert len(records) == 5 and problems == []
    tables = build_best_tables(records, radii=[0.5, 1.0])
    assert [t.key for t in tables] == [  # methods by label: DSSN before Uniform
        ("ours", "cifar10", "dssn", "standard", "none"),
        ("ours", "cifar10", "uniform", "standard", "none"),
    ]
    assert tables[0].seeds == [0, 1] and tables[0].seed == 0
    assert "ρ=0.5" in format_markdown(tables) and "\\begin{tabular}" in format_latex(tables)
    text = write_csv(tables)
    assert text.splitlines()[0] == ",".join(BEST_CSV_COLUMNS) and len(text.splitlines()) == 1 + 2 * 2
    assert [t.seed for t in seed_table(records, radii=[0.5], method="dssn")] == [0, 1]
    assert [(t.method, t.seed) for t in seed_table(records, radii=[0.5])] == [("dssn", 0), ("dssn", 1), ("uniform", 0)]
    assert [m.overrides for m in find_missing([multirun])] == [("method=ssn", "sigma=2.0", "seed=0")]
    # exactness of DSSN radii: k=255 is certified at rho = 1.0
    rec = next(r for r in records if r.method == "dssn" and r.sigma == 0.5 and r.seed == 1)
    assert rec.certified_accuracy([1.0]) == {1.0: 0.9}
    assert np.issubdtype(rec.radius.dtype, np.integer)
