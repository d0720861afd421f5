"""The procedure contract (``ssn_exp.certify.procedures.Procedure``; docs/extending.md, "A certificate procedure"),
checked for every procedure: ssn_exp's own (exact, fixed, auto, sequential) and the user's of tests/plugins
(hoeffding), each on every noise it certifies, through the one driver (``open_certifier``) with a stand-in classifier.
A new procedure is one entry of ``PROCEDURES``; what is particular to one procedure stays in its own tests."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import NOISES, SAMPLED_NOISES, all_noises, certificate_columns, plugin, read_csv
from ssn_exp.certify.procedures import Exact, FixedSample, NoiseDefault, Procedure, ProcedureError
from ssn_exp.certify.procedures_sequential import Sequential
from ssn_exp.certify.record import BASE_COLUMNS, SAMPLES_COLUMN, CertificateRecord
from ssn_exp.lightning.certification import certification_settings, open_certifier
from ssn_exp.lightning.certify_run import CertifyRun
from ssn_exp.lightning.results import ResultsFileError
from ssn_exp.noises import InputDomainError, RadiusError, SampledNoise

Q, DIM, CLASSES, EXAMPLES = 16, 16, 3, 5
NOISE = all_noises(Q, DIM)

#: name -> (class, settings other than the defaults, the noises it certifies)
PROCEDURES = {
    "exact": (Exact, {}, ["dssn"]),
    "fixed": (FixedSample, {"n0": 8, "n": 100, "alpha": 0.01}, SAMPLED_NOISES),
    "auto": (NoiseDefault, {"n0": 8, "n": 100, "alpha": 0.01}, NOISES),
    "sequential": (
        Sequential,
        {"n0": 8, "n": 256, "alpha": 0.01, "radii": [0.25], "first_batch": 16, "max_batch": 64},
        SAMPLED_NOISES,
    ),
    "hoeffding": (plugin("hoeffding").Hoeffding, {"n0": 8, "n": 100, "alpha": 0.01}, SAMPLED_NOISES),
}
CASES = [(p, n) for p, (_, _, noises) in PROCEDURES.items() for n in noises]


def _procedure(name: str) -> Procedure:
    cls, settings, _ = PROCEDURES[name]
    return cls(**settings)


class StandIn(torch.nn.Module):
    """The stand-in base classifier: class c scores the mean of the pixels of region c (no parameters, float64
    sums: no batch-dependent rounding), so that examples, and their noisy copies, vote differently."""

    def forward(self, z):
        f = z.flatten(1)
        return 4.0 * torch.stack([f[:, 0:5].mean(1), f[:, 5:10].mean(1), f[:, 10:15].mean(1)], dim=1)


def _model() -> torch.nn.Module:
    return StandIn().eval()


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, Q + 1, (EXAMPLES, 1, 4, 4), generator=g).double() / Q  # on DSSN's grid
    y = _model()(x).argmax(dim=1)
    y[::2] = (y[::2] + 1) % CLASSES  # some certificates correct, some not
    return TensorDataset(x, y)


def _certify(out, procedure: Procedure, noise, **kw):
    """Certify the examples into ``out`` through the driver, with the procedure that certifies ``noise`` (auto: the
    noise's own), as every entry point does."""
    kw = {"noise_batch": 64, "batch_size": EXAMPLES, **kw}
    procedure = procedure.for_noise(noise)
    cert = open_certifier(_model(), noise, _data(), out, num_classes=CLASSES, procedure=procedure, **kw)
    cert.run("cpu", progress=False)
    return read_csv(out / "certificates.csv")


def test_the_suite_covers_every_procedure_of_the_package():
    import ssn_exp.certify.procedures as own

    shipped = {c for c in vars(own).values() if isinstance(c, type) and issubclass(c, Procedure) and c is not Procedure}
    assert shipped | {Sequential} <= {cls for cls, _, _ in PROCEDURES.values()}


@pytest.mark.parametrize("proc,noise", CASES)
def test_describe_is_plain_json_and_names_every_setting(proc, noise):
    procedure = _procedure(proc)
    certifier = procedure.for_noise(NOISE[noise])  # what certifies (auto: the noise's own)
    d = certifier.describe()
    assert json.loads(json.dumps(d, allow_nan=False)) == d  # certify_settings.json and metrics.json
    params = inspect.signature(type(certifier).__init__).parameters.values()
    settings = {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    missing = settings - set(d) - type(certifier).ignores
    assert not missing, f"{type(certifier).__name__}.describe() leaves out {missing}"
    if type(certifier) is type(procedure):
        given = PROCEDURES[proc][1]
        assert {k: d[k] for k in given} == given
    assert isinstance(certifier.name, str) and certifier.name


@pytest.mark.parametrize("proc,noise", CASES)
def test_columns_and_forward_passes_follow_the_contract(proc, noise):
    procedure = _procedure(proc).for_noise(NOISE[noise])
    cols = procedure.columns(NOISE[noise])
    assert len(set(cols)) == len(cols) and not set(cols) & {*BASE_COLUMNS, "counts"}
    assert set(getattr(NOISE[noise], "extra_columns", ())) <= set(cols)
    per_example, passes = procedure.samples_per_example(NOISE[noise]), procedure.forward_passes(NOISE[noise])
    assert isinstance(per_example, int) and per_example >= 1
    assert (isinstance(passes, int) and passes >= 1) or (passes is None and SAMPLES_COLUMN in cols)


def test_directories_of_two_procedures_with_the_same_settings_are_told_apart():
    """A directory certified by one procedure is not resumed by another: their certify_settings differ."""
    noise = NOISE["uniform"]
    seen = {}
    for proc in ("fixed", "sequential", "hoeffding"):
        settings = certification_settings(noise, _procedure(proc), CertifyRun(), weights="w")
        assert settings not in seen.values(), (proc, seen)
        seen[proc] = settings


@pytest.mark.parametrize("proc,noise", CASES)
def test_certificates_do_not_depend_on_batching_or_chunking(tmp_path, proc, noise):
    procedure = _procedure(proc)
    together = _certify(tmp_path / "a", procedure, NOISE[noise], batch_size=EXAMPLES, noise_batch=1000)
    apart = _certify(tmp_path / "b", procedure, NOISE[noise], batch_size=2, noise_batch=7)
    assert certificate_columns(together) == certificate_columns(apart) and len(together) == EXAMPLES
    assert len({r["counts"] for r in together}) > 1  # (the stand-in gives examples different certificates)


def _edit(row: dict, how: str) -> dict:
    row = dict(row)
    if how == "radius":  # a larger radius than the row's statistics give
        row["radius"] = repr(float(row["radius"]) + 0.5)
        if "k" in row:
            row["radius"], row["k"] = repr((int(row["k"]) + 8) / Q), str(int(row["k"]) + 8)
    else:  # one vote more than the procedure spent on the example
        counts = {int(c): int(v) for c, v in (item.split(":") for item in row["counts"].split())}
        other = (int(row["prediction"]) + 1) % CLASSES
        counts[other] = counts.get(other, 0) + 1
        row["counts"] = " ".join(f"{c}:{v}" for c, v in sorted(counts.items()) if v)
    return row


@pytest.mark.parametrize("how", ["radius", "counts"])
@pytest.mark.parametrize("proc,noise", CASES)
def test_its_rows_pass_its_read_back_check_and_a_tampered_row_does_not(tmp_path, proc, noise, how):
    procedure = _procedure(proc)
    rows = _certify(tmp_path, procedure, NOISE[noise])
    record = CertificateRecord(NOISE[noise], procedure.for_noise(NOISE[noise]))
    for row in rows:  # every row it wrote passes its own check ...
        record.check(row, CLASSES)
    # ... and resuming reads them all back, checked (the CSV unchanged)
    before = (tmp_path / "certificates.csv").read_bytes()
    _certify(tmp_path, procedure, NOISE[noise])
    assert (tmp_path / "certificates.csv").read_bytes() == before
    j = len(rows) // 2
    bad = _edit(rows[j], how)
    with pytest.raises(ValueError):
        record.check(bad, CLASSES)
    lines = before.decode().splitlines(keepends=True)
    lines[j + 1] = ",".join(bad[c] for c in record.columns) + "\n"
    (tmp_path / "certificates.csv").write_text("".join(lines))
    with pytest.raises(ResultsFileError, match=rf"line {j + 2}: malformed certificate row") as info:
        _certify(tmp_path, procedure, NOISE[noise])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("proc", PROCEDURES)
def test_a_noise_it_cannot_certify_is_refused_in_one_line(proc):
    procedure = _procedure(proc)
    for name in NOISES:
        if name in PROCEDURES[proc][2]:
            continue
        with pytest.raises(ProcedureError) as info:
            CertificateRecord(NOISE[name], procedure.for_noise(NOISE[name]))
        text = str(info.value)
        assert f"procedure={procedure.name} cannot certify {NOISE[name].name} noise" in text and "\n" not in text

    class Broken(SampledNoise):  # a sampled noise whose radius cannot make a certificate
        name = "broken"

        def scale(self, sigma):
            return sigma

        def radius(self, p_lower):
            return 0.5 - np.asarray(p_lower, dtype=np.float64)

    if any(isinstance(NOISE[name], SampledNoise) for name in PROCEDURES[proc][2]):
        with pytest.raises(RadiusError, match=r"^Broken\.radius is negative") as info:
            procedure.for_noise(Broken(0.5)).check(Broken(0.5))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), 5.0, -0.5])
@pytest.mark.parametrize("proc,noise", CASES)
def test_inputs_outside_the_image_domain_are_refused(proc, noise, value):
    procedure = _procedure(proc).for_noise(NOISE[noise])
    x = _data().tensors[0][:2].clone()
    x[1, 0, 1, 2] = value
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(InputDomainError, match=r"example \d+, coordinate 6 has value"):
        procedure.certify(_model(), x, NOISE[noise], CLASSES, noise_batch=64, generator=gens)
