"""The report, wandb's summary and the bench know no noise by name (issue 17): a noise defined outside the package
(here "wobble", shown as "Wobble", with a further radius column ``radius_tight``) appears in the report's tables and
curves and in wandb's summary from its result files alone, ordered by its label and coloured by its name."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ssn_exp
from helpers import read_csv, run_report_main
from ssn_exp import noises as noises_module
from ssn_exp.certify.metrics import PAPER_RADII
from ssn_exp.certify.procedures import FixedSample
from ssn_exp.certify.record import CertificateRecord
from ssn_exp.lightning.loggers import certification_curves, certification_summary
from ssn_exp.lightning.results import summarize, write_rows_atomic
from ssn_exp.noises import SampledNoise, Uniform
from ssn_exp.report import build_best_tables
from ssn_exp.report.plots import curve, curves_figure, method_color, method_colors
from ssn_exp.report.records import RunFileError, RunRecord, load_paths, load_reference, load_run_dir

SRC = Path(ssn_exp.__file__).parent


class Wobble(SampledNoise):
    """A user's noise: rho = 2 sigma (p_lower - 1/2), and a further radius ``radius_tight``."""

    name = "wobble"
    label = "Wobble"
    extra_columns = ("radius_tight",)

    def scale(self, sigma):
        return sigma

    def radius(self, p_lower):
        return 2.0 * self.lam * (np.asarray(p_lower, dtype=np.float64) - 0.5)


class Alpha(SampledNoise):
    """A noise whose name sorts first and whose label sorts last: the report orders by label, colours by name."""

    name = "alpha"
    label = "Zeta"

    def scale(self, sigma):
        return sigma

    def radius(self, p_lower):
        return 2.0 * self.lam * (np.asarray(p_lower, dtype=np.float64) - 0.5)


# four examples: three correct; radius and radius_tight per example
CORRECT = [1, 1, 1, 0]
RADIUS = [0.6, 0.3, -0.1, 0.2]
TIGHT = [1.1, 0.8, 0.4, 0.7]


def write_run(run_dir: Path, noise, radius=RADIUS, tight=TIGHT, seed: int = 0) -> dict:
    """certificates.csv in the record's columns, then metrics.json by summarize (as a certification writes them)."""
    run_dir.mkdir(parents=True)
    record = CertificateRecord(noise, FixedSample(n0=1, n=10))
    rows = []
    for i, ok in enumerate(CORRECT):
        label = i % 3
        pred = label if ok else label + 1
        row = {"index": i, "label": label, "prediction": pred, "correct": ok, "radius": repr(radius[i])}
        row.update({"seconds": 0.01, "p_lower": 0.9, "counts": f"{pred}:10"})
        if "radius_tight" in record.columns:
            row["radius_tight"] = repr(tight[i])
        rows.append(row)
    write_rows_atomic(run_dir / "certificates.csv", record.columns, rows)
    meta = {"dataset": "cifar10", "training": "standard", "denoiser": "none", "seed": seed}
    return summarize(run_dir, record, meta, radii=[0.5, 1.0], plot=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generic") / "runs"
    write_run(root / "wobble_0.25", Wobble(0.25))
    write_run(root / "wobble_0.5", Wobble(0.5), radius=[0.7, 0.3, -0.1, 0.2], tight=[1.2, 1.0, 0.4, 0.7])
    write_run(root / "alpha_0.5", Alpha(0.5), radius=[1.5, 1.5, 0.1, 0.1])
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("generic_report")
    rc, stdout, stderr = run_report_main([runs, "--out", out, "--radii", "0.5", "1.0"])
    assert rc == 0, stderr
    return out, stdout


def test_summarize_writes_the_noises_label_and_every_further_radius(runs):
    m = json.loads((runs / "wobble_0.25" / "metrics.json").read_text())
    assert (m["method"], m["label"]) == ("wobble", "Wobble")
    assert m["certified_accuracy_tight"] == {"0.5": 0.5, "1": 0.25} and m["acr_tight"] == pytest.approx(0.575)
    assert m["certified_accuracy"] == {"0.5": 0.25, "1": 0.0} and m["acr"] == pytest.approx(0.225)


def test_a_new_noise_is_read_with_its_label_and_a_record_per_further_radius(runs):
    rec, tight = load_run_dir(runs / "wobble_0.25")
    assert (rec.method, rec.label, rec.variant) == ("wobble", "Wobble", "")
    assert (tight.method, tight.label, tight.variant) == ("wobble (tight)", "Wobble (tight)", "tight")
    assert (tight.base_method, tight.base_label) == ("wobble", "Wobble")
    np.testing.assert_array_equal(tight.radius, TIGHT)
    assert tight.q is None and tight.acr() == pytest.approx(0.575) and rec.acr() == pytest.approx(0.225)


def test_the_report_lists_a_new_noise_by_its_label_in_every_table(report):
    out, stdout = report
    rows = read_csv(out / "best_over_sigma.csv")
    # by label: Wobble, its further radius right after it, then Zeta (whose name, alpha, sorts first)
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["wobble", "wobble (tight)", "alpha"]
    acc = {(r["method"], r["radius"]): (r["certified_accuracy"], r["sigma"]) for r in rows}
    assert acc[("wobble", "0.5")] == ("25.00", "0.25")  # a tie at 0.5 goes to the smaller sigma
    assert acc[("wobble (tight)", "0.5")] == ("50.00", "0.25")
    assert acc[("wobble (tight)", "1.0")] == ("50.00", "0.5")  # 1.2 and 1.0 >= 1.0 at sigma 0.5
    assert acc[("alpha", "1.0")] == ("50.00", "0.5")
    assert "| ours | cifar10 | wobble (tight) | standard | none |" in stdout
    tex = (out / "best_over_sigma.tex").read_text()
    assert "& Wobble &" in tex and "& Wobble (tight) &" in tex and "& Zeta &" in tex
    assert "wobble" not in tex and "alpha" not in tex  # the labels, not the names
    acr = read_csv(out / "acr.csv")
    assert [(r["method"], r["sigma"]) for r in acr] == [
        ("wobble", "0.25"),
        ("wobble", "0.5"),
        ("wobble (tight)", "0.25"),
        ("wobble (tight)", "0.5"),
        ("alpha", "0.5"),
    ]
    assert acr[2]["acr"] == "0.5750"
    seeds = [line for line in (out / "seeds.md").read_text().splitlines() if line.startswith("| ours |")]
    assert [line.split(" | ")[2] for line in seeds] == ["wobble", "wobble (tight)", "alpha"]
    assert "& Zeta & 0 &" in (out / "seeds.tex").read_text()
    png = out / "curves_cifar10_standard_none.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_the_curves_draw_a_new_noise_by_its_label_in_its_names_colour(runs):
    records, problems = load_paths([runs])
    assert problems == []
    colors = method_colors(records)
    # by a hash of the name; the further radius shares its method's colour
    alpha, wobble = method_color("alpha"), method_color("wobble")
    assert colors == {"alpha": alpha, "wobble": wobble, "wobble (tight)": wobble} and alpha != wobble
    fig = curves_figure(records)
    lines = {}
    for ax in fig.axes:
        if ax.get_title() == "σ = 0.5":
            lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["Wobble (ours)", "Wobble (tight) (ours)", "Zeta (ours)"]  # in the order of the labels
    assert [lines[k].get_color() for k in lines] == [wobble, wobble, alpha]
    assert [lines[k].get_linestyle() for k in lines] == ["-", "-.", "-"]
    tight = lines["Wobble (tight) (ours)"]
    x, y = tight.get_xdata(), tight.get_ydata()  # the tight radii 1.2, 1.0, 0.4 of the three correct examples
    assert y[0] == 75.0 and set(y[(x > 0.4) & (x <= 1.0)]) == {50.0} and set(y[(x > 1.0) & (x <= 1.2)]) == {25.0}
    assert set(y[x > 1.2]) == {0.0} and lines["Wobble (ours)"].get_ydata()[0] == 50.0  # its own radii: 0.7, 0.3
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(lines)


def test_a_method_keeps_its_colour_in_every_figure_of_a_report(runs, tmp_path):
    """A method's colour is its name's: wobble has the same colour in a figure with alpha and in one without, and
    in a report of other methods; the shipped methods and their procedure variants have distinct colours."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    from ssn_exp.report.plots import plot_all_curves

    records, _ = load_paths([runs])
    records = [r if r.method == "alpha" else dataclasses.replace(r, dataset="digits") for r in records]
    paths = plot_all_curves(records, tmp_path, points=41)
    assert [p.name for p in paths] == ["curves_cifar10_standard_none.png", "curves_digits_standard_none.png"]

    def has(path, color):
        pixels = imread(path)[..., :3].reshape(-1, 3)
        return bool(np.any(np.all(np.abs(pixels - np.array(to_rgb(color))) < 2 / 255, axis=1)))

    digits = tmp_path / "curves_digits_standard_none.png"
    assert has(digits, method_color("wobble")) and not has(digits, method_color("alpha"))
    assert has(tmp_path / "curves_cifar10_standard_none.png", method_color("alpha"))
    others = [dataclasses.replace(r, method="zzz", label="zzz") if r.method == "alpha" else r for r in records]
    assert method_colors(others)["wobble"] == method_colors(records)["wobble"]
    sampled = [f"{m}{p}" for m in ("uniform", "ssn", "laplace") for p in ("", " [sequential]", " [fixed]")]
    assert len({method_color(m) for m in ["dssn", *sampled]}) == 10  # every shipped method and variant its own


def test_a_label_is_drawn_as_written_not_as_mathtext(runs, tmp_path):
    records, _ = load_paths([runs / "alpha_0.5"])
    records = [dataclasses.replace(records[0], label=r"Zeta $\frac$", dataset="dig$its")]
    fig = curves_figure(records, title="dig$its")
    fig.canvas.draw()  # bad TeX between two $ would raise here
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [r"Zeta \$\frac\$ (ours)"]


def _legend_records(methods: int, sigmas, denoiser="none"):
    one = np.array([0, 1])
    records = []
    for m in range(methods):
        for s in sigmas:
            rec = RunRecord(
                "digits",
                f"method{m}",
                "standard",
                denoiser,
                s,
                one,
                one,
                np.array([0.5, -0.1]),
                label=f"Noise number {m} with a long name",
                samples=np.array([100, 2000]) if m == 0 and s == sigmas[0] else None,
                metric_radii=(0.25,),
            )
            box = dataclasses.replace(rec, method=f"method{m} (box)", label=f"{rec.label} (box)", variant="box")
            records += [
                rec,
                box,
                dataclasses.replace(rec, origin="published"),
                dataclasses.replace(box, origin="published"),
            ]
    return records


@pytest.mark.parametrize("methods, sigmas", [(1, [0.5]), (6, [0.25, 0.5, 1.0])])
def test_every_legend_of_every_figure_the_report_draws_fits_in_the_figure(monkeypatch, tmp_path, methods, sigmas):
    """The single-sigma figure cut "Uniform (box) (our..." off; six lines under three panels ran past the right edge.
    Every figure the report saves (curves, denoiser variants, samples) is checked, every legend in it."""
    from ssn_exp.report import plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, *a, **kw: (figures.append(fig), save(fig, *a, **kw))[1])
    records = _legend_records(methods, sigmas) + _legend_records(methods, sigmas, denoiser="stability")
    plots.plot_all_curves(records, tmp_path, points=21)
    plots.plot_all_denoisers(records, tmp_path)
    plots.plot_all_samples(records, tmp_path)
    assert len(figures) >= 3 and all(fig.legends or any(ax.get_legend() for ax in fig.axes) for fig in figures)
    for fig in figures:
        fig.canvas.draw()
        edge = fig.bbox
        for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]:
            box = legend.get_window_extent()
            assert edge.x0 <= box.x0 and box.x1 <= edge.x1 and edge.y0 <= box.y0 and box.y1 <= edge.y1, (box, edge)


def test_a_methods_further_radii_follow_it_whatever_the_other_labels():
    """Sorting by the full label would put "Wobble & Co" ('&' < '(') between "Wobble" and "Wobble (tight)"."""

    def rec(method, label, variant=""):
        one = np.array([0])
        return RunRecord(
            "cifar10", method, "standard", "none", 0.5, one, one, np.array([0.5]), label=label, variant=variant
        )

    records = [rec("amp", "Wobble & Co"), rec("wobble (tight)", "Wobble (tight)", "tight"), rec("wobble", "wobble")]
    tables = build_best_tables(records, radii=[0.5])
    assert [t.method for t in tables] == ["wobble", "wobble (tight)", "amp"]
    assert [t.label for t in tables] == ["wobble", "Wobble (tight)", "Wobble & Co"]


def test_wandb_summary_and_curves_cover_every_further_radius_with_the_label(runs):
    metrics = json.loads((runs / "wobble_0.5" / "metrics.json").read_text())
    summary = certification_summary(metrics)
    assert summary["certified_accuracy_tight/1"] == 0.5 and summary["certified_accuracy/0.5"] == 0.25
    assert summary["acr_tight"] == pytest.approx((1.2 + 1.0 + 0.4) / 4)
    assert summary["label"] == "Wobble" and not any(isinstance(v, dict) for v in summary.values())
    curves = certification_curves(metrics)
    assert list(curves) == ["certified_accuracy_curve", "certified_accuracy_tight_curve"]
    assert curves["certified_accuracy_tight_curve"] == (
        "Wobble σ=0.5: certified accuracy (tight)",
        [[0.5, 0.5], [1.0, 0.5]],
    )
    assert curves["certified_accuracy_curve"][0] == "Wobble σ=0.5: certified accuracy"
    del metrics["label"]  # a metrics.json of an earlier version: the method names it
    assert certification_curves(metrics)["certified_accuracy_curve"][0] == "wobble σ=0.5: certified accuracy"


def test_a_noise_without_a_label_is_shown_by_its_name():
    class Plain(SampledNoise):
        name = "plain"

    class MyUniform(Uniform):
        name = "my_uniform"

    assert (Plain.label, MyUniform.label, Uniform.label, Wobble.label) == ("plain", "my_uniform", "Uniform", "Wobble")


def test_a_bad_label_in_metrics_json_is_a_named_error_and_a_missing_one_falls_back(tmp_path):
    run = tmp_path / "run"
    write_run(run, Wobble(0.5))
    meta = json.loads((run / "metrics.json").read_text())
    for bad in ("", 3, ["Wobble"]):
        (run / "metrics.json").write_text(json.dumps({**meta, "label": bad}))
        with pytest.raises(RunFileError, match="'label' must be a non-empty string"):
            load_run_dir(run)
    del meta["label"]
    (run / "metrics.json").write_text(json.dumps(meta))
    assert [r.label for r in load_run_dir(run)] == ["wobble", "wobble (tight)"]


def test_a_further_radius_column_without_a_name_is_a_named_error(tmp_path):
    run = tmp_path / "run"
    write_run(run, Wobble(0.5))
    text = (run / "certificates.csv").read_text()
    (run / "certificates.csv").write_text(text.replace("radius_tight", "radius_", 1))
    with pytest.raises(RunFileError, match="'radius_' names no radius"):
        load_run_dir(run)


def test_published_arrays_are_labelled_by_their_index(tmp_path):
    def folder(name, header, row):
        d = tmp_path / name
        d.mkdir()
        np.savez(d / "a.npz", labels=np.array([0, 1]), predicted=np.array([0, 0]), radius_l1=np.array([0.5, 0.1]))
        (d / "index.csv").write_text(f"{header}\n{row}\n")
        return d

    common = "a.npz,cifar10,wobble,standard,none,0.5,2,,0.1,src"
    head = "file,dataset,method,training,denoiser,sigma,n,levels,time_per_image_s,source"
    (rec,) = load_reference(folder("with", head + ",label", common + ",Wobble"))
    assert (rec.method, rec.label) == ("wobble", "Wobble")
    (rec,) = load_reference(folder("without", head, common))
    assert (rec.method, rec.label) == ("wobble", "wobble")
    label_of = {cls.name: cls.label for cls in _shipped_noises()}
    shipped = load_reference(SRC / "published" / "levine2021")
    assert {r.label for r in shipped} == {"Uniform", "SSN", "DSSN"}
    assert all(r.label == label_of[r.method] for r in shipped)  # the index's labels are the noises' own


# -- no code of the report, wandb's logging or the bench names a noise ---------------------------------------------
SCANNED = [*sorted((SRC / "report").glob("*.py")), SRC / "bench.py", SRC / "lightning" / "loggers.py"]


def _shipped_noises() -> list[type]:
    return [
        cls
        for cls in vars(noises_module).values()
        if isinstance(cls, type) and issubclass(cls, noises_module.Noise) and "name" in cls.__dict__
    ]


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_noise_is_named_in_the_code(path):
    names = {cls.name for cls in _shipped_noises()}
    assert {"uniform", "ssn", "dssn"} <= names
    text = path.read_text(encoding="utf-8")
    for name in names:  # as the grep: no quoted noise name anywhere, comments and docstrings included
        assert f'"{name}"' not in text and f"'{name}'" not in text, (path.name, name)
    tree = ast.parse(text)
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            assert node.value.strip().casefold() not in names, (path.name, node.lineno, node.value)
    # the report and wandb's logging read result files: they do not import the noises at all
    if path.name != "bench.py":
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.startswith(("ssn_exp.noises", "ssn_exp.smoothing"))}, path.name
    # nothing asks which noise or procedure it holds
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            klass = ast.unparse(node.args[1])
            assert not any(cls.__name__ in klass for cls in _shipped_noises()), (path.name, node.lineno, klass)
            assert "Noise" not in klass and "Exact" not in klass and "FixedSample" not in klass, (path.name, klass)


def test_the_scan_sees_a_name_compare():
    """The scan above can fail: a compare with a noise name is found, a docstring mentioning it is not."""
    tree = ast.parse('"""dssn"""\nif method == "dssn":\n    pass\n')
    docs = _docstrings(tree)
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docs]
    assert found == ["dssn"]
    assert len(SCANNED) >= 9 and all(p.is_file() for p in SCANNED)


def test_the_bench_table_prints_every_case_and_noise_it_is_given():
    """The bench's table iterates the cases and noises of its results: a third certificate and a fourth training
    noise get their rows and columns with no change to bench.py (the numbers are made up, the layout is not)."""
    from ssn_exp import bench

    def case(row, passes):
        pps = {"cert": 100.0, "forward": 50.0, "baseline": 25.0}
        return {"forward_passes": passes, "batch_sizes": [9, 27], "passes_per_second": pps, "row": row}

    cert = {"dssn": case("dssn L=27", 54), "randomized": case("uniform", 64), "wobble": case("wobble", 7)}
    cert["noise_batch"] = 27
    names = ("uniform", "ssn", "dssn", "wobble")
    training = {
        "step_seconds": {"none": 0.002},
        "overhead": dict(zip(names, (0.01, 0.02, 0.03, 0.04), strict=True)),
        "overhead_direct": dict(zip(names, (0.1, -0.2, 0.3, 0.4), strict=True)),
    }
    result = {"device": "cpu", "device_type": "cpu", "torch": "x", "threads": 2, "options": {"repeats": 1}}
    result["raw"] = {"tiny": {"certification": cert, "training": training}}
    lines = bench.format_table(result).splitlines()
    rows = [line.split() for line in lines if line.startswith("tiny ")]
    assert [r[1:3] for r in rows[:3]] == [["dssn", "L=27"], ["uniform", "64"], ["wobble", "7"]]
    assert rows[2][-2:] == ["2.000", "4.00"]  # cert/fwd, cert/base
    head = next(line for line in lines if "step (no noise)" in line).split()
    assert head[4:8] == ["uniform", "ssn", "dssn", "wobble"] and "u / s / d / w)" in " ".join(head)
    assert rows[3] == "tiny 2.00 ms 1.00% 2.00% 3.00% 4.00% (+10.0% / -20.0% / +30.0% / +40.0%)".split()
    # the cases benchmarked on a model: built once, each a noise, a procedure and a baseline
    cases = bench.cert_cases(bench.CASES["digits_cnn"], dict(bench.CASES["digits_cnn"].quick_sizes))
    assert [c.key for c in cases] == ["dssn", "randomized"] and [c.row for c in cases] == ["dssn L=27", "uniform"]
    assert [c.procedure.name for c in cases] == ["exact", "fixed"]
    assert [c.procedure.forward_passes(c.noise) for c in cases] == [sum(c.rounds) for c in cases]


def test_runs_that_differ_by_tag_are_kept_apart_and_a_true_duplicate_fails_the_report(tmp_path):
    """Two runs of one method, sigma and seed, one with tag=n100k: both in every table and curve, named by the tag;
    a copy of a run (same identity and tag) is ignored, and the report says so with exit status 1."""
    root = tmp_path / "runs"
    write_run(root / "plain" / "sigma0.5-seed0", Wobble(0.5))
    write_run(root / "tagged" / "sigma0.5-seed0-n100k", Wobble(0.5), radius=[1.5, 1.5, 0.1, 0.1])
    write_run(root / "cert" / "runs-wobble-sigma0.5-seed0-last-0123abcd-n100k", Wobble(0.25))

    def run(*paths, allow=False):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        rc, _, stderr = run_report_main([*paths, "--out", out, "--radii", "0.5", "1.0", *(["--allow-missing"] * allow)])
        return rc, out, stderr

    rc, out, err = run(root)
    assert rc == 0, err
    acr = {(r["method"], r["sigma"]) for r in read_csv(out / "acr.csv")}
    assert acr == {
        ("wobble", "0.5"),
        ("wobble (tight)", "0.5"),
        ("wobble [tag=n100k]", "0.5"),
        ("wobble [tag=n100k] (tight)", "0.5"),
        ("wobble [tag=n100k]", "0.25"),
        ("wobble [tag=n100k] (tight)", "0.25"),
    }
    assert (out / "missing.txt").read_text() == "none\n"
    shutil.copytree(root / "tagged", tmp_path / "copy" / "tagged")
    rc, out, err = run(root, tmp_path / "copy")
    assert rc == 1 and "duplicate of" in (out / "missing.txt").read_text() and "--allow-missing" in err
    assert "tag=n100k" in (out / "missing.txt").read_text()
    assert run(root, tmp_path / "copy", allow=True)[0] == 0


def test_the_curves_end_with_the_best_over_sigma_envelope_of_each_method(runs):
    records, _ = load_paths([runs])
    fig = curves_figure(records, points=41)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == ["σ = 0.25", "σ = 0.5", "best over σ"]
    best = {line.get_label(): line for line in panels["best over σ"].get_lines()}
    assert set(best) == {"alpha", "wobble", "wobble (tight)"}
    for method, line in best.items():
        per_sigma = [curve(r, line.get_xdata()) for r in records if r.method == method]  # each sigma's run
        assert len(per_sigma) == (1 if method == "alpha" else 2)
        assert np.array_equal(line.get_ydata(), np.max(per_sigma, axis=0)), method
        assert line.get_color() == method_color(method.removesuffix(" (tight)"))
    wobble = best["wobble"].get_ydata()  # sigma 0.25: radii 0.6, 0.3; sigma 0.5: 0.7, 0.3 (two correct of four)
    assert wobble[0] == 50.0 and wobble[np.searchsorted(best["wobble"].get_xdata(), 0.65)] == 25.0


def test_format_pdf_and_svg_write_vector_figures_beside_each_png_and_radii_follow_the_data(runs, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_report_main([runs, "--out", out, "--format", "pdf", "svg"])
    assert rc == 0, stderr
    pngs = sorted(out.glob("*.png"))
    assert pngs and sorted(out.glob("*.pdf")) == [p.with_suffix(".pdf") for p in pngs]
    assert sorted(out.glob("*.svg")) == [p.with_suffix(".svg") for p in pngs]
    for png in pngs:
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in png.with_suffix(".svg").read_bytes()[:2000]
        assert f"`{png.with_suffix('.pdf')}`" in stdout
    # no --radii on CIFAR-10: the paper's radii
    assert [r["radius"] for r in read_csv(out / "best_over_sigma.csv") if r["method"] == "alpha"][:2] == ["0.5", "1.0"]


def test_without_radii_the_tables_go_up_to_the_largest_certified_radius_of_other_data(runs):
    from ssn_exp.report.tables import data_radii

    records, _ = load_paths([runs])  # the largest radius certified for a correct example: alpha's 1.5
    digits = [dataclasses.replace(r, dataset="digits") for r in records]
    assert data_radii(digits) == (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    assert data_radii([dataclasses.replace(r, radius=r.rho / 10) for r in digits]) == (0.05, 0.1, 0.15)
    assert data_radii(records) == data_radii([dataclasses.replace(digits[0], origin="levine2021")]) == PAPER_RADII
    assert data_radii([dataclasses.replace(digits[0], radius=np.array([9.0, 9.0, 0.1, 0.1]))]) == PAPER_RADII
