"""A certificate procedure defined entirely outside ssn_exp (issue 25, "The proof"): the module
tests/plugins/hoeffding.py (the fixed-sample protocol with Hoeffding's lower bound) and its YAML
tests/plugins/conf/procedure/hoeffding.yaml on the user's ``hydra.searchpath`` train and certify, resume after a stop
mid-certification (the rows read back checked by the procedure's own rule: a forged row is refused in one line),
certify a checkpoint with the other entry point, and appear in metrics.json, wandb's summary and the report, named
with their settings. Nothing in ``ssn_exp`` knows it (docs/extending.md, "A procedure of your own")."""

from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import (
    PLUGINS,
    certificate_columns,
    compose_config,
    one_error_line,
    read_csv,
    read_metrics,
    read_wandb_offline,
    run_cli,
    same_metrics,
)

SIGMA = 0.5
N = 256  # procedure.n: estimation samples per example (debug=fast sizes)


@pytest.fixture(scope="module")
def user_procedure(tmp_path_factory):
    """The CLI runs over the user's procedure (shared by the checks of this module)."""
    base = tmp_path_factory.mktemp("user_procedure")
    runs, work, cert = base / "runs", base / "work", base / "cert"
    work.mkdir()
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": str(PLUGINS) + (os.pathsep + path if path else "")}
    searchpath = f"hydra.searchpath=[file://{PLUGINS / 'conf'}]"
    train = ("ssn_exp", "debug=fast", "method=uniform", "procedure=hoeffding", f"procedure.n={N}", f"sigma={SIGMA}",
             "logger=wandb", searchpath, f"run_root={runs}")  # fmt: skip

    def cli(module, *args):
        return run_cli(module, *args, cwd=work, env=env, timeout=300)

    first = cli(*train)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = [m.parent for m in runs.rglob("metrics.json")]
    state = {"run": run, "rows": read_csv(run / "certificates.csv"), "metrics": read_metrics(run)}
    state["wandb"] = read_wandb_offline(run)
    shutil.copytree(runs, base / "report_in" / "runs")  # the report reads a copy: the run is stopped and resumed below
    ckpt = run / "checkpoints" / "last.ckpt"
    csv_path, text = run / "certificates.csv", (run / "certificates.csv").read_text()
    lines = text.splitlines(keepends=True)
    # stopped mid-certification: three rows written, the fourth torn, no metrics.json yet
    stopped = "".join(lines[:4]) + lines[4][: len(lines[4]) // 2]
    forged = lines[:4]
    forged[2] = _forged(lines[0], lines[2])  # the second row as procedure=fixed would write it (Clopper-Pearson)
    with ThreadPoolExecutor(max_workers=2) as pool:
        # the same weights certified by procedure=fixed through the other entry point, beside it in the report
        fixed = pool.submit(cli, "ssn_exp.certify", f"ckpt={ckpt}", "debug=fast", "procedure=fixed",
                            f"procedure.n={N}", f"hydra.run.dir={base / 'report_in' / 'fixed'}")  # fmt: skip
        (run / "metrics.json").unlink()
        state["forged_written"] = "".join(forged)
        csv_path.write_text(state["forged_written"])
        state["forged"] = cli(*train)
        state["forged_csv"] = csv_path.read_text()
        csv_path.write_text(stopped)
        state["resumed"] = cli(*train)
        # the checkpoint certified by the certify entry point with the user's procedure
        state["cert"] = cli("ssn_exp.certify", f"ckpt={ckpt}", "debug=fast", "procedure=hoeffding", f"procedure.n={N}",
                            searchpath, f"hydra.run.dir={cert}")  # fmt: skip
        state["fixed"] = fixed.result()
    assert state["fixed"].returncode == 0, state["fixed"].stderr[-3000:]
    state["report"] = cli("ssn_exp.report", str(base / "report_in"), "--out", str(base / "report"))
    state.update(cert_dir=cert, fixed_dir=base / "report_in" / "fixed", report_in=base / "report_in",
                 report_dir=base / "report", ckpt=ckpt)  # fmt: skip
    return state


def _hoeffding(n_a: int, n: int = N, alpha: float = 0.001) -> float:
    """Hoeffding's one-sided lower bound, written here from the formula."""
    return max(n_a / n - math.sqrt(math.log(1 / alpha) / (2 * n)), 0.0)


def _counts(row: dict) -> dict[int, int]:
    return {int(c): int(v) for c, v in (item.split(":") for item in row["counts"].split())}


def _forged(header: str, line: str) -> str:
    """``line`` with p_lower and the radii of the Clopper-Pearson bound: what procedure=fixed writes for its counts."""
    from ssn_exp.certify.core import clopper_pearson_lower
    from ssn_exp.noises import Uniform

    names, cells = header.strip().split(","), line.rstrip("\n").split(",")
    row = dict(zip(names, cells, strict=True))
    p = float(clopper_pearson_lower(_counts(row).get(int(row["prediction"]), 0), N, 0.001))
    lam = Uniform(SIGMA).lam
    radius = repr(2 * lam * (p - 0.5))
    row.update(p_lower=repr(p), radius=radius, radius_box=radius)  # (a box radius as large as the radius: valid)
    assert row != dict(zip(names, cells, strict=True))
    return ",".join(row[c] for c in names) + "\n"


def _follow_its_rule(rows: list[dict]) -> None:
    lam = math.sqrt(3) * SIGMA
    for r in rows:
        counts = _counts(r)
        assert sum(counts.values()) == N
        p = float(r["p_lower"])
        assert p == pytest.approx(_hoeffding(counts.get(int(r["prediction"]), 0)), abs=1e-12)
        assert float(r["radius"]) == pytest.approx(2 * lam * (p - 0.5), abs=1e-12)


def _it_trains_and_certifies_by_its_own_rule(s):
    rows = s["rows"]
    assert len(rows) == 8 and list(rows[0]) == [
        *"index label prediction correct radius seconds p_lower radius_box counts".split()
    ]
    _follow_its_rule(rows)
    m = s["metrics"]
    # named in metrics.json with its settings (its describe()), its forward passes and the noise it certified
    assert (m["procedure"], m["n0"], m["n"], m["alpha"], m["method"]) == ("hoeffding", 64, N, 0.001, "uniform")
    assert m["forward_passes_per_example"] == 64 + N
    assert m["n_examples"] == 8 and "certified_accuracy_box" in m
    # and in wandb's offline summary
    for key in ("procedure", "n0", "n", "alpha", "method", "acr", "forward_passes_per_example"):
        assert s["wandb"]["summary"][key] == m[key], key


def _it_is_looser_than_clopper_pearson_on_the_same_votes(s):
    """The same weights, seed and sample sizes give procedure=fixed the same votes; Hoeffding's bound is lower."""
    fixed = read_csv(s["fixed_dir"] / "certificates.csv")
    assert [_counts(r) for r in fixed] == [_counts(r) for r in s["rows"]]
    assert all(float(h["p_lower"]) < float(f["p_lower"]) for h, f in zip(s["rows"], fixed, strict=True))
    assert read_metrics(s["fixed_dir"])["procedure"] == "fixed"


def _a_forged_row_is_refused_by_its_own_rule(s):
    line = one_error_line(s["forged"])
    assert "certificates.csv line 3: malformed certificate row (p_lower is not Hoeffding's bound" in line, line
    assert s["forged_csv"] == s["forged_written"]  # a refused rerun changes nothing


def _it_resumes_after_a_stop_mid_certification(s):
    p = s["resumed"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in (s["run"] / "ssn_exp.log").read_text()
    rows = read_csv(s["run"] / "certificates.csv")
    assert rows[:3] == s["rows"][:3]  # the rows read back are kept as they were (seconds included)
    assert certificate_columns(rows) == certificate_columns(s["rows"])  # the rest certified again, the same
    same_metrics(read_metrics(s["run"]), s["metrics"])


def _its_checkpoint_is_certified_by_the_certify_entry_point(s):
    p = s["cert"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert certificate_columns(read_csv(s["cert_dir"] / "certificates.csv")) == certificate_columns(s["rows"])
    assert read_metrics(s["cert_dir"])["procedure"] == "hoeffding"


def _it_is_in_the_report_tables_and_curves(s):
    from ssn_exp.report.plots import curves_figure
    from ssn_exp.report.records import load_paths, tell_procedures_apart

    p = s["report"]
    assert p.returncode == 0, p.stderr[-3000:]
    rep = s["report_dir"]
    methods = {r["method"] for r in read_csv(rep / "best_over_sigma.csv")}
    assert {"uniform [hoeffding]", "uniform [fixed]", "uniform [hoeffding] (box)"} <= methods
    assert "| uniform [hoeffding] |" in (rep / "best_over_sigma.md").read_text()
    assert "uniform [hoeffding]" in (rep / "acr.md").read_text()
    assert (rep / "curves_digits_standard_none.png").stat().st_size > 5000
    records, problems = load_paths([s["report_in"]])
    assert problems == []
    fig = curves_figure(tell_procedures_apart(records))
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert {"Uniform [hoeffding] (ours)", "Uniform [fixed] (ours)"} <= labels


@pytest.mark.slow
def test_a_user_procedure_end_to_end(user_procedure):
    """One test over the shared CLI runs (a module fixture used by several tests would run once per xdist worker)."""
    s = user_procedure
    _it_trains_and_certifies_by_its_own_rule(s)
    _it_is_looser_than_clopper_pearson_on_the_same_votes(s)
    _a_forged_row_is_refused_by_its_own_rule(s)
    _it_resumes_after_a_stop_mid_certification(s)
    _its_checkpoint_is_certified_by_the_certify_entry_point(s)
    _it_is_in_the_report_tables_and_curves(s)


def test_its_rows_are_checked_by_its_own_rule_in_process():
    """The read-back check of the user's procedure, without the CLI: its rows pass, a Clopper-Pearson row does not,
    and procedure=fixed refuses its rows in turn."""
    import torch

    from helpers import plugin
    from ssn_exp.certify.procedures import FixedSample
    from ssn_exp.certify.record import CertificateRecord
    from ssn_exp.noises import Uniform

    hoeffding = plugin("hoeffding").Hoeffding(n0=8, n=N)
    noise = Uniform(SIGMA)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    record = CertificateRecord(noise, hoeffding)
    cert = hoeffding.certify(model, x, noise, 3, noise_batch=64, generator=gens)
    rows = record.rows([0, 1, 2], [0, 1, 2], cert, seconds=0.0)
    text = {k: str(v) for k, v in rows[0].items()}
    assert record.check(text, 3) == 0
    n_a = _counts(text).get(int(text["prediction"]), 0)
    assert float(text["p_lower"]) == pytest.approx(_hoeffding(n_a))
    forged = dict(zip(text, _forged(",".join(text), ",".join(text.values())).strip().split(","), strict=True))
    with pytest.raises(ValueError, match="Hoeffding's bound"):
        record.check(forged, 3)
    fixed = CertificateRecord(noise, FixedSample(n0=8, n=N))
    assert fixed.check(forged, 3) == 0  # a row procedure=fixed accepts ...
    with pytest.raises(ValueError, match="p_lower does not follow"):  # ... and the other way round
        fixed.check(text, 3)
    assert np.all(cert.counts.sum(axis=1) == N)


def test_the_plan_names_the_user_s_procedure(monkeypatch):
    """``python -m ssn_exp.sweep`` plans forward passes by the procedure's own count, or, where that depends on the
    data, estimates them under the procedure's own name (not "sequential")."""
    import importlib

    from ssn_exp.cli.plan import _job_cost

    monkeypatch.syspath_prepend(str(PLUGINS))
    cfg = compose_config(["method=uniform", "procedure=hoeffding", f"hydra.searchpath=[file://{PLUGINS / 'conf'}]"])
    hoeffding = importlib.import_module("hoeffding")
    cost = _job_cost(cfg, [])
    assert (cost["how"], cost["passes"]) == ("hoeffding", 64 + 100_000)
    monkeypatch.setattr(hoeffding.Hoeffding, "forward_passes", lambda self, noise: None)
    assert _job_cost(cfg, [])["how"] == "hoeffding, estimated"
