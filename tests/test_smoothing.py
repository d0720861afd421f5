"""The three noise methods (docs/method.md sections 1-3), DSSN's golden vectors, statistics and input checks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

from ssn_exp.noises import (
    DSSN,
    MAX_LEVELS,
    SSN,
    OffGridError,
    Uniform,
    exact_table,
    levine2021_table,
)

# ----------------------------------------------------------------------------- golden vectors


def _golden_configs(path):
    z = np.load(path)
    return z, sorted({k.split("/")[0] for k in z.files})


@pytest.mark.parametrize("arithmetic", ["exact", "levine2021"])
def test_golden_dssn_matches_authors_code(golden_path, arithmetic):
    z, configs = _golden_configs(golden_path)
    assert len(configs) >= 8
    for cfg in configs:
        dim, seed, sigma = re.fullmatch(r"d(\d+)_seed(\d+)_sigma([\d.]+)", cfg).groups()
        m = DSSN(float(sigma), q=255, dim=int(dim), seed=int(seed), arithmetic=arithmetic)
        assert m.levels == int(z[f"{cfg}/levels"]), cfg
        assert m.v.dtype == torch.int64 and m.v.shape == (int(dim),)
        np.testing.assert_array_equal(m.v.numpy(), z[f"{cfg}/template"], err_msg=cfg)
        x = torch.from_numpy(z[f"{cfg}/x_uint8"].astype(np.float32)) / 255
        want = z[f"{cfg}/x_tilde"]
        every = m.offsets(x, 0, m.levels)
        assert every.shape == (2, m.levels, int(dim))
        got = every[:, torch.from_numpy(z[f"{cfg}/sample_index"].astype(np.int64))]
        if arithmetic == "levine2021":  # the authors' float32 operations: their values bit for bit
            np.testing.assert_array_equal(got.numpy(), want, err_msg=cfg)
        else:  # exactly rounded: within one float32 rounding of theirs
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6, err_msg=cfg)
        # a sub-range gives the same values as the full enumeration
        j0 = int(z[f"{cfg}/sample_index"][0])
        torch.testing.assert_close(m.offsets(x, j0, j0 + 3), every[:, j0 : j0 + 3], rtol=0, atol=0)


def test_exact_arithmetic_is_exactly_rounded_and_levine2021_differs_by_at_most_an_ulp():
    from fractions import Fraction

    for sigma, q in ((0.15, 255), (0.5, 255), (1.25, 16)):
        m = DSSN(sigma, q=q, dim=4)
        L = m.levels
        exact, theirs = exact_table(q, L), levine2021_table(q, L, m.lam)
        for k in range(0, q + 1, max(1, q // 7)):
            for mm in range(0, L, max(1, L // 9)):
                # the definition, in rationals: x = k/q, s = (m + 1/2)/q, 2 lam_eff = L/q
                x, s, w = Fraction(k, q), Fraction(2 * mm + 1, 2 * q), Fraction(L, q)
                n = -((-(x - s)) // w)  # ceil((x - s) / w)
                c = w * n + s
                want = (min(c, 1) + max(c - w, 0)) / 2
                assert exact[k, mm] == float(want)  # rounded once to float64
                f = np.float32(exact[k, mm])  # and rounding that to float32 is the nearest float32 to the rational
                lo, hi = np.nextafter(f, np.float32(-1)), np.nextafter(f, np.float32(2))
                err = abs(Fraction(float(f)) - want)
                assert err <= abs(Fraction(float(lo)) - want) and err <= abs(Fraction(float(hi)) - want)
        diff = np.abs(exact.astype(np.float32) - theirs)
        assert diff.max() <= 6e-8  # at most one float32 ulp apart
        if q == 255:  # k/255 is not a dyadic rational: their double rounding shows in some values
            assert 0 < (diff > 0).mean() < 0.6
        else:  # on the k/16 grid every value is exact in both
            assert (diff == 0).all()


def test_levels_match_every_published_dssn_run(reference_dir):
    import csv

    rows = [r for r in csv.DictReader(open(reference_dir / "index.csv")) if r["method"] == "dssn"]
    assert len(rows) == 45
    for r in rows:
        assert DSSN(float(r["sigma"]), q=255, dim=4).levels == int(r["levels"]), r["file"]


# ----------------------------------------------------------------------------- interface


# shape, dtype, device, fresh noise per example, seeding, chunks and the input checks of every noise:
# tests/test_noise_contract.py


def test_dssn_offsets_shape_and_dtype():
    m = DSSN(1.0, q=16, dim=64)
    x = torch.randint(0, 17, (3, 64)).float() / 16
    out = m.offsets(x, 2, 9)
    assert out.shape == (3, 7, 64) and out.dtype == torch.float32
    # NCHW input is flattened in C*H*W order
    torch.testing.assert_close(m.offsets(x.view(3, 1, 8, 8), 2, 9), out, rtol=0, atol=0)


def test_dssn_noise_values_lie_on_the_quarter_grid():
    m = DSSN(0.4, q=16, dim=64)
    x = torch.randint(0, 17, (4, 64)).float() / 16
    t = m.offsets(x) * (4 * 16)
    torch.testing.assert_close(t, t.round(), rtol=0, atol=1e-4)
    assert float(m.offsets(x).min()) >= 0 and float(m.offsets(x).max()) <= 1


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2, 0.3, 0.6, 1.0, 2.0])
def test_ssn_float_formula_equals_dssn_integer_table_on_the_grid(sigma):
    """Two independent implementations of eq. 42-43 (float vs exact integers) agree, both branches."""
    q = 64
    m = DSSN(sigma, q=q, dim=8)
    ssn = SSN(m.levels / (2 * math.sqrt(3) * q))  # 2 lam = L / q
    k = torch.arange(q + 1, dtype=torch.float64).repeat_interleave(m.levels)
    mm = torch.arange(m.levels, dtype=torch.float64).repeat(q + 1)
    x, s = k / q, (mm + 0.5) / q
    want = m._table.double()
    torch.testing.assert_close(ssn.split_general(x, s), want, rtol=0, atol=1e-6)
    if ssn.lam >= 0.5:
        torch.testing.assert_close(ssn.split(x, s), want, rtol=0, atol=1e-6)


def test_ssn_branches_agree_for_lambda_at_least_half():
    g = torch.Generator().manual_seed(1)
    for sigma in (0.2887, 0.5, 1.3, 3.5):
        m = SSN(sigma)
        assert m.lam >= 0.5
        x = torch.rand(20000, generator=g, dtype=torch.float64)
        s = torch.rand(20000, generator=g, dtype=torch.float64) * 2 * m.lam
        torch.testing.assert_close(m.split(x, s), m.split_general(x, s), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- statistics


def test_uniform_marginal_is_uniform_on_the_lambda_box():
    g = torch.Generator().manual_seed(2)
    m = Uniform(0.7)
    x = torch.full((50000,), 0.3, dtype=torch.float64)
    eps = (m.sample(x, g) - x).numpy()
    assert eps.min() >= -m.lam and eps.max() <= m.lam
    assert stats.kstest(eps, stats.uniform(loc=-m.lam, scale=2 * m.lam).cdf).pvalue > 1e-3
    # independence across coordinates: correlation near 0
    pair = (m.sample(torch.zeros(20000, 2, dtype=torch.float64), g)).numpy()
    assert abs(np.corrcoef(pair.T)[0, 1]) < 0.03


def test_ssn_marginal_small_lambda_is_uniform_additive_in_the_interior():
    g = torch.Generator().manual_seed(3)
    m = SSN(0.1)  # lam ~ 0.173 < 0.5
    x = torch.full((50000,), 0.5, dtype=torch.float64)  # 2 lam <= x <= 1 - 2 lam
    d = (m.sample(x, g) - x).numpy()
    assert stats.kstest(d, stats.uniform(loc=-m.lam, scale=2 * m.lam).cdf).pvalue > 1e-3


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_ssn_marginal_large_lambda(sigma):
    """lam >= 0.5: an atom at 1/2 of mass 1 - 1/(2 lam), else uniform on [x/2, (x+1)/2)."""
    g = torch.Generator().manual_seed(4)
    m = SSN(sigma)
    x0 = 0.25
    xt = m.sample(torch.full((60000,), x0, dtype=torch.float64), g).numpy()
    atom = np.isclose(xt, 0.5, atol=0)
    p_atom = 1 - 1 / (2 * m.lam)
    assert abs(atom.mean() - p_atom) < 4 * math.sqrt(p_atom * (1 - p_atom) / len(xt)) + 1e-9
    rest = xt[~atom]
    assert rest.min() >= x0 / 2 and rest.max() < (x0 + 1) / 2
    assert stats.kstest(rest, stats.uniform(loc=x0 / 2, scale=0.5).cdf).pvalue > 1e-3


def test_dssn_training_offsets_are_uniform_and_v_is_fixed():
    m = DSSN(0.3, q=16, dim=64, seed=0)  # L = 16
    torch.manual_seed(5)
    x = torch.randint(0, 17, (1, 64)).float() / 16
    table = m.offsets(x)[0]  # (L, dim): one row per offset
    assert len({tuple(r.tolist()) for r in table}) == m.levels, "offsets must give distinct samples here"
    draws = m.sample(x.expand(8000, 64).contiguous())
    # every training sample is exactly one of the L deterministic offsets (same v always)
    match = (draws.unsqueeze(1) == table.unsqueeze(0)).all(-1)
    assert bool((match.sum(1) == 1).all())
    counts = match.sum(0).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_dssn_seed_changes_v_reproducibly():
    a, b, c = DSSN(1.0, 255, 3072, seed=0), DSSN(1.0, 255, 3072, seed=0), DSSN(1.0, 255, 3072, seed=1)
    assert torch.equal(a.v, b.v) and not torch.equal(a.v, c.v)
    np.testing.assert_array_equal(a.v.numpy(), np.random.RandomState(0).randint(a.levels, size=3072))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1.0", None, True])
def test_bad_sigma_is_rejected_clearly(bad):
    for ctor in (lambda s: Uniform(s), lambda s: SSN(s), lambda s: DSSN(s, 16, 64)):
        with pytest.raises(ValueError, match="sigma"):
            ctor(bad)


def test_other_nonsense_is_rejected():
    with pytest.raises(ValueError, match="unknown DSSN arithmetic 'fast'"):
        DSSN(0.5, q=16, dim=4, arithmetic="fast")
    with pytest.raises(ValueError, match="q must be"):
        DSSN(0.5, q=0, dim=4)
    with pytest.raises(ValueError, match="dim must be"):
        DSSN(0.5, q=16, dim=2.5)
    with pytest.raises(ValueError, match="seed must be"):
        DSSN(0.5, q=16, dim=4, seed=-1)
    with pytest.raises(ValueError, match="too small"):
        DSSN(0.001, q=16, dim=4)
    with pytest.raises(TypeError):
        DSSN(0.5)  # q and dim are required
    m = DSSN(0.5, q=16, dim=4)
    with pytest.raises(ValueError, match="dim=4"):
        m.offsets(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="offset range"):
        m.offsets(torch.zeros(2, 4), 0, m.levels + 1)


@pytest.mark.parametrize("value", [0.5 / 16 + 1e-2, 0.3, -1 / 16, 17 / 16, float("nan")])
def test_dssn_rejects_inputs_off_the_grid(value):
    m = DSSN(0.5, q=16, dim=4)
    x = torch.zeros(3, 4)
    x[1, 2] = value
    with pytest.raises(OffGridError, match=r"off the quantization grid k/16: example 1, coordinate 2"):
        m.offsets(x, 0, 1)
    with pytest.raises(OffGridError):
        m.sample(x)


@pytest.mark.parametrize("sigma,q", [(1e9, 16), (300.0, 255), (2e5, 4)])
def test_absurd_sigma_is_refused_before_allocating_the_table(sigma, q):
    with pytest.raises(ValueError, match=r"split offsets.*choose a smaller sigma"):
        DSSN(sigma, q=q, dim=64)


def test_the_table_limit_counts_q_plus_one_rows_of_2l_entries(monkeypatch):
    """At most _MAX_TABLE entries in the (q + 1) x 2L lookup table, checked at a small limit: a table of exactly the limit
    is built, one offset more is refused before allocating, naming how many offsets would fit."""
    import ssn_exp.noises as noises

    monkeypatch.setattr(noises, "_MAX_TABLE", 64)

    def sigma(levels: int, q: int) -> float:  # L = floor(2 sqrt(3) sigma q)
        return (levels + 0.5) / (2 * math.sqrt(3) * q)

    assert DSSN(sigma(8, 3), q=3, dim=2).levels == 8  # 4 x 16 = 64 entries
    with pytest.raises(ValueError, match=r"L = 9 split offsets for q=3; DSSN enumerates at most 8 here"):
        DSSN(sigma(9, 3), q=3, dim=2)  # 4 x 18 = 72


def test_the_largest_allowed_dssn_is_built():
    m = DSSN(MAX_LEVELS / (2 * np.sqrt(3) * 4) * 0.999, q=4, dim=3)
    assert 0.99 * MAX_LEVELS < m.levels <= MAX_LEVELS


def test_dssn_keeps_float64_inputs_in_float64_with_the_exact_table_s_values():
    m = DSSN(0.5, q=16, dim=4)  # (every noise keeps float64: tests/test_noise_contract.py)
    x = torch.randint(0, 17, (3, 4), dtype=torch.float64) / 16
    out = m.noisy(x, 0, 5)
    assert out.dtype == torch.float64
    table = torch.from_numpy(exact_table(16, m.levels))  # the float64 values of the exact table, not float32 ones
    k = (x * 16).round().long()  # (3, 4)
    for j in range(5):
        assert torch.equal(out[:, j], table[k, (m.v + j) % m.levels])
    torch.testing.assert_close(out.float(), m.noisy(x.float(), 0, 5), rtol=0, atol=0)


def test_dssn_accepts_8bit_images_as_torchvision_makes_them():
    m = DSSN(0.5, q=255, dim=3 * 4 * 4)
    img = torch.arange(48, dtype=torch.uint8).view(1, 3, 4, 4) * 5
    x = img.float().div(255)  # what ToTensor does
    assert m.offsets(x, 0, 2).shape == (1, 2, 48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dssn_noise_and_counts_are_identical_on_cuda():
    from ssn_exp.certify import count_predictions

    m = DSSN(1.25, q=255, dim=3 * 8 * 8, seed=0)
    x = torch.randint(0, 256, (4, 3, 8, 8)).float() / 255
    torch.testing.assert_close(m.offsets(x.cuda()).cpu(), m.offsets(x), rtol=0, atol=0)

    def f(z):  # integer-valued logits: the same argmax on every device
        return torch.stack([(z.flatten(1)[:, i::10] * 255).round().sum(1) for i in range(10)], 1)

    a = count_predictions(f, x, m, m.levels, 10, noise_batch=333)
    b = count_predictions(f, x.cuda(), m, m.levels, 10, noise_batch=4096).cpu()
    assert torch.equal(a, b)
