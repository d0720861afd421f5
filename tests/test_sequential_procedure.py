"""procedure=sequential (issue 18) through the one certification driver: in-process ShardCertifier runs (equal
results whatever the batching, sharding or resuming; every row read back checked), the exact validity of the
implemented stopping rule and schedule, the forward-pass statistics of metrics.json, and one CLI run."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import cert_rows, read_csv, run_cli
from helpers import compose_config as _compose
from sequential_sim import false_certificate_probability
from ssn_exp.certify.core import NonFiniteLogitsError
from ssn_exp.certify.procedures import FixedSample, ProcedureError
from ssn_exp.certify.procedures_sequential import Sequential
from ssn_exp.certify.record import SAMPLES_COLUMN, CertificateRecord
from ssn_exp.certify.sequential import PackingScheduler, SequentialStream
from ssn_exp.certify.sequential_bounds import Schedule, SequentialTest, thresholds_for_radii
from ssn_exp.lightning.certification import open_certifier
from ssn_exp.lightning.results import ResultsFileError, merge_shards, summarize
from ssn_exp.noises import DSSN, SSN, Laplace, Uniform

N_EX = 10


def _data(n=N_EX, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 17, (n, 1, 8, 8), generator=g).double() / 16
    y = torch.randint(0, 10, (n,), generator=g)
    with torch.no_grad():
        y[::2] = _model()(x[::2]).argmax(dim=1)  # half the labels are the model's: some certificates are correct
    return TensorDataset(x, y)


def _model():
    """A fixed linear classifier in float64 (no batch-dependent rounding), sharp enough that examples stop at
    different sample counts."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double().eval()
    with torch.no_grad():
        net[1].weight.mul_(5.0)
    return net


def _procedure(**kw):
    kw = {"n0": 16, "n": 600, "alpha": 0.01, "radii": [0.0, 0.25, 0.5], "first_batch": 16, "max_batch": 128, **kw}
    return Sequential(**kw)


def _certifier(out, noise=None, procedure=None, **kw):
    kw = {"num_classes": 10, "noise_batch": 100, "batch_size": 4, **kw}
    return open_certifier(
        kw.pop("model", None) or _model(),
        noise or Uniform(0.5),
        kw.pop("ds", None) or _data(),
        out,
        procedure=procedure or _procedure(),
        **kw,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The certificates of all examples, one process, the default batching."""
    out = tmp_path_factory.mktemp("ref")
    _certifier(out).run("cpu", progress=False)
    return out, cert_rows(out / "certificates.csv")


def test_rows_have_the_samples_column_and_examples_stop_at_different_counts(reference):
    _, rows = reference
    assert list(rows[0]) == [
        "index",
        "label",
        "prediction",
        "correct",
        "radius",
        "p_lower",
        SAMPLES_COLUMN,
        "radius_box",
        "counts",
    ]
    samples = [int(r[SAMPLES_COLUMN]) for r in rows]
    test = _procedure().test(Uniform(0.5))
    assert len(set(samples)) > 2 and min(samples) < 16 + 600 and max(samples) <= 16 + 600
    assert all(s - 16 in test.checkpoints for s in samples)  # selection + a check point of the schedule
    assert any(float(r["radius"]) >= 0.25 for r in rows) and any(float(r["radius"]) < 0 for r in rows)


@pytest.mark.parametrize("batch_size,noise_batch", [(1, 37), (10, 1000)])
def test_certificates_do_not_depend_on_batching(tmp_path, reference, batch_size, noise_batch):
    _certifier(tmp_path, batch_size=batch_size, noise_batch=noise_batch).run("cpu", progress=False)
    assert cert_rows(tmp_path / "certificates.csv") == reference[1]


class _Counted(torch.nn.Module):
    """The test model, recording the inputs of every forward pass."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = _model(), []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.net(x)


def test_examples_are_packed_across_certification_steps(tmp_path, reference):
    """An example that finishes is replaced at once by the next one, so the forward passes stay full until the
    data runs dry; certifying one step (certify.batch_size) at a time would leave part-empty passes at the end of
    every step. The certificates are the same, and the rows end in index order."""
    streamed, stepwise = _Counted(), _Counted()
    _certifier(tmp_path / "a", model=streamed).run("cpu", progress=False)  # 4 examples in flight
    one = _certifier(tmp_path / "b", model=stepwise)
    for chunk in one.chunks():  # one step at a time
        one.run_chunk(chunk, torch.device("cpu"))
    assert (
        cert_rows(tmp_path / "a" / "certificates.csv") == cert_rows(tmp_path / "b" / "certificates.csv") == reference[1]
    )
    assert sum(streamed.calls) == sum(stepwise.calls)  # the same samples ...
    assert len(streamed.calls) < len(stepwise.calls)  # ... in fewer, fuller forward passes (noise_batch=100)
    assert sum(c < 100 for c in streamed.calls) < 0.5 * sum(c < 100 for c in stepwise.calls)


def test_sharded_certification_merges_to_the_single_process_result(tmp_path, reference):
    for rank in range(3):
        _certifier(tmp_path, rank=rank, world_size=3).run("cpu", progress=False)
    merge_shards(tmp_path, 3, CertificateRecord(Uniform(0.5), _procedure()))
    assert cert_rows(tmp_path / "certificates.csv") == reference[1]


def test_resume_certifies_exactly_the_missing_examples(tmp_path, reference):
    first = _certifier(tmp_path)
    first.run_chunk(first.chunks()[0], torch.device("cpu"))  # then the job dies
    again = _certifier(tmp_path)  # every row read back is checked by the procedure
    assert again.todo == list(range(4, N_EX))
    again.run("cpu", progress=False)
    assert cert_rows(tmp_path / "certificates.csv") == reference[1]


def test_metrics_report_the_forward_passes_of_the_samples_column(tmp_path, reference):
    out, rows = reference
    samples = np.array([int(r[SAMPLES_COLUMN]) for r in rows])
    m = summarize(out, CertificateRecord(Uniform(0.5), _procedure()), {}, [0.0, 0.25], plot=False)
    assert m["forward_passes_per_example"] == pytest.approx(samples.mean())
    assert m["forward_passes_median"] == pytest.approx(np.median(samples))
    assert m["forward_passes_p90"] == pytest.approx(np.percentile(samples, 90))
    assert json.loads((out / "metrics.json").read_text())["forward_passes_per_example"] == pytest.approx(samples.mean())
    fixed = FixedSample(n0=16, n=600)
    assert fixed.forward_passes(Uniform(0.5)) == 616 and _procedure().forward_passes(Uniform(0.5)) is None


def test_settings_are_recorded_and_other_settings_refused(tmp_path, reference):
    out, _ = reference
    settings = json.loads((out / "certify_settings.json").read_text())
    assert settings["procedure"] == "sequential" and settings["radii"] == [0.0, 0.25, 0.5]
    assert (settings["bound"], settings["first_batch"], settings["max_batch"]) == ("union", 16, 128)
    with pytest.raises(ResultsFileError, match="other settings.*radii"):
        _certifier(out, procedure=_procedure(radii=[0.0, 0.5]))
    # the fixed protocol's certificates and the sequential ones never share a directory, either way round
    before = (out / "certify_settings.json").read_text()
    with pytest.raises(ResultsFileError, match="other settings.*procedure: 'sequential' -> None"):
        open_certifier(_model(), Uniform(0.5), _data(), out, num_classes=10, n0=16, n=600, alpha=0.01)
    assert (out / "certify_settings.json").read_text() == before  # the refused attempt wrote nothing
    fixed = tmp_path / "fixed"
    open_certifier(_model(), Uniform(0.5), _data(3), fixed, num_classes=10, n0=16, n=600, alpha=0.01).run(
        "cpu", progress=False
    )
    with pytest.raises(ResultsFileError, match="other settings.*procedure: None -> 'sequential'"):
        _certifier(fixed, ds=_data(3))


def test_select_label_tests_the_label_without_selection_samples(tmp_path, reference):
    _certifier(tmp_path, procedure=_procedure(select="label")).run("cpu", progress=False)
    rows = read_csv(tmp_path / "certificates.csv")
    test = _procedure().test(Uniform(0.5))
    for r in rows:
        assert int(r[SAMPLES_COLUMN]) in test.checkpoints  # no n0 samples
        if float(r["radius"]) >= 0:
            assert r["prediction"] == r["label"]  # a certified radius is the label's
        else:  # elsewhere the majority of the test's votes (lowest class on ties), not the label
            votes = dict(item.split(":") for item in r["counts"].split())
            most = max(int(v) for v in votes.values())
            assert int(r["prediction"]) == min(int(c) for c, v in votes.items() if int(v) == most)
    assert any(r["correct"] == "0" for r in rows)  # clean accuracy is not the label's by construction
    ref = {r["index"]: r for r in reference[1]}
    certified = [r for r in rows if float(r["radius"]) >= 0.25]
    assert certified and all(ref[r["index"]]["correct"] == "1" for r in certified)
    with pytest.raises(ProcedureError) as info:
        _procedure(select="label").certify(_model(), _data()[0][0][None], Uniform(0.5), 10)
    assert str(info.value) == (
        "procedure.select=label tests each example's label, and no labels were given; "
        "use procedure.select=top to certify inputs without labels"
    )


def _tamper(out, reference, column, value, procedure=None, row=1):
    import shutil

    src = reference[0]
    shutil.copy(src / "certify_settings.json", out / "certify_settings.json")
    lines = (src / "certificates.csv").read_text().splitlines(keepends=True)
    header = lines[0].strip().split(",")
    cells = lines[row].rstrip("\n").split(",")
    for c, v in [(column, value)] if isinstance(column, str) else zip(column, value, strict=True):
        cells[header.index(c)] = v(cells[header.index(c)]) if callable(v) else v
    lines[row] = ",".join(cells) + "\n"
    (out / "certificates.csv").write_text("".join(lines))
    with pytest.raises(ResultsFileError) as info:
        _certifier(out, procedure=procedure)
    assert "\n" not in str(info.value) and "certificates.csv line" in str(info.value)
    return str(info.value)


def _lower_certified_row(reference):
    """A row whose radius is certified >= 0 and that stopped before the cap (index in the file, row)."""
    for j, r in enumerate(reference[1], start=1):
        if float(r["radius"]) > 0 and int(r[SAMPLES_COLUMN]) < 16 + 600:
            return j, r
    raise AssertionError("no such row")


def test_rows_read_back_are_checked(tmp_path, reference):
    j, _ = _lower_certified_row(reference)
    lam = Uniform(0.5).lam
    # p_lower and radius raised together: the counts do not allow it
    up = repr(2 * lam * 0.499)
    msg = _tamper(tmp_path, reference, ("p_lower", "radius", "radius_box"), ("0.999", up, up), row=j)
    assert "above what the counts" in msg
    # lowered together: below the bound of the counts at the last look
    down = repr(-lam)
    msg = _tamper(tmp_path, reference, ("p_lower", "radius", "radius_box"), ("0.0", down, down), row=j)
    assert "below the bound" in msg
    assert _tamper(tmp_path, reference, "radius", "0.01", row=j).endswith("(p_lower and radius disagree)")
    msg = _tamper(tmp_path, reference, SAMPLES_COLUMN, lambda v: str(int(v) + 1), row=j)
    t, s = map(int, re.search(r"counts sum to (\d+), not samples - n0 = (\d+)\)$", msg).groups())
    assert s == t + 1
    proc = _procedure()
    msg = _tamper(tmp_path, reference, SAMPLES_COLUMN, "0", row=j)
    assert msg.endswith(f"(samples 0 outside [1, {proc.n0 + proc.n}])")
    msg = _tamper(tmp_path, reference, SAMPLES_COLUMN, str(proc.n0 + proc.n + 1), row=j)
    assert msg.endswith(f"(samples {proc.n0 + proc.n + 1} outside [1, {proc.n0 + proc.n}])")
    # one more sample and one more vote: consistent, but not a check point of the schedule
    msg = _tamper(
        tmp_path, reference, (SAMPLES_COLUMN, "counts"), (lambda v: str(int(v) + 1), lambda c: _add_vote(c, 9)), row=j
    )
    assert "check point" in msg
    assert "box" in _tamper(tmp_path, reference, "radius_box", "-5.0", row=j)
    # a row of the fixed protocol (no samples column) is refused for a sequential certification
    assert "columns" in _tamper_header(tmp_path, reference)


def test_a_raised_p_lower_is_refused_on_every_row(reference):
    """p_lower is one of the test's own bounds on a path that stops at the row's samples: raised by 1e-6 (radius and
    radius_box along with it, so only the counts can tell), it is refused on every row."""
    noise, proc = Uniform(0.5), _procedure()
    record = CertificateRecord(noise, proc)
    for row in reference[1]:
        record.check({**row, "seconds": "0.1"}, 10)
        p = float(row["p_lower"]) + 1e-6
        radius = repr(float(noise.radius(np.array([p]))[0]))
        forged = {**row, "seconds": "0.1", "p_lower": repr(p), "radius": radius, "radius_box": radius}
        with pytest.raises(ValueError, match="p_lower"):
            record.check(forged, 10)
    # p_lower = 1 (never a bound of the counts) with its own radius: in range, refused by the counts
    radius = repr(float(noise.radius(np.array([1.0]))[0]))
    forged = {**row, "seconds": "0.1", "p_lower": "1.0", "radius": radius, "radius_box": radius}
    with pytest.raises(ValueError, match="p_lower is above what the counts of the prediction allow"):
        record.check(forged, 10)


def _add_vote(counts: str, cls: int) -> str:
    votes = dict(item.split(":") for item in counts.split())
    votes[str(cls)] = str(int(votes.get(str(cls), "0")) + 1)
    return " ".join(f"{c}:{v}" for c, v in sorted(votes.items(), key=lambda kv: int(kv[0])))


def _tamper_header(out, reference):
    import shutil

    shutil.copy(reference[0] / "certify_settings.json", out / "certify_settings.json")
    text = (reference[0] / "certificates.csv").read_text().replace(f",{SAMPLES_COLUMN},", ",n,", 1)
    (out / "certificates.csv").write_text(text)
    with pytest.raises(ResultsFileError) as info:
        _certifier(out)
    return str(info.value)


def test_label_rows_are_checked(tmp_path):
    out = tmp_path / "label"
    proc = _procedure(select="label")
    _certifier(out, procedure=proc).run("cpu", progress=False)
    rows = read_csv(out / "certificates.csv")
    j = next(i for i, r in enumerate(rows, start=1) if float(r["radius"]) < 0)
    lines = (out / "certificates.csv").read_text().splitlines(keepends=True)
    header = lines[0].strip().split(",")
    cells = lines[j].rstrip("\n").split(",")
    counts = dict(item.split(":") for item in cells[header.index("counts")].split())
    other = next(c for c in map(str, range(10)) if c != cells[header.index("prediction")] and c in counts)
    cells[header.index("prediction")] = other  # not the majority of the votes, and not certified
    cells[header.index("correct")] = str(int(other == cells[header.index("label")]))
    lines[j] = ",".join(cells) + "\n"
    (out / "certificates.csv").write_text("".join(lines))
    with pytest.raises(
        ResultsFileError, match=r"\(the prediction is neither a certified label nor the majority of the counts\)$"
    ):
        _certifier(out, procedure=proc)
    # a certified row (the test ran on the label) moved to another class, votes and all: not what the test wrote
    lines = [",".join(header) + "\n"] + [",".join(r[c] for c in header) + "\n" for r in rows]
    j = next(i for i, r in enumerate(rows, start=1) if float(r["radius"]) >= 0)
    row = dict(rows[j - 1])
    votes = dict(item.split(":") for item in row["counts"].split())
    other = next(c for c in map(str, range(10)) if c != row["label"] and c not in votes)
    votes[other] = votes.pop(row["label"])
    row.update(prediction=other, correct="0")
    row["counts"] = " ".join(f"{c}:{v}" for c, v in sorted(votes.items(), key=lambda kv: int(kv[0])))
    lines[j] = ",".join(row[c] for c in header) + "\n"
    (out / "certificates.csv").write_text("".join(lines))
    with pytest.raises(ResultsFileError, match=r"\(a certified row of select=label must predict its label\)$"):
        _certifier(out, procedure=proc)


def test_nan_logits_name_the_test_example(tmp_path):
    class NanOnBright(torch.nn.Module):
        def forward(self, x):
            out = _model()(x)
            out[x.reshape(x.shape[0], -1).mean(dim=1) > 0.8] = float("nan")
            return out

    ds = _data()
    ds.tensors[0][6] = 1.0  # example 6 is white: its noisy copies average ~1
    with pytest.raises(NonFiniteLogitsError, match=r"test example\(s\) \[6\]"):
        _certifier(tmp_path, ds=ds, model=NanOnBright()).run("cpu", progress=False)
    kept = [int(r["index"]) for r in read_csv(tmp_path / "certificates.csv")]
    # nothing lost: the examples that finished before example 6 failed keep their rows (those in flight do not)
    assert kept and 6 not in kept and len(set(kept)) == len(kept)


def test_bad_settings_and_enumerated_noises_are_refused_in_one_line():
    with pytest.raises(ProcedureError, match="procedure=sequential cannot certify dssn noise"):
        _certifier("/nonexistent/never", noise=DSSN(0.5, q=16, dim=64))
    for kw, match in [
        ({"alpha": 0.0}, "alpha"),
        ({"n": 0}, "procedure.n must"),
        ({"select": "top1"}, "procedure.select"),
        ({"bound": "hoeffding"}, "procedure.bound"),
        ({"radii": [0.5, float("nan")]}, "procedure.radii"),
        ({"radii": [-1.0]}, "procedure.radii"),
        ({"tolerance": 0}, "procedure.tolerance"),
        ({"first_batch": 64, "max_batch": 32}, "max_batch"),
        ({"beta": 1.5}, "beta"),
        # every level a look spends is a normal float: alpha / 101 underflows here
        ({"alpha": 5e-324}, "procedure.alpha=5e-324 is too small"),
        ({"alpha": 1e-306}, "procedure.alpha=1e-306 is too small"),
        ({"beta": 5e-324}, "procedure.beta=5e-324 is too small"),
        # a schedule too long to precompute is refused before it is built (at once, whatever n)
        ({"n": 2**60}, "looks of batches up to 1024, more than"),
        ({"n": 10**12}, "looks of batches up to 1024, more than"),
    ]:
        with pytest.raises(ProcedureError, match=match) as info:
            Sequential(**kw)
        assert "\n" not in str(info.value)
    Sequential(alpha=1e-300)  # tiny but every level normal: accepted (the bounds guard their own inversion)


def test_ssn_is_certified_too(tmp_path):
    _certifier(tmp_path, noise=SSN(0.5), batch_size=10).run("cpu", progress=False)
    rows = read_csv(tmp_path / "certificates.csv")
    assert len(rows) == N_EX and all(float(r["radius_box"]) >= float(r["radius"]) for r in rows)


# -- validity of what is implemented -----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_the_default_procedure_never_certifies_falsely_with_probability_above_alpha(alpha, sigma):
    """The exact DP over the counts on the procedure's own test (default schedule 32 ... 1024, cap 100,000, bound,
    thresholds of the default radii under the noise's radius): the probability that a stream with p exactly on a
    threshold, or just below it, ever reaches a certificate there. It bounds every stopping rule on this schedule,
    the default 'decide every radius' included."""
    proc = Sequential(alpha=alpha)
    noise = Uniform(sigma)
    test = proc.test(noise)
    assert (test.schedule.first, test.schedule.max_batch, test.schedule.cap, test.bound) == (32, 1024, 100_000, "union")
    finite = test.thresholds[np.isfinite(test.thresholds)]
    assert len(finite) >= 3  # radii 0, 0.25, 0.5 (and more at sigma = 1) are reachable
    for p_star in finite:
        for p in (float(p_star), float(p_star) - 1e-6):
            hit, err = false_certificate_probability(p, float(p_star), test)
            assert hit + err <= alpha, (p_star, p, hit, err)


class _Threshold(torch.nn.Module):
    """A stand-in classifier with known class probabilities: class 0 where the noisy first pixel is below 1/2. Under
    Uniform(sigma) noise an input x gives class 0 with probability p = (1/2 - x + lam) / (2 lam) exactly."""

    def forward(self, x):
        z = x.reshape(x.shape[0], -1)[:, :1]
        return torch.cat([0.5 - z, z - 0.5], dim=1)


@pytest.mark.parametrize("select", ["top", "label"])
def test_sequential_certificates_are_false_with_probability_at_most_alpha(select):
    """End to end through the procedure (its noise draws, packing, selection, stopping and bound): images whose
    class-0 probability p is a near-tie or exactly on a radius' threshold (they run many looks); alpha = 0.2. The
    share of images with p_lower above the tested class's true probability stays within a binomial tolerance of
    alpha (fixed seeds: not flaky; about 0.12 here). Draws that repeat (a generator reset per noise request:
    about 0.4) overstate the evidence and fail it."""
    alpha, images = 0.2, 240
    noise = Uniform(0.25)
    proc = Sequential(
        n0=16, n=4096, alpha=alpha, radii=[0.0, 0.25], select=select, first_batch=16, max_batch=256, bound="union"
    )
    on_threshold = float(proc.test(noise).thresholds[1])  # p*(0.25)
    p = np.resize([0.501, on_threshold, 0.499, on_threshold], images)
    x = torch.as_tensor(0.5 + noise.lam - 2 * noise.lam * p, dtype=torch.float64).reshape(images, 1, 1, 1)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(images)]
    labels = torch.zeros(images, dtype=torch.long)
    cert = proc.certify(_Threshold(), x, noise, 2, noise_batch=4096, generator=gens, labels=labels)
    tested = np.zeros(images, dtype=np.int64) if select == "label" else cert.prediction
    p_tested = np.where(tested == 0, p, 1 - p)
    false = int(np.sum(cert.values["p_lower"] > p_tested))
    assert false <= alpha * images + 3 * math.sqrt(images * alpha * (1 - alpha)), false
    assert np.median(cert.values[SAMPLES_COLUMN]) > 1024  # the near-ties run many looks: the bound is stressed


# -- the config group and the CLI ------------------------------------------------------------------------------


def test_the_config_builds_the_procedure_from_its_settings():
    from ssn_exp.cli.common import build_noise, build_procedure
    from ssn_exp.cli.config import ConfigError

    cfg = _compose(["method=uniform", "procedure=sequential", "procedure.n=5000", "certify.radii=[0.0,0.5]"])
    proc = build_procedure(cfg, build_noise(cfg.method))
    assert isinstance(proc, Sequential)
    assert (proc.n0, proc.n, proc.alpha, proc.radii, proc.select) == (64, 5000, 0.001, [0.0, 0.5], "top")
    assert (proc.schedule.first, proc.schedule.max_batch, proc.bound, proc.tolerance) == (32, 1024, "union", None)
    cfg = _compose(["method=uniform", "procedure=sequential", "procedure.select=nearest"])
    with pytest.raises(ConfigError, match="procedure.select must be one of") as info:
        build_procedure(cfg, build_noise(cfg.method))
    assert "\n" not in str(info.value)
    cfg = _compose(["method=dssn", "procedure=sequential"])
    with pytest.raises(ConfigError, match="procedure=sequential cannot certify dssn noise"):
        build_procedure(cfg, build_noise(cfg.method))


@pytest.mark.slow
def test_a_run_certifies_sequentially_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    p = run_cli("ssn_exp", "method=uniform", "procedure=sequential", "debug=fast", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_csv(run_dir / "certificates.csv")
    assert len(rows) == 8 and SAMPLES_COLUMN in rows[0]
    samples = np.array([int(r[SAMPLES_COLUMN]) for r in rows])
    assert np.all((samples > 64) & (samples <= 64 + 256))  # debug=fast: procedure.n = 256 is the cap
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["forward_passes_per_example"] == pytest.approx(samples.mean())
    assert m["forward_passes_p90"] == pytest.approx(np.percentile(samples, 90))
    settings = json.loads((run_dir / "certify_settings.json").read_text())
    assert (settings["procedure"], settings["n"], settings["radii"][:3]) == ("sequential", 256, [0.0, 0.25, 0.5])


def test_every_setting_is_kept_checked_and_named_in_its_refusal():
    """Each constructor setting reaches describe() as given (and its default as documented), and each bad value
    is refused with a message that names its key."""
    default = Sequential().describe()
    assert {k: default[k] for k in ("n0", "n", "alpha", "beta", "final_share", "first_batch", "growth", "max_batch",
                                    "tolerance", "select", "bound")} == {
        "n0": 64, "n": 100_000, "alpha": 0.001, "beta": 0.05, "final_share": 0.5, "first_batch": 32, "growth": 2,
        "max_batch": 1024, "tolerance": None, "select": "top", "bound": "union"}  # fmt: skip
    given = Sequential(n0=7, n=5000, alpha=0.01, radii=[0.5, 0.25, 0.5], tolerance=1, select="label", bound="kt",
                       beta=None, final_share=0.25, first_batch=16, growth=3, max_batch=64).describe()  # fmt: skip
    assert given == {"procedure": "sequential", "n0": 7, "n": 5000, "alpha": 0.01, "select": "label",
                     "radii": [0.25, 0.5], "tolerance": 1.0, "bound": "kt", "beta": None, "final_share": 0.25,
                     "first_batch": 16, "growth": 3, "max_batch": 64}  # fmt: skip
    assert isinstance(given["tolerance"], float) and Sequential(radii=None).radii == []
    bad = {
        "n0": (0, "procedure.n0 must be an integer >= 1, got 0"),
        "n": (0, "procedure.n must be an integer >= 1, got 0"),
        "first_batch": (0, "procedure.first_batch must be an integer >= 1, got 0"),
        "growth": (True, "procedure.growth must be an integer >= 1, got True"),
        "max_batch": (0, "procedure.max_batch must be an integer >= 1, got 0"),
        "alpha": (1.0, "procedure.alpha"),
        "beta": (0.0, "procedure.beta"),
        "final_share": (1.5, "procedure.final_share"),
        "select": ("all", "procedure.select must be one of ['top', 'label'], got 'all'"),
        "bound": ("cp", "procedure.bound must be one of ['kt', 'kt+final', 'union'], got 'cp'"),
        "radii": ("0.5", "procedure.radii"),
    }
    for key, (value, words) in bad.items():
        with pytest.raises(ValueError) as info:  # (ProcedureError; the radii list: OptionError)
            Sequential(**{key: value})
        assert str(info.value).startswith(words), (key, str(info.value))
    for tolerance in (0, -1, math.inf, True, "0.1"):
        with pytest.raises(ProcedureError) as info:
            Sequential(tolerance=tolerance)
        assert str(info.value) == f"procedure.tolerance must be a positive radius or null, got {tolerance!r}"
    with pytest.raises(ProcedureError, match=r"^procedure.max_batch \(16\) must be >= procedure.first_batch \(32\)$"):
        Sequential(max_batch=16)
    # every look's share of alpha and of beta must stay a normal float: checked with the schedule's looks
    with pytest.raises(ProcedureError, match="procedure.alpha"):
        Sequential(alpha=1e-306, n=10**6)
    with pytest.raises(ProcedureError, match="procedure.beta"):
        Sequential(beta=1e-306, n=10**6)
    Sequential(beta=None, alpha=1e-3, n=10**6)  # beta None: alpha's level, already checked
    for key in ("alpha", "final_share"):  # null only for beta (and tolerance)
        with pytest.raises(ProcedureError, match=f"^procedure.{key} must lie in"):
            Sequential(**{key: None})
    # a final share too small to be a level is named as such (not as the alpha it would leave the final look)
    with pytest.raises(ProcedureError, match=r"^procedure.final_share=1.5e-308 is too small"):
        Sequential(final_share=1.5e-308)
    assert Sequential(n=320, first_batch=32, max_batch=32).schedule.batches[:3] == (32, 32, 32)  # constant batches


# -- the procedure's seams, unit by unit (fast: tiny inputs, no driver) ---------------------------------------


def _means_model():
    """3 classes by the mean of the input: below 1/3, up to 2/3, above (float64 parameters)."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        centers = torch.tensor([1 / 6, 1 / 2, 5 / 6], dtype=torch.float64)  # logit_k = 2 c_k m - c_k^2: the nearest
        net[1].weight.copy_(centers[:, None].expand(3, 4) / 2)  # (2 c_k times the mean of 4 values)
        net[1].bias.copy_(-(centers**2))
    return net


class _Drawn(Uniform):
    """Uniform noise counting the noisy copies it draws (and summing them)."""

    drawn, total = 0, 0.0

    def noisy(self, x, start, stop, generator=None):
        self.drawn += x.shape[0] * (stop - start)
        out = super().noisy(x, start, stop, generator)
        self.total += float(out.sum())
        return out


@pytest.mark.parametrize("one_generator", [True, False])
def test_each_example_is_certified_from_its_own_noisy_copies_and_no_copy_is_wasted(one_generator):
    """One generator for the batch (drawn per example in turn) or one per example: each example's votes come from
    its own input, exactly the copies its samples column counts are drawn (none for the other examples), and the
    same seeds draw the same noise."""
    x = torch.tensor([0.1, 0.5, 0.9]).repeat_interleave(4).reshape(3, 1, 2, 2).float()  # means 0.1, 0.5, 0.9
    proc = Sequential(n0=8, n=64, alpha=0.01, radii=[0.0], first_batch=16, max_batch=32)
    totals = []
    for _ in range(2):
        noise = _Drawn(0.1)
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        gens = gens[0] if one_generator else gens
        cert = proc.certify(_means_model(), x, noise, 3, noise_batch=20, generator=gens)
        np.testing.assert_array_equal(cert.prediction, [0, 1, 2])
        assert np.all(cert.radius >= 0)
        assert noise.drawn == cert.values[SAMPLES_COLUMN].sum()
        totals.append(noise.total)
    assert totals[0] == totals[1]


def test_noisy_copies_reach_the_model_in_its_dtype():
    """float32 images, a float64 model: the copies are drawn in the model's dtype (a float64 Linear layer refuses
    float32 inputs)."""
    x = torch.tensor([0.1, 0.9]).repeat_interleave(4).reshape(2, 1, 2, 2).float()
    proc = Sequential(n0=8, n=64, alpha=0.01, radii=[0.0], first_batch=16, max_batch=32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    cert = proc.certify(_means_model(), x, Uniform(0.1), 3, generator=gens)
    np.testing.assert_array_equal(cert.prediction, [0, 2])


class _Sizes:
    """A model recording the size of every forward pass (the class: the sign of the first input value)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        z = x.reshape(x.shape[0], -1)[:, :1]
        return torch.cat([-z, z], dim=1)


def test_forward_passes_hold_noise_batch_inputs_and_batch_size_examples():
    """noise_batch defaults to 1024 inputs per forward pass (certify and certify_batches alike); the stream keeps
    the first batch's size of examples in flight: the first pass holds their n0 selection samples."""
    proc = Sequential(n0=64, n=64, alpha=0.01, radii=[0.0], first_batch=64, max_batch=64)
    x = torch.full((20, 1, 1, 1), 0.5)
    model = _Sizes()
    proc.certify(model, x, Uniform(0.5), 2, generator=[torch.Generator().manual_seed(i) for i in range(20)])
    assert max(model.calls) == 1024 and sum(model.calls) == 20 * 128
    for size in (1, 3):
        model = _Sizes()
        batches = [(x[i : i + size], [torch.Generator() for _ in range(size)], None) for i in range(0, 6, size)]
        found = [k for keys, _ in proc.certify_batches(model, batches, Uniform(0.5), 2) for k in keys]
        assert sorted(found) == list(range(6)) and model.calls[0] == 64 * size
    model = _Sizes()
    batches = [(x, [torch.Generator() for _ in range(20)], None)]
    assert sum(len(keys) for keys, _ in proc.certify_batches(model, batches, Uniform(0.5), 2)) == 20
    assert max(model.calls) == 1024


def test_the_test_is_built_from_the_settings_and_the_noise():
    """Each noise gets the test of its own radius function: thresholds p*(r) of the radii under it; every setting of
    the procedure is the test's."""
    proc = Sequential(alpha=0.02, beta=0.1, bound="kt", final_share=0.25, tolerance=0.3, radii=[0.5, 0.0], n=5000)
    u = Uniform(0.5)
    for noise in (u, Uniform(1.0), u):
        test = proc.test(noise)
        np.testing.assert_array_equal(test.thresholds, thresholds_for_radii(noise.radius, [0.0, 0.5]))
        assert (test.alpha, test.beta, test.bound, test.final_share, test.tolerance) == (0.02, 0.1, "kt", 0.25, 0.3)
        assert test.schedule == proc.schedule and test.radius_fn == noise.radius
    assert len(Sequential(radii=None).test(Uniform(0.5)).thresholds) == 0


class _Plateau(Laplace):
    """A user noise whose certified radius is exactly 0 for p_lower in [1/2, 0.9) (then p_lower - 0.9)."""

    def radius(self, p_lower):
        p = np.asarray(p_lower, dtype=np.float64)
        return np.where(p < 0.5, -1.0, np.where(p < 0.9, 0.0, p - 0.9))


class _LabelFirst:
    """Votes for class 0 on the first 16 inputs it sees, for class 1 afterwards."""

    def __init__(self):
        self.seen = 0

    def __call__(self, x):
        i = torch.arange(self.seen, self.seen + x.shape[0])
        self.seen += x.shape[0]
        return torch.stack([i < 16, i >= 16], dim=1).double()


def test_a_label_certified_at_radius_zero_is_the_prediction_even_against_the_majority():
    """select=label, label 0: the first look (16 votes for 0) certifies radius 0 (p_lower, the running maximum of
    the lower bound, stays there); the next batch (32 votes for 1) refutes radius 0.05. The row predicts its label,
    not the majority of the votes, and reads back as such; moved to the majority it is refused."""
    noise = _Plateau(0.5)
    proc = Sequential(n0=8, n=240, alpha=0.01, radii=[0.0, 0.05], select="label", first_batch=16, max_batch=64)
    cert = proc.certify(_LabelFirst(), torch.full((1, 1, 1, 1), 0.5), noise, 2, generator=None, labels=[0])
    assert cert.radius.tolist() == [0.0] and cert.counts.tolist() == [[16, 32]]
    assert cert.prediction.tolist() == [0]
    values = {"p_lower": cert.values["p_lower"][0], SAMPLES_COLUMN: 48, "label": 0}
    proc.check_row(values, cert.counts[0], 0, 0.0, noise)
    with pytest.raises(ValueError, match=r"^a certified row of select=label must predict its label$"):
        proc.check_row(values, cert.counts[0], 1, 0.0, noise)


def test_check_row_bounds_samples_and_tolerates_only_rounding_of_the_radius():
    """A row of a single sample (select=label, n=1) is a legal row; the radius read back may differ from its
    recomputation by rounding (1e-9), no more."""
    noise = Laplace(0.5)
    proc = Sequential(n=1, alpha=0.4, radii=[0.0], select="label", first_batch=1, max_batch=1)
    one = proc.certify(_Sizes(), torch.full((1, 1, 1, 1), 0.5), noise, 2, labels=[1])
    assert one.values[SAMPLES_COLUMN].tolist() == [1]
    values = {"p_lower": one.values["p_lower"][0], SAMPLES_COLUMN: 1, "label": 1}
    proc.check_row(values, one.counts[0], int(one.prediction[0]), float(one.radius[0]), noise)
    proc = _procedure()
    x = torch.full((4, 1, 1, 1), 0.75)
    cert = proc.certify(_Sizes(), x, noise, 2, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    j = int(np.argmax((cert.radius > 0) & (cert.radius < 0.75)))
    assert 0 < cert.radius[j] < 0.75  # 8e-10 is above its relative tolerance
    values = {"p_lower": cert.values["p_lower"][j], SAMPLES_COLUMN: cert.values[SAMPLES_COLUMN][j]}
    for off in (-8e-10, 8e-10):
        proc.check_row(values, cert.counts[j], int(cert.prediction[j]), float(cert.radius[j]) + off, noise)
    with pytest.raises(ValueError, match=r"^p_lower and radius disagree$"):
        proc.check_row(values, cert.counts[j], int(cert.prediction[j]), float(cert.radius[j]) + 2e-9, noise)
    # p_lower outside [0, 1] is refused at once, even with the radius the noise gives it
    for p in (1.5, -0.5):
        radius = float(noise.radius(np.array([p]))[0])
        with pytest.raises(ValueError, match=r"^p_lower and radius disagree$"):
            proc.check_row({**values, "p_lower": p}, cert.counts[j], int(cert.prediction[j]), radius, noise)


class _NoBox(Uniform):
    """A user noise that declares further radii its extra_radii does not give."""

    extra_columns = ("radius_box", "radius_other")

    def extra_radii(self, x, p_lower):
        return {}


def test_bad_calls_are_refused_with_what_is_wrong():
    x, gens = torch.full((2, 1, 1, 1), 0.5), [torch.Generator(), torch.Generator()]
    proc = Sequential(n0=8, n=64, alpha=0.01, radii=[0.0], first_batch=16, max_batch=32)
    with pytest.raises(ValueError, match=r"^_NoBox.extra_radii gives no radius_box, radius_other$"):
        proc.certify(_Sizes(), x, _NoBox(0.5), 2, generator=gens)
    for noise_batch in (0, True, 2.5):
        with pytest.raises(ValueError, match=rf"^noise_batch must be an integer >= 1, got {noise_batch!r}$"):
            proc.certify(_Sizes(), x, Uniform(0.5), 2, generator=gens, noise_batch=noise_batch)
    with pytest.raises(ValueError, match=r"^num_classes must be >= 2, got 1$"):
        proc.certify(_Sizes(), x, Uniform(0.5), 1, generator=gens)
    empty = proc.certify(_Sizes(), x[:0], Uniform(0.5), 2, generator=[])  # typed even when empty
    assert (empty.prediction.dtype, empty.counts.dtype, empty.counts.shape) == (np.int64, np.int64, (0, 2))
    assert empty.values[SAMPLES_COLUMN].dtype == np.int64 and empty.counts_n0.dtype == np.int64


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"n0": 0}, "n0 must be an integer >= 1 (or give labels), got 0"),
        ({"n0": True}, "n0 must be an integer >= 1 (or give labels), got True"),
        ({"n0": 2.5}, "n0 must be an integer >= 1 (or give labels), got 2.5"),
        ({"capacity": 0}, "capacity must be an integer >= 1, got 0"),
        ({"capacity": True}, "capacity must be an integer >= 1, got True"),
        ({"capacity": 1.5}, "capacity must be an integer >= 1, got 1.5"),
    ],
)
def test_the_stream_refuses_bad_settings(kw, message):
    kw = {"n0": 4, "use_labels": False, "noise_batch": 8, "capacity": 1, **kw}
    with pytest.raises(ValueError) as info:
        SequentialStream(_Sizes(), 2, SequentialTest([0.5]), **kw)
    assert str(info.value) == message


@pytest.mark.parametrize("use_labels", [True, False])
def test_the_stream_counts_its_forward_passes_and_casts_the_inputs(use_labels):
    """forward_batches is the number of model calls; the model gets ``dtype`` whatever noise_fn gives; the votes are
    int64, and the selection counts are None where the label is tested (n0 = 1 is a selection)."""
    dtypes = []

    def model(x):
        dtypes.append(x.dtype)
        return _Sizes()(x)

    test = SequentialTest([0.5], alpha=0.05, schedule=Schedule(first=4, growth=2, max_batch=8, cap=16))
    stream = SequentialStream(
        model, 2, test, n0=1, use_labels=use_labels, noise_batch=5, capacity=2, dtype=torch.float64
    )
    g = torch.Generator().manual_seed(0)
    examples = [(k, (1,), lambda m: torch.rand(m, 1, generator=g) - 0.2, 1) for k in range(3)]
    results = [r for group in stream.run(examples) for r in group]
    assert sorted(r.key for r in results) == [0, 1, 2]
    assert stream.forward_batches == len(dtypes) > 0 and set(dtypes) == {torch.float64}
    assert all(r.counts.dtype == np.int64 for r in results)
    if use_labels:
        assert all(r.counts_n0 is None and r.prediction == 1 for r in results)
    else:
        assert all(r.counts_n0.dtype == np.int64 and r.counts_n0.sum() == 1 for r in results)
    with pytest.raises(ValueError, match=r"^labels must be integers in \[0, 2\), got True for example 'a'$"):
        next(
            SequentialStream(model, 2, test, n0=1, use_labels=True, noise_batch=5, capacity=1).run(
                [("a", (1,), lambda m: torch.zeros(m, 1), True)]
            )
        )
    assert PackingScheduler(4).finished == []  # no forward pass yet: nothing finished
