"""End to end: `python -m ssn_exp` and `python -m ssn_exp.certify` as real subprocesses on digits."""

from __future__ import annotations

import json

import pytest

from helpers import (
    certificate_columns,
    locuslab_accuracy,
    read_csv,
    read_metrics,
    run_cli,
    run_cli_many,
    write_tiny_cifar10,
    write_tiny_imagefolder,
)

METRIC_KEYS = {
    "method",
    "sigma",
    "lambda",
    "q",
    "dataset",
    "training",
    "denoiser",
    "seed",
    "n_examples",
    "clean_accuracy",
    "certified_accuracy",
    "acr",
    "seconds_per_example",
    "forward_passes_per_example",
}

pytestmark = pytest.mark.slow


def _train(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    p = run_cli("ssn_exp", "debug=fast", f"hydra.run.dir={run_dir}", *overrides)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir, p


MATRIX = [(method, training) for training in ("standard", "stability") for method in ("uniform", "ssn", "dssn")]


def test_each_method_and_training_runs_end_to_end(tmp_path):
    """All six method x training runs (as concurrent processes), each checked in full."""
    calls = [
        (
            "ssn_exp",
            ["debug=fast", f"hydra.run.dir={tmp_path / f'{m}-{t}'}", f"method={m}", f"training={t}", "sigma=0.5"],
        )
        for m, t in MATRIX
    ]
    for (method, training), p in zip(MATRIX, run_cli_many(calls), strict=True):
        assert p.returncode == 0, p.stderr[-3000:]
        _check_run(tmp_path / f"{method}-{training}", p, method, training)


def _check_run(run_dir, p, method, training):
    m = read_metrics(run_dir)
    assert METRIC_KEYS <= set(m)
    assert (m["method"], m["training"], m["dataset"], m["q"], m["n_examples"]) == (method, training, "digits", 16, 8)
    assert m["sigma"] == 0.5 and abs(m["lambda"] - 0.8660254) < 1e-6
    rows = read_csv(run_dir / "certificates.csv")
    extra = ["k"] if method == "dssn" else ["p_lower", "radius_box"]
    assert list(rows[0]) == ["index", "label", "prediction", "correct", "radius", "seconds", *extra, "counts"]
    assert [int(r["index"]) for r in rows] == list(range(8))
    votes = [sum(int(c.split(":")[1]) for c in r["counts"].split()) for r in rows]
    assert votes == [27 if method == "dssn" else 256] * 8
    if method != "dssn":  # the box-constrained certificate never claims less than the standard one
        assert all(float(r["radius_box"]) >= float(r["radius"]) for r in rows)
        assert set(m["certified_accuracy_box"]) == set(m["certified_accuracy"]) and m["acr_box"] >= m["acr"]
        assert all(m["certified_accuracy_box"][r] >= m["certified_accuracy"][r] for r in m["certified_accuracy"])
    else:
        assert "radius_box" not in m and "certified_accuracy_box" not in m
    assert m["clean_accuracy"] == sum(int(r["correct"]) for r in rows) / 8
    # the locuslab/smoothing file, read as their analyze.py does, gives our certified accuracies
    for key in [k for k in m if k.startswith("certified_accuracy")][:1]:
        assert locuslab_accuracy(run_dir / "certificates.locuslab.tsv", map(float, m[key])) == m[key]
    assert m["forward_passes_per_example"] == (27 if method == "dssn" else 64 + 256)
    assert (run_dir / "certified_accuracy.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "certified accuracy (%)" in p.stdout  # the table printed at the end


def test_recertifying_a_checkpoint_reproduces_dssn_certificates_exactly(tmp_path):
    run_dir, _ = _train(tmp_path, "method=dssn", "sigma=0.75", "certify.max_examples=24")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    want = certificate_columns(read_csv(run_dir / "certificates.csv"))
    out = tmp_path / "recert"
    # other batch sizes and noise batches: the same certificates, bit for bit
    p = run_cli(
        "ssn_exp.certify",
        f"ckpt={ckpt}",
        f"hydra.run.dir={out}",
        "certify.max_examples=24",
        "certify.batch_size=5",
        "certify.noise_batch=7",
        "certify.progress=false",
        "sigma=0.75",
        "method=dssn",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert certificate_columns(read_csv(out / "certificates.csv")) == want
    a, b = read_metrics(run_dir), read_metrics(out)
    for key in ("certified_accuracy", "clean_accuracy", "acr", "n_examples", "q", "sigma", "method", "seed"):
        assert a[key] == b[key], key


def test_a_checkpoint_from_another_method_or_sigma_is_refused(tmp_path):
    run_dir, _ = _train(tmp_path, "method=dssn", "sigma=0.5", "certify.enabled=false")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    cases = (("sigma=1.0", "sigma"), ("method=uniform", "method"), ("seed=3", "seed"), ("data=cifar10", "dataset"))
    calls = [
        ("ssn_exp.certify", [f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'x' / str(i)}", bad])
        for i, (bad, _) in enumerate(cases)
    ]
    calls.append(("ssn_exp.certify", [f"ckpt={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'x' / 'nope'}"]))
    results = run_cli_many(calls)
    for (_, word), p in zip(cases, results, strict=False):
        assert p.returncode == 2, p.stderr[-2000:]
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: checkpoint") and word in err[0], p.stderr
    assert results[-1].returncode == 2 and "nope.ckpt does not exist" in results[-1].stderr


def test_bad_input_gets_one_clear_line(tmp_path):
    runs = [tmp_path / str(i) / "run" for i in range(3)]
    p1, p2, p3 = run_cli_many(
        [
            ("ssn_exp", ["sigma=-1", f"hydra.run.dir={runs[0]}"]),
            ("ssn_exp", ["method=gauss", f"hydra.run.dir={runs[1]}"]),
            ("ssn_exp", ["data=cifar10", f"data.root={tmp_path / 'nodata'}", f"hydra.run.dir={runs[2]}"]),
        ]
    )
    assert p1.returncode == 2 and p1.stderr.strip().splitlines() == [
        "error: sigma must be a positive finite number, got -1"
    ]
    assert p2.returncode == 2 and p2.stderr.strip().splitlines() == [
        "error: In 'config': Could not find 'method/gauss' (available options in 'method': dssn, laplace, ssn, uniform)"
    ]
    assert p3.returncode == 2
    (line,) = p3.stderr.strip().splitlines()
    assert "CIFAR-10 not found" in line and str(tmp_path / "nodata") in line and "data.download=true" in line
    assert not any(run.exists() for run in runs)  # failed starts leave no directory that looks like a run


def test_a_run_stopped_early_is_not_certified_until_it_is_finished(tmp_path):
    run = tmp_path / "run"
    args = [
        "training.epochs=500",
        "certify.max_examples=4",
        f"hydra.run.dir={run}",
        "trainer.enable_progress_bar=false",
    ]
    p = run_cli("ssn_exp", *args, "+trainer.max_time=00:00:00:03")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "certification skipped" in p.stdout + p.stderr
    assert not (run / "metrics.json").exists() and not (run / "certificates.csv").exists()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_recertifying_a_randomized_run_uses_its_seed_and_refuses_other_noise_settings(tmp_path):
    run_dir, _ = _train(tmp_path, "method=uniform", "seed=1", "certify.max_examples=5")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "recert"
    p, bad = run_cli_many(
        [
            ("ssn_exp.certify", [f"ckpt={ckpt}", f"hydra.run.dir={out}", "certify.max_examples=5", "procedure.n=256"]),
            ("ssn_exp.certify", [f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'bad'}", "method.arithmetic=levine2021"]),
        ]
    )
    assert p.returncode == 0, p.stderr[-2000:]
    # the same certification noise as the run's own (seed 1 from the checkpoint, not the default 0)
    assert certificate_columns(read_csv(out / "certificates.csv")) == certificate_columns(
        read_csv(run_dir / "certificates.csv")
    )
    assert bad.returncode == 2 and "method.arithmetic: the noise of an ssn_exp checkpoint" in bad.stderr


def test_resume_after_finish_is_a_noop_with_equal_results(tmp_path):
    run_dir, _ = _train(tmp_path, "method=dssn")
    first = read_csv(run_dir / "certificates.csv")
    metrics = read_metrics(run_dir)
    run_dir2, p = _train(tmp_path, "method=dssn")
    assert "resuming" in (p.stdout + p.stderr)
    assert read_csv(run_dir / "certificates.csv") == first  # nothing recomputed
    assert read_metrics(run_dir2) == metrics
    p = run_cli("ssn_exp", "debug=fast", f"hydra.run.dir={run_dir}", "sigma=1.0")
    assert p.returncode == 2 and "different settings (method.sigma)" in p.stderr


def test_cifar10_pickle_folder_trains_and_certifies(tmp_path):
    write_tiny_cifar10(tmp_path / "c10")
    run_dir, _ = _train(
        tmp_path,
        "data=cifar10",
        f"data.root={tmp_path / 'c10'}",
        "data.num_workers=0",
        "model=digits_cnn",
        "sigma=0.15",
        "certify.max_examples=3",
    )
    m = read_metrics(run_dir)
    assert (m["dataset"], m["q"], m["n_examples"], m["forward_passes_per_example"]) == ("cifar10", 255, 3, 132)


def test_imagefolder_data(tmp_path):
    write_tiny_imagefolder(tmp_path / "train")
    write_tiny_imagefolder(tmp_path / "val", per_class=10, seed=1)
    run_dir, _ = _train(
        tmp_path,
        "data=imagenet",
        f"data.train_root={tmp_path / 'train'}",
        f"data.val_root={tmp_path / 'val'}",
        "data.num_classes=3",
        "data.image_size=16",
        "data.resize=18",
        "data.test_every=10",
        "data.num_workers=0",
        "model=digits_cnn",
        "method=uniform",
    )
    m = read_metrics(run_dir)
    assert (m["dataset"], m["q"], m["n_examples"]) == ("imagenet", 255, 3)  # 30 val images, every 10th
    cfg = json.loads(json.dumps(m))
    assert cfg["forward_passes_per_example"] == 64 + 256
