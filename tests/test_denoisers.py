"""Denoiser variants (appendix D) on digits: stages trained once and reused, F o D certified."""

from __future__ import annotations

import pytest

from helpers import certificate_columns, read_csv, read_metrics, run_cli

pytestmark = pytest.mark.slow

SMALL = ["denoiser.net.depth=3", "denoiser.net.width=8"]


def test_variants_train_once_reuse_stages_and_certify(tmp_path):
    stages = tmp_path / "stages"
    common = ["debug=fast", "method=dssn", "sigma=0.5", f"denoiser.stage_root={stages}", *SMALL]

    def run(variant, *extra):
        out = tmp_path / variant
        p = run_cli("ssn_exp", *common, f"denoiser={variant}", f"hydra.run.dir={out}", *extra)
        assert p.returncode == 0, p.stderr[-3000:]
        return out, p.stdout + p.stderr

    out_s, log_s = run("stability")
    assert "training stage clean" in log_s and "training stage denoiser_stability" in log_s
    out_m, log_m = run("mse")
    assert "reusing stage clean" in log_m and "training stage denoiser_mse" in log_m
    out_r, log_r = run("mse_retrain")
    assert "reusing stage denoiser_mse" in log_r and "training stage" not in log_r
    assert sorted(p.parent.parent.name for p in stages.glob("*/*/done.json")) == [
        "clean",
        "denoiser_mse",
        "denoiser_stability",
    ]
    for out, variant in ((out_s, "stability"), (out_m, "mse"), (out_r, "mse_retrain")):
        m = read_metrics(out)
        assert (m["denoiser"], m["method"], m["n_examples"]) == (variant, "dssn", 8)
    # the run checkpoint holds F o D: re-certifying it gives the same exact certificates
    recert = tmp_path / "recert"
    p = run_cli(
        "ssn_exp.certify",
        f"ckpt={out_m / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={recert}",
        "certify.max_examples=8",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert certificate_columns(read_csv(recert / "certificates.csv")) == certificate_columns(
        read_csv(out_m / "certificates.csv")
    )
    # a cached denoiser stage of another method is refused clearly
    (den,) = stages.glob("denoiser_mse/*/last.ckpt")
    p = run_cli(
        "ssn_exp",
        *common[:1],
        "method=uniform",
        f"denoiser.stage_root={stages}",
        *SMALL,
        "denoiser=mse",
        f"denoiser.denoiser_ckpt={den}",
        f"hydra.run.dir={tmp_path / 'bad'}",
    )
    assert p.returncode == 2 and "is not a denoiser for uniform" in p.stderr
    # the report compares the variants (Figure 9)
    rep = tmp_path / "report"
    p = run_cli("ssn_exp.report", str(out_s), str(out_m), str(out_r), "--out", str(rep))
    assert p.returncode == 0, p.stderr
    assert (rep / "denoisers_digits_standard.png").stat().st_size > 5000
    assert "mse_retrain" in (rep / "denoisers.md").read_text()


def test_parallel_jobs_share_one_stage_training(tmp_path):
    """Two jobs started together that need the same clean classifier: one trains it, the other waits and reuses."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "WANDB_MODE": "offline"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ssn_exp",
                "debug=fast",
                "denoiser=mse",
                f"sigma={s}",
                *SMALL,
                f"denoiser.stage_root={tmp_path / 'stages'}",
                f"hydra.run.dir={tmp_path / str(s)}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for s in (0.5, 1.0)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    text = "\n".join(logs)
    assert text.count("training stage clean") == 1 and text.count("reusing stage clean") == 1
    assert len(list((tmp_path / "stages" / "clean").iterdir())) == 1
