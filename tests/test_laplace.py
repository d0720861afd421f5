"""Laplace noise (issue 17 item 7; docs/method.md section 14): its radius against rs4a's formula, its samples against
the Laplace distribution, reproducible draws, and ``method=laplace`` end to end through the entry points."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ssn_exp.certify.procedures import FixedSample
from ssn_exp.certify.record import CertificateRecord
from ssn_exp.noises import InputDomainError, Laplace


def rs4a_radius(sigma: float, prob_lb) -> torch.Tensor:
    """tonyduan/rs4a, src/noises/noises.py: ``Laplace`` with ``self.lambd = sigma / 2 ** 0.5`` and
    ``certify_l1(prob_lb) = -self.lambd * torch.log(2 * (1 - prob_lb))``, in float64."""
    lambd = sigma / 2**0.5
    prob_lb = torch.as_tensor(prob_lb, dtype=torch.float64)
    return -lambd * torch.log(2 * (1 - prob_lb))


P_GRID = np.concatenate(
    [
        np.linspace(0.5, 1.0, 2001)[1:-1],  # (1/2, 1)
        0.5 + np.geomspace(1e-15, 0.1, 200),  # just above 1/2
        1.0 - np.geomspace(1e-15, 0.1, 200),  # just below 1
        np.random.default_rng(0).uniform(0.5, 1.0, 2000),
    ]
)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0, 3.5])
def test_radius_is_rs4a_formula(sigma):
    noise = Laplace(sigma)
    assert noise.lam == sigma / math.sqrt(2.0) and noise.name == "laplace"
    got = noise.radius(P_GRID)
    want = rs4a_radius(sigma, P_GRID).numpy()
    assert got.dtype == np.float64 and got.shape == P_GRID.shape
    assert np.all(np.abs(got - want) <= 1e-12)
    assert np.all(got > 0)  # p_lower > 1/2 certifies something
    assert np.all(np.diff(noise.radius(np.sort(P_GRID))) >= 0)  # a larger p_lower never certifies less


def test_radius_differs_from_uniform_noise_s():
    noise = Laplace(1.0)
    p = np.array([0.6, 0.9, 0.999])
    assert not np.allclose(noise.radius(p), 2 * noise.lam * (p - 0.5))


def test_nothing_is_certified_at_or_below_one_half():
    noise = Laplace(0.5)
    assert noise.radius(np.array([0.5]))[0] == 0.0
    p = np.array([0.0, 0.1, 0.3, 0.49, 0.5 - 1e-12])
    assert np.all(noise.radius(p) < 0)
    assert np.all(np.abs(noise.radius(p) - rs4a_radius(0.5, p).numpy()) <= 1e-12)


def test_p_lower_one_gives_a_finite_radius_without_a_warning():
    noise = Laplace(0.5)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        r = noise.radius(np.array([1.0, 1.0 - 2.0**-53, 0.999999]))
        scalar = noise.radius(1.0)
    assert np.all(np.isfinite(r)) and np.isfinite(scalar)
    # p_lower = 1 is taken as the largest float64 below 1: the same (smaller, still valid) lower bound
    assert r[0] == r[1] == pytest.approx(noise.lam * 53 * math.log(2) - noise.lam * math.log(2))
    assert r[1] > r[2]


def test_laplace_offers_no_box_constrained_radius():
    noise = Laplace(0.5)
    assert noise.extra_columns == ()
    assert noise.extra_radii(torch.zeros(2, 4), np.array([0.9, 0.8])) == {}
    assert FixedSample(n0=4, n=16).columns(noise) == ["p_lower"]
    assert "radius_box" not in CertificateRecord(noise, FixedSample(n0=4, n=16)).columns


def test_samples_follow_the_laplace_distribution():
    from scipy import stats

    sigma, n = 0.7, 10**7
    noise = Laplace(sigma)
    x = torch.full((n,), 0.25)
    g = torch.Generator().manual_seed(1234)
    out = noise.sample(x, generator=g)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    eps = (out - x).double()
    # standard errors over 1e7 draws: mean sigma/sqrt(n) = 2.2e-4; std ~3.5e-4 relative; mean |eps| 3e-4 relative
    assert abs(float(eps.mean())) < 1.5e-3
    assert float(eps.std()) == pytest.approx(sigma, rel=2.5e-3)
    assert float(eps.abs().mean()) == pytest.approx(sigma / math.sqrt(2.0), rel=2.5e-3)
    sub = eps[:200_000].numpy()
    assert stats.kstest(sub, stats.laplace(loc=0.0, scale=sigma / math.sqrt(2.0)).cdf).pvalue > 1e-3
    # not uniform noise of the same std (the test can tell the two apart)
    lam_u = math.sqrt(3.0) * sigma
    assert stats.kstest(sub, stats.uniform(loc=-lam_u, scale=2 * lam_u).cdf).pvalue < 1e-6


def test_samples_are_on_the_inputs_device_and_dtype_and_unclamped():
    noise = Laplace(2.0)
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = noise.sample(x, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float64 and out.device == x.device and out.shape == x.shape
    assert float(out.min()) < 0.0 and float(out.max()) > 1.0  # no clamping to [0, 1]
    copies = noise.noisy(x[:3], 0, 5, torch.Generator().manual_seed(2))
    assert copies.shape == (3, 5, 1, 8, 8) and copies.dtype == torch.float64
    with pytest.raises(InputDomainError):
        noise.sample(x + 2.0)


def test_draws_are_reproducible_from_the_generator():
    noise = Laplace(0.5)
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    a = noise.sample(x, generator=torch.Generator().manual_seed(7))
    b = noise.sample(x, generator=torch.Generator().manual_seed(7))
    c = noise.sample(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    draw = noise.copies(x, torch.float32, torch.Generator().manual_seed(3))
    again = noise.copies(x, torch.float32, torch.Generator().manual_seed(3))
    assert torch.equal(draw(0, 4, 0, 6), again(0, 4, 0, 6))


def test_certificates_are_independent_of_the_batch_and_the_chunks_with_per_example_generators():
    # certify's per-example generators: an example's certificate is the same alone or in a batch, and whatever
    # certify.noise_batch splits its copies into
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    noise = Laplace(0.3)
    proc = FixedSample(n0=8, n=64, alpha=0.01)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    with torch.no_grad():
        together = proc.certify(model, x, noise, 3, noise_batch=16, generator=gens(range(5)))
        for j in range(5):
            alone = proc.certify(model, x[j : j + 1], noise, 3, noise_batch=7, generator=gens([j]))
            assert np.array_equal(alone.counts[0], together.counts[j])
            assert alone.prediction[0] == together.prediction[j]
            assert alone.radius[0] == together.radius[j]
    p = together.values["p_lower"]
    assert np.array_equal(together.radius, noise.radius(p))


# -- method=laplace end to end: tests/test_sweeps.py's smoke sweep trains, certifies (rows checked against the formula
# above), logs to wandb, reports and resumes laplace jobs beside the other noises; one more CLI run here would only
# repeat it.


def test_a_laplace_certification_resumes_with_its_rows_accepted_and_a_wrong_radius_refused(tmp_path):
    """In-process: the rows a Laplace certification wrote are read back through its own radius on resume."""
    from torch.utils.data import TensorDataset

    from ssn_exp.lightning.certification import open_certifier
    from ssn_exp.lightning.results import ResultsFileError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(6, 1, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g))
    kw = dict(num_classes=3, n0=8, n=64, noise_batch=32, batch_size=2, max_examples=4)
    open_certifier(model, Laplace(0.5), data, tmp_path, **kw).run("cpu", progress=False)
    path = tmp_path / "certificates.csv"
    first = path.read_bytes()
    again = open_certifier(model, Laplace(0.5), data, tmp_path, **{**kw, "max_examples": 6})
    assert sorted(again.done) == [0, 1, 2, 3] and again.todo == [4, 5]  # the 4 rows accepted as they are
    assert path.read_bytes() == first
    lines = first.decode().splitlines()
    header, row = lines[0].split(","), lines[1].split(",")
    p_lower = float(row[header.index("p_lower")])
    row[header.index("radius")] = repr(2.0 * math.sqrt(3.0) * 0.5 * (p_lower - 0.5))  # uniform noise's radius
    path.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    with pytest.raises(ResultsFileError, match="p_lower and radius disagree"):
        open_certifier(model, Laplace(0.5), data, tmp_path, **kw)
