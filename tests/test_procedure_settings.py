"""The procedure owns its settings: metrics.json and certify_settings.json name what the procedure object ran
(``procedure.n`` given explicitly wins over ``certify.n``, its default), and ``certify.progress=false`` is honoured
by both entry points."""

from __future__ import annotations

import json

from helpers import FAST, read_metrics, run_cli, succeeded


def test_results_name_the_procedures_settings_and_progress_false_is_quiet(tmp_path):
    run, cert = tmp_path / "run", tmp_path / "cert"
    quiet = ["certify.progress=false", "certify.max_examples=2", "certify.n0=8"]
    p = succeeded(run_cli("ssn_exp", *FAST, "method=uniform", "procedure=fixed", "procedure.n=40", "certify.n=100",
                    *quiet, f"hydra.run.dir={run}"))  # fmt: skip
    m = read_metrics(run)
    assert (m["n0"], m["n"], m["forward_passes_per_example"]) == (8, 40, 48)  # what ran, not certify.n
    assert json.loads((run / "certify_settings.json").read_text())["n"] == 40
    p = succeeded(run_cli("ssn_exp.certify", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "procedure=sequential",
                    "procedure.n=64", "procedure.bound=kt", "procedure.radii=[0.25]", *quiet,
                    f"hydra.run.dir={cert}"))  # fmt: skip
    m = read_metrics(cert)
    assert (m["procedure"], m["n"], m["bound"], m["radii"], m["max_batch"]) == ("sequential", 64, "kt", [0.25], 1024)
    assert json.loads((cert / "certify_settings.json").read_text())["bound"] == "kt"
    assert "img (" not in p.stdout + p.stderr, "certify.progress=false still reported progress"
