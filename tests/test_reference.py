"""The published certificate arrays (shipped with the package): our certificate and table code reproduces them.

The authors' stored predictions and radii (tests/data/levine2021_verify.npz) are the outside reference;
every assertion compares them with what ssn_exp's own code computes.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from ssn_exp.certify import authors_radius_float32, best_over_sigma, exact_certificate, randomized_radius, top_class
from ssn_exp.report.records import load_reference, published_dir

TABLE3_SEED0 = {
    "accuracy": "72.25 63.07 56.21 51.33 46.76 42.66 38.26 33.64",
    "sigma": "0.75 1.25 2.25 3.0 3.5 3.5 3.5 3.5",
    "clean": "81.50 77.85 71.17 67.98 65.40 65.40 65.40 65.40",
}


def _index(reference_dir):
    with open(reference_dir / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_exact_certificate_reproduces_all_published_dssn_runs(reference_dir, verify_arrays):
    rows = [r for r in _index(reference_dir) if r["method"] == "dssn"]
    assert len(rows) == 45
    for r in rows:
        run = r["file"][:-4]
        counts = np.load(reference_dir / r["file"])["counts"]
        pred, k = exact_certificate(counts)
        np.testing.assert_array_equal(pred, verify_arrays[f"{run}/predicted"], err_msg=run)
        # the authors stored float32(k) * float32(1/255): equal bit for bit
        np.testing.assert_array_equal(authors_radius_float32(k, 255), verify_arrays[f"{run}/radius_l1"], err_msg=run)
        assert np.all(counts.sum(1) == int(r["levels"])), run


def test_randomized_radius_and_selection_reproduce_published_uniform_and_ssn_runs(reference_dir, verify_arrays):
    rows = [r for r in _index(reference_dir) if r["method"] != "dssn"]
    assert len(rows) == 90
    for r in rows:
        run = r["file"][:-4]
        z = np.load(reference_dir / r["file"])
        lam = np.sqrt(3) * float(r["sigma"])
        rad = randomized_radius(verify_arrays[f"{run}/prob_lb"].astype(np.float64), lam)
        np.testing.assert_allclose(rad, z["radius_l1"], rtol=0, atol=1e-5, err_msg=run)
        # our selection rule (most frequent class, ties to the lowest) gives the authors' predictions
        np.testing.assert_array_equal(top_class(verify_arrays[f"{run}/counts_n0"]), z["predicted"], err_msg=run)


def test_published_n0_counts_contain_ties_that_the_selection_rule_decides(verify_arrays):
    """The selection test above only means something if ties occur: the lowest class wins them."""
    ties = 0
    for key, counts in verify_arrays.items():
        if key.endswith("/counts_n0"):
            top = counts.max(1, keepdims=True)
            ties += int(((counts == top).sum(1) > 1).sum())
    assert ties > 50


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
    assert all(rec.origin == "levine2021" for rec in recs)


def test_published_data_is_found_through_the_package():
    path = published_dir("levine2021")
    assert (path / "index.csv").is_file() and (path / "labels.npz").is_file() and (path / "README.md").is_file()
    with pytest.raises(ValueError, match="unknown published results 'nope'"):
        published_dir("nope")


def test_reference_loader_rejects_a_folder_without_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.csv"):
        load_reference(tmp_path / "nope")
