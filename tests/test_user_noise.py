"""A noise defined entirely outside ssn_exp (issue 17, "Done when"): a module and a method YAML on the user's
``hydra.searchpath``, with a radius formula of its own and an extra radius column, trains, certifies, resumes (its
rows accepted on read-back), certifies its checkpoint, appears in the report and in wandb's summary; nothing in
``ssn_exp`` knows it."""

from __future__ import annotations

import csv
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, read_csv, read_metrics, read_wandb_offline, run_cli

#: The user's noise (tests/plugins/mynoise.py): uniform noise of half-width lam = sqrt(3) sigma certified with a
#: deliberately more conservative radius lam (p_lower - 1/2) (half the valid 2 lam (p_lower - 1/2)), plus
#: ``radius_half``, half of it; its YAML is tests/plugins/conf/method/mynoise.yaml.
PLUGINS = ROOT / "tests" / "plugins"

SIGMA = 0.5
LAM = math.sqrt(3.0) * SIGMA


@pytest.fixture(scope="module")
def user_noise(tmp_path_factory):
    """The user's code and config, and the CLI runs over them (shared by the tests of this module)."""
    base = tmp_path_factory.mktemp("user_noise")
    code, conf, work = PLUGINS, PLUGINS / "conf", base / "work"
    work.mkdir()
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": str(code) + (os.pathsep + path if path else "")}
    runs, cert_dir, report = base / "runs", base / "cert", base / "report"
    train = (
        "ssn_exp",
        "method=mynoise",
        "debug=fast",
        "logger=wandb",
        f"sigma={SIGMA}",
        f"hydra.searchpath=[file://{conf}]",
        f"run_root={runs}",
    )

    def cli(module, *args):
        return run_cli(module, *args, cwd=work, env=env, timeout=300)

    first = cli(*train)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = [m.parent for m in runs.rglob("metrics.json")]
    state = {"run": run, "csv": (run / "certificates.csv").read_bytes(), "wandb": read_wandb_offline(run)}
    state["metrics"] = read_metrics(run)
    # then, side by side: the same command again (resume), the checkpoint certified by the other entry point (which
    # only reads it) and the report over the run
    certify = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "debug=fast", "trust_targets=[mynoise]"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        again = pool.submit(cli, *train)
        cert = pool.submit(cli, "ssn_exp.certify", *certify, f"hydra.run.dir={cert_dir}")
        rep = pool.submit(cli, "ssn_exp.report", str(runs), "--out", str(report))
        state.update(again=again.result(), cert=cert.result(), report=rep.result())
    state.update(code=code, cert_dir=cert_dir, report_dir=report)
    return state


def _rows(path: Path) -> list[dict]:
    rows = read_csv(path)
    assert rows, path
    return rows


def _follow_its_formula(rows: list[dict]) -> None:
    for r in rows:
        p = float(r["p_lower"])
        assert 0.0 <= p < 1.0
        assert abs(float(r["radius"]) - LAM * (p - 0.5)) <= 1e-12  # its own formula, not 2 lam (p - 1/2)
        assert abs(float(r["radius_half"]) - 0.5 * float(r["radius"])) <= 1e-12


def _a_user_noise_trains_and_certifies_with_its_own_radius(user_noise):
    run = user_noise["run"]
    assert run.parent.name == "mynoise-standard-none"
    with open(run / "certificates.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == [*"index label prediction correct radius seconds p_lower radius_half counts".split()]
    rows = _rows(run / "certificates.csv")
    assert len(rows) == 8  # debug=fast
    _follow_its_formula(rows)
    m = user_noise["metrics"]
    assert m["method"] == "mynoise" and m["sigma"] == SIGMA and m["lambda"] == pytest.approx(LAM)
    correct = np.array([int(r["correct"]) for r in rows])
    radius = np.array([float(r["radius"]) for r in rows])
    half = np.array([float(r["radius_half"]) for r in rows])
    for key, values in (("certified_accuracy", radius), ("certified_accuracy_half", half)):
        for r, acc in m[key].items():
            assert acc == pytest.approx(np.mean(correct * (values >= float(r)))), (key, r)
    assert m["acr_half"] == pytest.approx(np.mean(correct * np.maximum(half, 0.0)))
    assert "radius_box" not in header and "certified_accuracy_box" not in m


def _a_user_noise_resumes_and_its_rows_are_checked_on_read_back(user_noise, monkeypatch):
    # the same command again: every row accepted as it is, nothing recomputed (the seconds column included)
    p = user_noise["again"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert (user_noise["run"] / "certificates.csv").read_bytes() == user_noise["csv"]
    assert "resuming from" in (user_noise["run"] / "ssn_exp.log").read_text()
    # the read-back check is the user's noise's own: its radius formula and its extra column
    monkeypatch.syspath_prepend(str(user_noise["code"]))
    import mynoise

    from ssn_exp.certify.procedures import FixedSample
    from ssn_exp.certify.record import CertificateRecord
    from ssn_exp.lightning.results import ResultsFileError, read_certificates

    run, m = user_noise["run"], user_noise["metrics"]
    record = CertificateRecord(mynoise.HalfUniform(SIGMA), FixedSample(n0=m["n0"], n=m["n"], alpha=m["alpha"]))
    ok = read_certificates(run / "certificates.csv", record)
    assert sorted(ok) == sorted(int(r["index"]) for r in _rows(run / "certificates.csv"))
    rows = _rows(run / "certificates.csv")
    for column, value in (
        ("radius", lambda r: repr(2.0 * LAM * (float(r["p_lower"]) - 0.5))),  # uniform noise's formula
        ("radius_half", lambda r: repr(float(r["radius"]))),
    ):
        bad = [dict(r) for r in rows]
        bad[3][column] = value(bad[3])
        path = run.parent / f"tampered_{column}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(bad)
        with pytest.raises(ResultsFileError):
            read_certificates(path, record)
        path.unlink()
    sys.modules.pop("mynoise", None)


def _a_user_noise_checkpoint_is_certified_by_the_certify_entry_point(user_noise):
    p = user_noise["cert"]
    assert p.returncode == 0, p.stderr[-3000:]
    out = user_noise["cert_dir"]
    rows = _rows(out / "certificates.csv")
    assert len(rows) == 8
    _follow_its_formula(rows)
    m = read_metrics(out)
    assert m["method"] == "mynoise" and "certified_accuracy_half" in m


def _a_user_noise_is_in_the_report(user_noise):
    p = user_noise["report"]
    assert p.returncode == 0, p.stderr[-3000:]
    rep = user_noise["report_dir"]
    methods = {r["method"] for r in read_csv(rep / "best_over_sigma.csv")}
    assert "mynoise" in methods
    assert "| mynoise |" in (rep / "best_over_sigma.md").read_text()
    assert "mynoise" in (rep / "acr.md").read_text()
    assert (rep / "curves_digits_standard_none.png").stat().st_size > 5000


def _a_user_noise_is_in_the_wandb_summary(user_noise):
    wb, m = user_noise["wandb"], user_noise["metrics"]
    assert wb["name"] == f"mynoise-sigma{SIGMA}-seed0"
    for key in ("method", "sigma", "clean_accuracy", "acr", "acr_half", "n_examples"):
        assert wb["summary"][key] == m[key], key
    for r, acc in m["certified_accuracy"].items():
        assert wb["summary"][f"certified_accuracy/{r}"] == acc


@pytest.mark.slow
def test_a_user_noise_end_to_end(user_noise, monkeypatch):
    """One test over the shared CLI runs (a module fixture used by several tests would run once per xdist worker)."""
    _a_user_noise_trains_and_certifies_with_its_own_radius(user_noise)
    _a_user_noise_resumes_and_its_rows_are_checked_on_read_back(user_noise, monkeypatch)
    _a_user_noise_checkpoint_is_certified_by_the_certify_entry_point(user_noise)
    _a_user_noise_is_in_the_report(user_noise)
    _a_user_noise_is_in_the_wandb_summary(user_noise)


# -- a user noise whose radius cannot make a certificate: refused in one line before the first row ----------------


def _broken_noise(radius):
    import torch

    from ssn_exp.noises import SampledNoise

    class Broken(SampledNoise):
        name = "broken"

        def scale(self, sigma):
            return sigma

        def _draw(self, x, generator):
            return x + torch.rand(x.shape, generator=generator, dtype=x.dtype)

    Broken.radius = lambda self, p: radius(np.asarray(p, dtype=np.float64))
    return Broken(0.5)


def _raises(p):
    raise KeyError("lam")


@pytest.mark.parametrize(
    "radius,words",
    [
        (lambda p: np.where(p > 0.9, np.nan, p - 0.5), "is not finite at p = 0.900390625"),
        (lambda p: np.where(p > 0.99, np.inf, p - 0.5), "is not finite"),
        (lambda p: float(np.mean(p)), "gives shape ()"),
        (_raises, "raises KeyError ('lam')"),
        (lambda p: 0.5 - p, "is negative at some p >= 1/2"),
        (lambda p: np.abs(p - 0.7), "decreases as p grows"),
    ],
)
@pytest.mark.parametrize("procedure", ["fixed", "sequential"])
def test_a_broken_radius_is_refused_before_the_first_row(tmp_path, radius, words, procedure):
    import torch

    from ssn_exp.certify.procedures import FixedSample
    from ssn_exp.certify.procedures_sequential import Sequential
    from ssn_exp.lightning.certification import open_certifier
    from ssn_exp.noises import RadiusError

    data = torch.utils.data.TensorDataset(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    proc = FixedSample(n0=2, n=4) if procedure == "fixed" else Sequential(n0=2, n=64, first_batch=8, radii=[0.0])
    with pytest.raises(RadiusError) as info:
        cert = open_certifier(torch.nn.Flatten(), _broken_noise(radius), data, tmp_path, num_classes=16, procedure=proc)
        cert.run("cpu", progress=False)
    assert str(info.value).startswith("Broken.radius ") and words in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "certificates.csv").exists() and not (tmp_path / "metrics.json").exists()


def test_metrics_files_are_strict_json(tmp_path):
    from ssn_exp.lightning.results import write_json_atomic

    write_json_atomic(tmp_path / "metrics.json", {"acr": 0.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="JSON compliant"):
            write_json_atomic(tmp_path / "metrics.json", {"acr": bad})
    assert (tmp_path / "metrics.json").read_text() == '{\n  "acr": 0.5\n}\n'  # nothing written in its place
