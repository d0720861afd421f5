"""The published certificate arrays: our certificate and table code reproduces them exactly."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from ssn_exp.certify import authors_radius_float32, best_over_sigma, exact_certificate, randomized_radius
from ssn_exp.results import load_reference

TABLE3_SEED0 = {
    "accuracy": "72.25 63.07 56.21 51.33 46.76 42.66 38.26 33.64",
    "sigma": "0.75 1.25 2.25 3.0 3.5 3.5 3.5 3.5",
    "clean": "81.50 77.85 71.17 67.98 65.40 65.40 65.40 65.40",
}


def _index(reference_dir):
    return list(csv.DictReader(open(reference_dir / "index.csv")))


def test_exact_certificate_reproduces_all_published_dssn_runs(reference_dir):
    rows = [r for r in _index(reference_dir) if r["method"] == "dssn"]
    assert len(rows) == 45
    for r in rows:
        z = np.load(reference_dir / r["file"])
        pred, k = exact_certificate(z["counts"])
        np.testing.assert_array_equal(pred, z["predicted"], err_msg=r["file"])
        # the authors stored float32(k) * float32(1/255): equal bit for bit
        np.testing.assert_array_equal(authors_radius_float32(k, 255), z["radius_l1"], err_msg=r["file"])
        np.testing.assert_array_equal(k, np.round(z["radius_l1"].astype(np.float64) * 255).astype(np.int64))
        assert np.all(z["counts"].sum(1) == int(r["levels"])), r["file"]


def test_randomized_radius_reproduces_published_uniform_and_ssn_runs(reference_dir):
    rows = [r for r in _index(reference_dir) if r["method"] != "dssn"]
    assert len(rows) == 90
    for r in rows:
        z = np.load(reference_dir / r["file"])
        lam = np.sqrt(3) * float(r["sigma"])
        rad = randomized_radius(z["prob_lb"].astype(np.float64), lam)
        np.testing.assert_allclose(rad, z["radius_l1"], rtol=0, atol=1e-5, err_msg=r["file"])
        np.testing.assert_array_equal(z["counts_n0"].argmax(1), z["predicted"], err_msg=r["file"])


def test_best_over_sigma_reproduces_table3_seed0(reference_dir):
    runs = [
        rec.summary() for rec in load_reference(reference_dir) if rec.group == ("cifar10", "dssn", "standard", "none")
    ]
    assert len(runs) == 15
    rows = best_over_sigma(runs)
    assert " ".join(f"{100 * r.certified_accuracy:.2f}" for r in rows) == TABLE3_SEED0["accuracy"]
    assert " ".join(f"{r.sigma:g}" if r.sigma % 1 else f"{r.sigma:.1f}" for r in rows) == TABLE3_SEED0["sigma"]
    assert " ".join(f"{100 * r.clean_accuracy:.2f}" for r in rows) == TABLE3_SEED0["clean"]


def test_reference_loader_reads_every_run(reference_dir):
    recs = load_reference(reference_dir)
    assert len(recs) == 135
    n = {rec.dataset: rec.n for rec in recs}
    assert n == {"cifar10": 10000, "imagenet": 500}
    assert {rec.denoiser for rec in recs} == {"none", "stability", "mse", "mse_retrain"}


@pytest.mark.parametrize("bad", ["nope"])
def test_reference_loader_rejects_a_folder_without_index(tmp_path, bad):
    with pytest.raises(FileNotFoundError, match="index.csv"):
        load_reference(tmp_path / bad)
