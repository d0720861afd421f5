"""The report and the bench for sequential certification (issue 18), in process: a fixed and a sequential run of the
same noise, sigma and seed, certified for real on a tiny model and summarized by the real ``summarize``, are both
kept, told apart by their procedure, shown with their forward passes per image, and the sequential one gets a
samples-vs-radius plot. Nothing here names a procedure to the report: it decides from the files."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import read_csv, run_report_main
from ssn_exp.certify.procedures import FixedSample
from ssn_exp.certify.procedures_sequential import Sequential
from ssn_exp.certify.record import SAMPLES_COLUMN, CertificateRecord
from ssn_exp.lightning.results import summarize, write_rows_atomic
from ssn_exp.noises import Uniform
from ssn_exp.report.plots import samples_figure, samples_filename
from ssn_exp.report.records import (
    RunFileError,
    load_paths,
    load_run_dir,
    tell_procedures_apart,
)
from ssn_exp.report.tables import dedupe_records, passes_rows

RADII = [0.25, 0.5]
SIGMA = 0.5


class Sign(torch.nn.Module):
    """A fixed base classifier on 2-d inputs: class 1 where x0 > x1, else class 0 (no training, no randomness)."""

    def forward(self, x):
        d = (x[:, 0] - x[:, 1]).reshape(-1, 1)
        return torch.cat([-d, d], dim=1)


# six examples at different margins: some certified far, some near a threshold, one misclassified
X = torch.tensor([[0.9, 0.0], [0.0, 0.9], [0.5, 0.3], [0.3, 0.5], [0.45, 0.4], [0.0, 0.6]])
Y = [1, 0, 1, 0, 1, 1]


def certify_run(run_dir: Path, procedure, seed: int = 0) -> dict:
    """Certify X with ``procedure`` for real, write certificates.csv in the record's columns, then metrics.json by
    summarize (as a certification writes them)."""
    run_dir.mkdir(parents=True)
    noise = Uniform(SIGMA)
    record = CertificateRecord(noise, procedure)
    gens = [torch.Generator().manual_seed(1000 * seed + i) for i in range(len(X))]
    cert = procedure.certify(Sign(), X, noise, 2, noise_batch=256, generator=gens, labels=torch.tensor(Y))
    rows = record.rows(list(range(len(X))), Y, cert, seconds=0.001)
    write_rows_atomic(run_dir / "certificates.csv", record.columns, rows)
    meta = {"dataset": "digits", "training": "standard", "denoiser": "none", "seed": seed}
    return summarize(run_dir, record, meta, radii=RADII, plot=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sequential") / "runs"
    certify_run(root / "fixed", FixedSample(n0=16, n=400, alpha=0.01))
    certify_run(root / "sequential", Sequential(n0=16, n=4000, alpha=0.01, radii=RADII, max_batch=128))
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sequential_report")
    rc, stdout, stderr = run_report_main([runs, "--out", out, "--radii", *RADII])
    assert rc == 0, stderr
    return out, stdout


def test_a_run_record_reads_the_procedure_the_passes_and_the_samples(runs):
    fixed = load_run_dir(runs / "fixed")
    seq = load_run_dir(runs / "sequential")
    assert [r.method for r in fixed] == ["uniform", "uniform (box)"] == [r.method for r in seq]
    assert {r.procedure for r in fixed} == {"fixed"} and {r.procedure for r in seq} == {"sequential"}
    assert fixed[0].samples is None and fixed[0].extra["forward_passes_per_example"] == 416
    meta = json.loads((runs / "sequential" / "metrics.json").read_text())
    samples = seq[0].samples
    assert samples is not None and len(samples) == len(X) and seq[1].samples is samples  # the box radius shares them
    assert seq[0].extra["forward_passes_per_example"] == pytest.approx(samples.mean())
    assert seq[0].extra["forward_passes_median"] == meta["forward_passes_median"] == pytest.approx(np.median(samples))
    assert seq[0].extra["forward_passes_p90"] == meta["forward_passes_p90"]
    assert samples.min() < samples.max()  # a sequential test stops at different times on different examples
    assert seq[0].metric_radii == tuple(RADII)


def test_a_file_without_a_procedure_reads_as_before(runs, tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    meta = json.loads((runs / "fixed" / "metrics.json").read_text())
    for key in ("procedure", "forward_passes_per_example", "forward_passes_median", "forward_passes_p90"):
        del meta[key]
    (run / "metrics.json").write_text(json.dumps(meta))
    (run / "certificates.csv").write_text((runs / "fixed" / "certificates.csv").read_text())
    rec = load_run_dir(run)[0]
    assert rec.procedure == "" and rec.samples is None and "forward_passes_per_example" not in rec.extra
    assert passes_rows([rec]) == []  # no forward-pass table row for it, and no tag
    assert tell_procedures_apart([rec]) == [rec]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("procedure", "", "'procedure' must be a non-empty string"),
        ("procedure", 3, "'procedure' must be a non-empty string"),
        ("forward_passes_per_example", "many", "'forward_passes_per_example' must be a finite number"),
        ("forward_passes_p90", -1, "'forward_passes_p90' must be >= 0"),
    ],
)
def test_a_bad_procedure_or_count_in_metrics_json_is_a_named_error(runs, tmp_path, key, value, match):
    run = tmp_path / "run"
    run.mkdir()
    meta = json.loads((runs / "sequential" / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**meta, key: value}))
    (run / "certificates.csv").write_text((runs / "sequential" / "certificates.csv").read_text())
    with pytest.raises(RunFileError, match=match):
        load_run_dir(run)


def test_a_bad_samples_cell_is_a_named_error(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text((runs / "sequential" / "metrics.json").read_text())
    rows = read_csv(runs / "sequential" / "certificates.csv")
    rows[2][SAMPLES_COLUMN] = "0"
    with open(run / "certificates.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(RunFileError, match=r"line 4: samples must be >= 1"):
        load_run_dir(run)


def test_runs_by_two_procedures_are_both_kept_and_told_apart(runs):
    records, problems = load_paths([runs])
    assert problems == []
    kept, notes = dedupe_records(records)  # same origin, method, sigma and seed: the procedure tells them apart
    assert len(kept) == 4 and notes == []
    tagged = tell_procedures_apart(records)
    assert sorted(r.method for r in tagged) == [
        "uniform [fixed]",
        "uniform [fixed] (box)",
        "uniform [sequential]",
        "uniform [sequential] (box)",
    ]
    box = next(r for r in tagged if r.method == "uniform [sequential] (box)")
    assert (box.label, box.base_method, box.noise_method) == (
        "Uniform [sequential] (box)",
        "uniform [sequential]",
        "uniform",
    )
    assert tell_procedures_apart(tagged) == tagged  # tagging twice changes nothing
    # one procedure per method: nothing is renamed
    alone = [r for r in records if r.procedure == "sequential"]
    assert tell_procedures_apart(alone) == alone
    # a second copy of the same sequential run is still a duplicate
    copy = dataclasses.replace(alone[0], source="elsewhere")
    assert len(dedupe_records([*alone, copy])[1]) == 1


def test_the_report_shows_both_runs_with_their_forward_passes(report, runs):
    out, stdout = report
    best = read_csv(out / "best_over_sigma.csv")
    methods = list(dict.fromkeys(r["method"] for r in best))
    assert methods == ["uniform [fixed]", "uniform [fixed] (box)", "uniform [sequential]", "uniform [sequential] (box)"]
    assert "& Uniform [sequential] &" in (out / "best_over_sigma.tex").read_text()
    acr = read_csv(out / "acr.csv")
    assert list(acr[0]) == ["origin", "dataset", "method", "training", "denoiser", "sigma", "seed", "n"] + [
        "clean_accuracy",
        "acr",
    ]  # the ACR table is as before
    passes = {r["method"]: r for r in read_csv(out / "passes.csv")}
    assert list(passes) == methods
    seq = json.loads((runs / "sequential" / "metrics.json").read_text())
    row = passes["uniform [sequential]"]
    assert float(row["forward_passes"]) == pytest.approx(seq["forward_passes_per_example"], abs=0.05)
    assert float(row["forward_passes_median"]) == pytest.approx(seq["forward_passes_median"], abs=0.05)
    assert float(row["forward_passes_p90"]) == pytest.approx(seq["forward_passes_p90"], abs=0.05)
    assert passes["uniform [fixed]"]["forward_passes"] == "416"
    assert list(row)[9:11] == ["ρ=0.25", "ρ=0.5"]  # certified accuracy beside the passes
    assert row["ρ=0.5"] == f"{100 * seq['certified_accuracy']['0.5']:.2f}"
    assert "## Certified accuracy and forward passes per image" in stdout
    assert "forward passes / image | median | p90 |" in stdout
    assert "| ours | digits | uniform [sequential] | standard | none |" in stdout


def test_the_report_draws_a_samples_plot_for_the_sequential_run_only(report):
    out, stdout = report
    pngs = sorted(p.name for p in out.glob("samples_*.png"))
    assert pngs == ["samples_digits_standard_none_uniform_sequential_sigma0.5_seed0.png"]
    png = out / pngs[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert f"`{png}`" in stdout
    assert not list(out.glob(".*.tmp"))  # written through a temporary file, none left behind


def test_the_samples_plot_puts_passes_against_radius_with_the_metrics_radii(runs):
    rec = load_run_dir(runs / "sequential")[0]
    fig = samples_figure(rec)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(points[:, 1]) == sorted(rec.samples.tolist())
    assert sorted(points[:, 0]) == pytest.approx(sorted(np.maximum(rec.rho, 0.0)))
    vertical = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert vertical == RADII
    fixed = load_run_dir(runs / "fixed")[0]
    with pytest.raises(ValueError, match="no forward passes per example"):
        samples_figure(fixed)


def test_a_samples_plot_name_stays_in_the_output_folder(runs):
    rec = dataclasses.replace(load_run_dir(runs / "sequential")[0], method="../../evil/x", dataset="a b")
    name = samples_filename(rec)
    assert "/" not in name and ".." not in name and name.startswith("samples_a_b-") and name.endswith(".png")


def test_a_samples_plot_replaces_a_link_and_never_writes_through_it(runs, tmp_path):
    from ssn_exp.report.plots import plot_all_samples

    target = tmp_path / "precious.txt"
    target.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    records = load_run_dir(runs / "sequential")
    (out / samples_filename(records[0])).symlink_to(target)
    (path,) = plot_all_samples(records, out)
    assert target.read_text() == "keep" and not path.is_symlink() and path.read_bytes()[:4] == b"\x89PNG"


def test_the_bench_has_a_sequential_line_beside_plain_forward_passes():
    """The bench's sequential case, measured for real on the digits model (a small size, one repeat), and the line
    the bench prints for it: its forward passes per second against plain batched forward passes."""
    from ssn_exp import bench

    case = bench.CASES["digits_cnn"]
    sz = {**case.quick_sizes, "seq_images": 3, "seq_n": 96}
    (seq_case,) = bench.sequential_cases(case, sz)
    assert seq_case.procedure.forward_passes(seq_case.noise) is None and seq_case.rounds == ()
    _, model = bench._prepare(case, torch.device("cpu"), bench._parser().parse_args([]))
    cert = bench._bench_certification(
        case, model, torch.device("cpu"), sz, 1, contextlib.nullcontext, lambda _: None, cases=[seq_case]
    )
    seq = cert[seq_case.key]
    assert seq["row"] == "uniform sequential" and seq["images"] == 3
    assert seq["forward_passes"] == sum(seq["samples"]) and len(seq["samples"]) == 3
    assert all(1 <= k <= 64 + 96 for k in seq["samples"])
    assert seq["batch_sizes"][-1] <= sz["noise_batch"]  # plain forward passes in batches of noise_batch
    pps = seq["passes_per_second"]
    assert set(pps) == {"cert", "forward", "baseline"} and all(v > 0 for v in pps.values())
    training = {"step_seconds": {"none": 0.001}, "overhead": {"x": 0.0}, "overhead_direct": {"x": 0.0}}
    result = {"device": "cpu", "device_type": "cpu", "torch": "x", "threads": 1, "options": {"repeats": 1}}
    result["raw"] = {"digits_cnn": {"certification": cert, "training": training}}
    printed = bench.format_table(result)
    (line,) = [line for line in printed.splitlines() if line.startswith("sequential certification")]
    assert "on digits_cnn" in line and f"ratio {pps['cert'] / pps['forward']:.3f}" in line
    assert "digits_cnn  uniform sequential" in printed
    assert f"mean {np.mean(seq['samples']):.0f}, median {np.median(seq['samples']):.0f}" in printed
