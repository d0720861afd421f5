"""The procedure owns its settings (procedure.n0 / n / alpha; issue 25): metrics.json and certify_settings.json name
what the procedure object ran, the old spelling certify.n warns once and means procedure.n, and
``certify.progress=false`` is honoured by both entry points."""

from __future__ import annotations

import json

from helpers import FAST, read_metrics, run_cli, succeeded


def test_results_name_the_procedures_settings_and_progress_false_is_quiet(tmp_path):
    run, cert = tmp_path / "run", tmp_path / "cert"
    quiet = ["certify.progress=false", "certify.max_examples=2", "procedure.n0=8"]
    p = succeeded(run_cli("ssn_exp", *FAST, "method=uniform", "procedure=fixed", "procedure.n=40", *quiet,
                    f"hydra.run.dir={run}"))  # fmt: skip
    m = read_metrics(run)
    assert (m["n0"], m["n"], m["forward_passes_per_example"]) == (8, 40, 48)  # what ran
    assert json.loads((run / "certify_settings.json").read_text())["n"] == 40
    p = succeeded(run_cli("ssn_exp.certify", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "procedure=sequential",
                    "procedure.n=64", "procedure.bound=kt", "procedure.radii=[0.25]", *quiet,
                    f"hydra.run.dir={cert}"))  # fmt: skip
    m = read_metrics(cert)
    assert (m["procedure"], m["n"], m["bound"], m["radii"], m["max_batch"]) == ("sequential", 64, "kt", [0.25], 1024)
    assert json.loads((cert / "certify_settings.json").read_text())["bound"] == "kt"
    assert "img (" not in p.stdout + p.stderr, "certify.progress=false still reported progress"


def _rows(path):
    from helpers import read_csv

    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_csv(path)]


def test_the_old_spelling_certify_n_warns_once_and_certifies_as_procedure_n(tmp_path):
    from helpers import run_cli_many

    old, new = tmp_path / "old", tmp_path / "new"
    common = [*FAST, "method=uniform", "certify.max_examples=3", "certify.progress=false"]
    p_old, p_new = run_cli_many([
        ("ssn_exp", [*common, "certify.n=100", "certify.n0=16", "certify.alpha=0.01", f"hydra.run.dir={old}"]),
        ("ssn_exp", [*common, "procedure.n=100", "procedure.n0=16", "procedure.alpha=0.01", f"hydra.run.dir={new}"]),
    ])  # fmt: skip
    succeeded(p_old), succeeded(p_new)
    warnings = [line for line in p_old.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: certify.n0 is deprecated; use procedure.n0=16",
        "warning: certify.n is deprecated; use procedure.n=100",
        "warning: certify.alpha is deprecated; use procedure.alpha=0.01",
    ]
    assert "deprecated" not in p_new.stderr
    assert _rows(old / "certificates.csv") == _rows(new / "certificates.csv")
    m_old, m_new = read_metrics(old), read_metrics(new)
    assert (m_old["n0"], m_old["n"], m_old["alpha"]) == (16, 100, 0.01)
    drop = ("seconds_per_example", "seconds", "created", "wall_seconds")
    assert {k: v for k, v in m_old.items() if k not in drop} == {k: v for k, v in m_new.items() if k not in drop}
    assert (old / "certify_settings.json").read_bytes() == (new / "certify_settings.json").read_bytes()


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from ssn_exp.cli.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_an_explicit_procedure_n_wins_over_the_old_spelling_and_exact_ignores_it(capsys):
    from ssn_exp.cli import config
    from ssn_exp.cli.common import build_noise, build_procedure

    config._warned.clear()
    overrides = ["method=uniform", "procedure=fixed", "certify.n=100", "procedure.n=40"]
    cfg = _compose(overrides)
    config.apply_deprecated(cfg, {"certify.n", "procedure.n"})
    config.apply_deprecated(cfg, {"certify.n", "procedure.n"})  # once: the old value is spent
    assert build_procedure(cfg, build_noise(cfg.method)).n == 40
    assert capsys.readouterr().err == "warning: certify.n is deprecated and ignored: procedure.n=40 wins\n"
    cfg = _compose(["procedure=exact", "certify.n=100"])
    config.apply_deprecated(cfg, {"certify.n"})
    assert "n" not in cfg.procedure and build_procedure(cfg).describe() == {}
    assert build_procedure(_compose(["debug=fast", "procedure=exact"])).describe() == {}  # debug's n: not exact's
    assert "use procedure.n=100 (ignored here: this procedure takes no n)" in capsys.readouterr().err
    cfg = _compose(["method=uniform", "debug=fast", "certify.n=100"])  # a config file's procedure.n: replaced
    config.apply_deprecated(cfg, {"certify.n", "debug"})
    assert cfg.procedure.n == 100 and cfg.certify.n is None


def test_a_bad_value_in_the_old_spelling_is_refused_naming_procedure_n(tmp_path):
    p = run_cli("ssn_exp", *FAST, "method=uniform", "certify.n=0", f"hydra.run.dir={tmp_path / 'run'}")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[0] == "warning: certify.n is deprecated; use procedure.n=0", p.stderr
    assert "procedure.n must be an integer >= 1, got 0" in lines[1] and len(lines) == 2
    assert not (tmp_path / "run").exists()
