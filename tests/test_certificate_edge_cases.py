"""Behaviour the mutation run (`make mutation`, issue #11) found untested: each test pins something a user can observe
(a value, a default, a boundary, an input check, the exception type) that a surviving mutant had changed.

Small inputs and lambda "models" only: the whole file runs in about two seconds.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.special import betainc
from scipy.stats import beta

from helpers import SAMPLED_NOISES, all_noises
from ssn_exp.certify import (
    NonFiniteLogitsError,
    SmoothedClassifier,
    average_certified_radius,
    best_over_sigma,
    box_radius,
    certified_accuracy,
    certified_count,
    certify_batch,
    clopper_pearson_lower,
    count_predictions,
    exact_certificate,
    input_dtype,
    randomized_radius,
    top_class,
)
from ssn_exp.certify.core import MIN_LEVEL, beta_quantile_below, check_level
from ssn_exp.certify.procedures import ProcedureError
from ssn_exp.noises import (
    DSSN,
    MAX_LEVELS,
    SSN,
    InputDomainError,
    OffGridError,
    SampledNoise,
    Uniform,
    check_unit_box,
    exact_table,
    levine2021_table,
)


def _zeros_model(num_classes=2):
    return lambda z: torch.zeros(z.shape[0], num_classes)


def _recorder(num_classes=2):
    """A constant 'model' that keeps every batch it is given."""
    seen = []

    def f(z):
        seen.append(z.clone())
        return torch.zeros(z.shape[0], num_classes)

    return f, seen


def _grid_images(n, q=16, shape=(1, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, q + 1, (n, *shape), generator=g).float() / q


# ============================================================================ smoothing: the input domain


def test_check_unit_box_names_the_bad_value_of_scalars_and_flat_vectors():
    with pytest.raises(InputDomainError, match=r"example 0, coordinate 0 has value 2\.0"):
        check_unit_box(torch.tensor(2.0))
    with pytest.raises(InputDomainError, match=r"example 1, coordinate 0 has value -0\.5"):
        check_unit_box(torch.tensor([0.5, -0.5, 0.25]))
    with pytest.raises(InputDomainError, match="floating-point"):
        check_unit_box(torch.zeros(2, 3, dtype=torch.uint8))
    check_unit_box(torch.tensor(0.5))
    check_unit_box(torch.tensor([0.0, 1.0]))
    check_unit_box(torch.zeros(0, 3))


# ============================================================================ smoothing: the randomized methods


# a seeded generator makes every noise reproducible: tests/test_noise_contract.py


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_ssn_splits_at_s_bit_for_bit_with_ties_going_down(sigma):
    # lam >= 1/2: x_tilde = ([x > s] + min(s, 1)) / 2 with s = 2 lam U(0, 1); where x == s the input goes down
    m = SSN(sigma)
    s = torch.rand(16, 64, generator=torch.Generator().manual_seed(1)).mul_(2.0 * m.lam)
    x = _grid_images(16, shape=(64,), seed=2)
    x[:, ::2] = torch.where(s[:, ::2] <= 1, s[:, ::2], x[:, ::2])  # half the pixels sit exactly on their split
    assert bool((x == s).any())
    want = ((x > s).float() + s.clamp(max=1.0)) * 0.5
    assert torch.equal(m.sample(x, generator=torch.Generator().manual_seed(1)), want)
    assert torch.equal(m.split(x, s), want)


def test_ssn_split_below_lambda_half_is_the_general_formula():
    m = SSN(0.1)
    x = _grid_images(4, shape=(32,))
    s = torch.rand(4, 32, generator=torch.Generator().manual_seed(3)) * (2 * m.lam)
    out = m.split(x, s)
    assert torch.equal(out, m.split_general(x, s))
    w = 2 * m.lam  # (min(c, 1) + max(c - 2 lam, 0)) / 2 with c the split point above x
    c = w * torch.ceil((x - s) / w) + s
    torch.testing.assert_close(out, (c.clamp(max=1) + (c - w).clamp(min=0)) / 2, rtol=0, atol=0)


def test_describe_and_repr():
    lam = math.sqrt(3) * 0.25
    assert Uniform(0.25).describe() == {"method": "uniform", "sigma": 0.25, "lambda": lam}
    assert SSN(0.25).describe() == {"method": "ssn", "sigma": 0.25, "lambda": lam}
    assert repr(Uniform(0.25)) == "Uniform(sigma=0.25)"
    m = DSSN(0.5, q=16, dim=8)
    assert m.describe() == {
        "method": "dssn",
        "sigma": 0.5,
        "lambda": math.sqrt(3) * 0.5,
        "q": 16,
        "levels": 27,
        "seed": 0,
        "arithmetic": "exact",
    }
    d = DSSN(0.5, q=16, dim=8, seed=3, arithmetic="levine2021").describe()
    assert (d["seed"], d["arithmetic"]) == (3, "levine2021")


# ============================================================================ smoothing: DSSN construction


def test_dssn_default_seed_is_zero():
    m = DSSN(0.5, q=16, dim=8)
    assert m.seed == 0
    np.testing.assert_array_equal(m.v.numpy(), np.random.RandomState(0).randint(m.levels, size=8))


def test_dssn_accepts_the_smallest_q_and_dim_and_every_32_bit_seed():
    m = DSSN(0.5, q=1, dim=1, seed=2**32 - 1)  # 2 lam q = 1.73: one split offset at s = 1/2
    assert (m.q, m.dim, m.levels) == (1, 1, 1)
    assert m.offsets(torch.tensor([[0.0], [1.0]])).view(-1).tolist() == [0.25, 0.75]
    assert DSSN(0.5, q=16, dim=4, seed=64).seed == 64
    with pytest.raises(ValueError, match=r"seed must be < 2\*\*32"):  # ours, not numpy's
        DSSN(0.5, q=16, dim=4, seed=2**32)


def test_dssn_with_exactly_max_levels_is_built_and_one_more_is_refused():
    # q = 1: L = floor(2 lam) (a small table even at a million offsets)
    assert DSSN((MAX_LEVELS + 0.5) / (2 * math.sqrt(3)), q=1, dim=2).levels == MAX_LEVELS
    with pytest.raises(ValueError, match=f"needs L = {MAX_LEVELS + 1:,} split offsets"):
        DSSN((MAX_LEVELS + 1.5) / (2 * math.sqrt(3)), q=1, dim=2)


def test_the_refusal_states_the_largest_l_this_q_allows():
    # 2 (q + 1) L <= 2**27 table entries: for q = 255 at most 2**27 // 512 = 262,144 offsets
    with pytest.raises(
        ValueError, match=r"needs L = 265,003 split offsets for q=255; DSSN enumerates at most 262,144 here"
    ):
        DSSN(300.0, q=255, dim=4)
    with pytest.raises(ValueError, match=r"for q=16; DSSN enumerates at most 1,000,000 here"):
        DSSN(1e9, q=16, dim=4)


def test_dssn_exact_arithmetic_builds_the_exactly_rounded_table_not_the_levine2021_one():
    exact = DSSN(0.5, q=255, dim=4, arithmetic="exact")
    theirs = DSSN(0.5, q=255, dim=4, arithmetic="levine2021")
    L = exact.levels
    want_exact = exact_table(255, L).astype(np.float32)
    want_theirs = levine2021_table(255, L, exact.lam)
    assert (want_exact != want_theirs).any()  # they do differ (by an ulp) for q = 255
    assert exact._table.dtype == torch.float32 and theirs._table.dtype == torch.float32
    np.testing.assert_array_equal(exact._table.numpy(), want_exact.reshape(-1))
    np.testing.assert_array_equal(theirs._table.numpy(), want_theirs.reshape(-1))
    # and the noise follows the table: every grid value, every offset
    x = torch.arange(256, dtype=torch.float32).div(255).view(64, 4)
    k = torch.arange(256).view(64, 4)
    for m, table in ((exact, want_exact), (theirs, want_theirs)):
        m_idx = (m.v.view(1, 1, 4) + torch.arange(L).view(1, -1, 1)) % L  # (1, L, 4)
        want = torch.from_numpy(table)[k.unsqueeze(1), m_idx]
        assert torch.equal(m.offsets(x), want)


def test_dssn_noise_is_exact_when_table_indices_pass_2_to_the_24():
    # q = 255, L = 32832: 511 L < 2**24 < 512 L, so the indices k 2L + v + j of the last row reach past 2**24, where
    # float32 no longer holds every integer (the fast path computes them in float32 only for smaller tables)
    q, L, dim = 255, 32_832, 64
    m = DSSN((L + 0.5) / (2 * math.sqrt(3) * q), q=q, dim=dim)
    assert m.levels == L
    s = (np.arange(L) + 0.5) / q  # x = 1: x_tilde = ([1 > s] + min(s, 1)) / 2
    row = torch.from_numpy(np.where(s < 1, (1 + s) / 2, 0.5).astype(np.float32))
    v = m.v.view(1, -1)
    x = torch.ones(256, dim)
    # every offset j of one image
    assert torch.equal(m.offsets(x[:1])[0], row[(v + torch.arange(L).view(-1, 1)) % L])
    # training noise: offset j ~ U{0, ..., L - 1} per example (drawn from the generator first)
    j = torch.randint(0, L, (256, 1), generator=torch.Generator().manual_seed(7))
    assert torch.equal(m.sample(x, generator=torch.Generator().manual_seed(7)), row[(v + j) % L])


# ============================================================================ smoothing: DSSN's grid check


def test_dssn_quantize_gives_the_integer_grid_index_on_both_paths():
    m = DSSN(0.5, q=255, dim=4)
    k = torch.tensor([[0, 1, 2, 255], [63, 64, 128, 254]])
    for dtype in (torch.float32, torch.float64):
        out = m.quantize((k / 255).to(dtype))
        assert out.dtype == torch.int64 and torch.equal(out, k)
    small = torch.tensor([[0, 1, 2, 3]])  # values far below 1: k is not 0
    assert torch.equal(m.quantize(small.float() / 255), small)
    with pytest.raises(OffGridError):
        m.quantize(torch.full((1, 4), 0.3))


def test_dssn_rejects_values_above_one_even_when_they_are_multiples_of_1_over_q():
    m = DSSN(0.5, q=16, dim=4)
    for x in (torch.full((2, 4), 2.0), torch.full((2, 4), 17 / 16)):
        with pytest.raises(OffGridError, match="off the quantization grid"):
            m.quantize(x)
        with pytest.raises(OffGridError):
            m.offsets(x, 0, 1)


def test_dssn_grid_tolerance_is_inclusive_and_the_float32_check_does_not_widen_it():
    # |x q - k| <= 1e-3 is accepted, boundary included (float64 inputs: the float64 check)
    assert DSSN(0.5, q=1, dim=1).quantize(torch.tensor([[0.001]], dtype=torch.float64)).tolist() == [[0]]
    # this float32 x is 1e-3 + 5e-8 away from 52/255, but x * 255 rounded to float32 is 1e-3 - 5e-7 away
    x = torch.tensor([[0.2039254903793335]])
    assert abs(float(x) * 255 - 52) > 1e-3 and abs(float(x * 255) - 52) < 1e-3
    m = DSSN(0.5, q=255, dim=1)
    with pytest.raises(OffGridError):
        m.quantize(x)
    with pytest.raises(OffGridError):
        m.offsets(x)


def test_dssn_with_a_grid_finer_than_4096_checks_in_float64():
    m = DSSN(0.01, q=5000, dim=3)
    k = torch.tensor([[0, 2500, 5000], [1, 2, 4999]])
    assert torch.equal(m.quantize((k / 5000).float()), k)
    assert m.offsets((k / 5000).float(), 0, 2).shape == (2, 2, 3)
    with pytest.raises(OffGridError):
        m.quantize(torch.tensor([[0.5001, 0.0, 1.0]]))


def test_dssn_off_grid_error_names_the_example_coordinate_and_value():
    m = DSSN(0.5, q=16, dim=4)
    with pytest.raises(OffGridError, match=r"example 0, coordinate 3 has value 0\.3 "):
        m.quantize(torch.tensor([[0.0, 0.0, 0.0, 0.3]], dtype=torch.float64))


def test_dssn_shape_and_dtype_errors_are_value_errors():
    m = DSSN(0.5, q=16, dim=4)
    with pytest.raises(ValueError, match=r"DSSN expects a batch of inputs \(batch, \.\.\.\), got shape \(4,\)"):
        m.offsets(torch.zeros(4))
    with pytest.raises(ValueError, match="DSSN expects floating-point inputs"):
        m.offsets(torch.zeros(2, 4, dtype=torch.int64))


def test_dssn_empty_offset_ranges_and_noisy():
    # (not an empty batch: DSSN._flat's reshape(0, -1) raises RuntimeError on one, a bug reported separately)
    m = DSSN(0.5, q=16, dim=4)
    x = _grid_images(2, shape=(4,))
    assert m.offsets(x, 3, 3).shape == (2, 0, 4)
    assert torch.equal(m.noisy(x, 2, 5), m.offsets(x)[:, 2:5])


# ============================================================================ certify.core: certificates


def test_top_class_takes_a_single_class_and_rejects_other_shapes():
    assert top_class(np.array([[3], [0]])).tolist() == [0, 0]
    for bad in (np.array([1, 2]), np.zeros((2, 0), dtype=np.int64)):
        with pytest.raises(ValueError, match="counts must have shape"):
            top_class(bad)


def test_exact_certificate_needs_a_matrix_of_two_classes_or_more():
    for bad in (np.array([3, 1]), np.array([[3], [1]])):
        with pytest.raises(ValueError, match=r"counts must have shape \(n, classes >= 2\)"):
            exact_certificate(bad)


def test_clopper_pearson_default_alpha_edges_and_validation():
    np.testing.assert_array_equal(clopper_pearson_lower(37, 100), beta.ppf(0.0005, 37, 64))  # alpha = 0.001
    np.testing.assert_allclose(clopper_pearson_lower([0, 10], 10, 0.05), [0.0, 0.025**0.1], rtol=1e-12)
    for n_a in (-1, 11, [3, -2]):
        with pytest.raises(ValueError, match=r"^n_A must lie in \[0, N\]$"):
            clopper_pearson_lower(n_a, 10)
    for alpha in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
            clopper_pearson_lower(5, 10, alpha)


def test_randomized_radius_is_computed_in_float64():
    p = np.array([0.7, 0.9999], dtype=np.float32)
    r = randomized_radius(p, 0.3)
    assert r.dtype == np.float64
    np.testing.assert_array_equal(r, 2.0 * 0.3 * (p.astype(np.float64) - 0.5))


# ============================================================================ certify.core: counting


def test_input_dtype_of_modules_callables_and_integer_inputs():
    x64 = torch.zeros(1, 2, dtype=torch.float64)
    assert input_dtype(lambda z: z, x64) == torch.float64
    assert input_dtype(lambda z: z, torch.zeros(1, 2, dtype=torch.uint8)) == torch.float32
    assert input_dtype(torch.nn.Linear(2, 2).half(), x64) == torch.float16

    seen = []

    class BufferOnly(torch.nn.Module):  # no parameters: its floating buffer decides
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(1, dtype=torch.float64))

        def forward(self, z):
            seen.append(z.dtype)
            return torch.zeros(z.shape[0], 2, dtype=z.dtype) * self.scale

    assert input_dtype(BufferOnly(), torch.zeros(1, 2)) == torch.float64
    count_predictions(BufferOnly(), _grid_images(1), Uniform(0.5), 4, 2)
    assert seen == [torch.float64]


@pytest.mark.parametrize("value", [0, 1, -0.5, 1.5, True, False, "0.5", None, float("nan")])
def test_a_level_outside_0_1_is_refused_naming_it(value):
    with pytest.raises(ValueError) as info:
        check_level("procedure.alpha", value)
    assert str(info.value) == f"procedure.alpha must lie in (0, 1), got {value!r}"


def test_a_level_is_a_float_whose_derived_levels_are_normal_floats():
    assert check_level("alpha", 0.001) == 0.001 and type(check_level("alpha", np.float32(0.5))) is float
    assert check_level("alpha", MIN_LEVEL) == MIN_LEVEL  # (share 1: the level itself) the smallest normal float
    assert check_level("alpha", 2 * MIN_LEVEL, share=0.5) == 2 * MIN_LEVEL
    for value, share in ((MIN_LEVEL / 2, 1.0), (1.5 * MIN_LEVEL, 0.5)):
        with pytest.raises(ValueError) as info:
            check_level("alpha", value, **({} if share == 1.0 else {"share": share}))  # share 1 by default
        assert str(info.value) == (
            f"alpha={value!r} is too small: a bound would be computed at {value * share!r}, below the smallest normal "
            f"float {MIN_LEVEL!r}"
        )
    levels = check_level("alphas", np.array([0.5, MIN_LEVEL, 2 * MIN_LEVEL], dtype=np.float64))
    assert levels.dtype == np.float64 and levels.tolist() == [0.5, MIN_LEVEL, 2 * MIN_LEVEL]
    assert check_level("alphas", np.array([0.5, 0.25], dtype=np.float32)).dtype == np.float64
    assert check_level("alphas", np.array([0.5, 2 * MIN_LEVEL]), share=0.5).tolist() == [0.5, 2 * MIN_LEVEL]
    for bad, share in (([0.5, 1.0], 1.0), ([0.5, 1.5], 1.0), ([0.5, MIN_LEVEL / 2], 1.0), ([1.5 * MIN_LEVEL], 0.5)):
        with pytest.raises(ProcedureError) as info:
            check_level("alphas", np.array(bad), share=share, error=ProcedureError)
        assert str(info.value) == f"alphas must lie in [{MIN_LEVEL!r}, 1)"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy's ppf, called here to show where it fails
@pytest.mark.parametrize("level, a, b", [(1e-300, 5, 100_000), (1e-300, 2, 10), (1e-100, 2, 100)])
def test_beta_quantile_below_is_scipy_s_quantile_or_the_largest_float_below_it(level, a, b):
    assert beta_quantile_below(0.001, 3, 10) == beta.ppf(0.001, 3, 10)  # where scipy's inversion converges
    # here scipy's ppf gives a point above the quantile: far above, or by 9% (1e-100, 2, 100)
    assert betainc(a, b, beta.ppf(level, a, b)) > level * (1 + 1e-9)
    q = beta_quantile_below(level, a, b)
    assert np.ndim(q) == 0 and isinstance(q, np.floating)  # a scalar for scalars
    assert betainc(a, b, q) <= level < betainc(a, b, np.nextafter(q, 1.0))
    both = beta_quantile_below(np.array([level, 0.001]), np.array([a, 3]), np.array([b, 10]))
    assert both.shape == (2,) and both.tolist() == [q, beta.ppf(0.001, 3, 10)]
    assert beta_quantile_below([level, level], a, b).tolist() == [q, q]  # broadcast


def test_count_predictions_never_hands_the_model_more_than_noise_batch_inputs():
    f, seen = _recorder()
    counts = count_predictions(f, _grid_images(4), Uniform(0.5), n=3, num_classes=2, noise_batch=5)
    assert max(len(z) for z in seen) <= 5 and sum(len(z) for z in seen) == 12
    assert counts.tolist() == [[3, 0]] * 4


def test_default_noise_batch_is_1024():
    f, seen = _recorder()
    x = _grid_images(1)
    count_predictions(f, x, Uniform(0.5), n=2048, num_classes=2)
    assert [len(z) for z in seen] == [1024, 1024]
    seen.clear()
    certify_batch(f, x, Uniform(0.5), 2, n0=64, n=2048)
    assert [len(z) for z in seen] == [64, 1024, 1024]
    seen.clear()
    certify_batch(f, x, Uniform(0.5), 2, n0=64, n=250, noise_batch=100)  # and a given one is passed on
    assert [len(z) for z in seen] == [64, 100, 100, 50]


def test_each_procedure_defaults_to_noise_batch_1024_and_passes_a_given_one_on():
    from ssn_exp.certify.procedures import Exact, FixedSample

    f, seen = _recorder()
    x = _grid_images(1)
    dssn = DSSN(20.0, q=16, dim=4)
    runs = {  # procedure, noise, its passes as (sizes by default, sizes with noise_batch=100)
        "exact": (Exact(), dssn, ([1024, dssn.support - 1024], [100] * 11 + [dssn.support - 1100])),
        "fixed": (FixedSample(n0=64, n=2048), Uniform(0.5), ([64, 1024, 1024], [64] + [100] * 20 + [48])),
    }
    for name, (procedure, noise, (default, given)) in runs.items():
        for kw, want in (({}, default), ({"noise_batch": 100}, given)):
            for stream in (False, True):
                seen.clear()
                generators = [torch.Generator().manual_seed(0)]
                if stream:
                    list(procedure.certify_batches(f, [(x, generators, None)], noise, 2, **kw))
                else:
                    procedure.certify(f, x, noise, 2, generator=generators, **kw)
                assert [len(z) for z in seen] == want, (name, kw, stream)


def test_count_predictions_rejects_bad_arguments_and_logits_of_the_wrong_shape():
    x = _grid_images(1)
    with pytest.raises(ValueError, match=r"the model gives 3 logits per input; expected num_classes=5"):
        count_predictions(_zeros_model(3), x, Uniform(0.5), n=8, num_classes=5)
    with pytest.raises(ValueError, match="noise_batch must be >= 1"):
        count_predictions(_zeros_model(), x, Uniform(0.5), n=8, num_classes=2, noise_batch=0)
    m = DSSN(0.5, q=16, dim=4)
    with pytest.raises(ValueError, match=r"offset range \[0, 28\) outside \[0, 27\)"):
        count_predictions(_zeros_model(), x, m, n=m.levels + 1, num_classes=2)


def test_non_finite_logits_blame_only_the_bad_example_and_carry_its_position():
    assert NonFiniteLogitsError("m", positions=[2, 5]).positions == [2, 5]
    assert NonFiniteLogitsError("m").positions == []
    x = torch.zeros(3, 1, 2, 2)
    x[1, 0, 0, 0] = 1.0

    def nan_for_the_second(z):  # lam = 0.087: the marked pixel stays above 1/2
        out = torch.zeros(z.shape[0], 2)
        out[z.reshape(z.shape[0], -1)[:, 0] > 0.5] = float("nan")
        return out

    # noise_batch 1000 >> n: all three examples share one call of the model
    with pytest.raises(NonFiniteLogitsError, match=r"1 of 3 examples \(batch positions \[1\]\)") as e:
        count_predictions(nan_for_the_second, x, Uniform(0.05), n=8, num_classes=2, noise_batch=1000)
    assert e.value.positions == [1]


def test_progress_reports_every_forward_pass():
    done = []
    x = _grid_images(2, shape=(4,))
    certify_batch(_zeros_model(), x, Uniform(0.5), 2, n0=5, n=7, noise_batch=4, progress=done.append)
    assert sum(done) == 2 * (5 + 7) and all(isinstance(v, int) for v in done)
    done.clear()
    m = DSSN(0.5, q=16, dim=4)
    certify_batch(_zeros_model(), x, m, 2, noise_batch=10, progress=done.append)
    assert sum(done) == 2 * m.levels


# ============================================================================ certify.core: certify_batch


def test_certify_batch_defaults():
    cert = certify_batch(_zeros_model(), torch.full((1, 1, 1, 2), 0.5), Uniform(0.5), 2)
    assert cert.method == "uniform"
    assert cert.counts_n0.tolist() == [[64, 0]] and cert.counts.tolist() == [[100_000, 0]]
    assert cert.forward_passes == 100_064
    np.testing.assert_array_equal(cert.p_lower, clopper_pearson_lower([100_000], 100_000, 0.001))


def test_certify_batch_uses_the_given_alpha():
    cert = certify_batch(_zeros_model(), _grid_images(2), SSN(0.5), 2, n0=4, n=50, alpha=0.05)
    np.testing.assert_array_equal(cert.p_lower, clopper_pearson_lower([50, 50], 50, 0.05))
    np.testing.assert_array_equal(cert.radius, randomized_radius(cert.p_lower, SSN(0.5).lam))
    dssn = certify_batch(_zeros_model(), _grid_images(2), DSSN(0.5, q=16, dim=4), 2)
    assert dssn.method == "dssn" and dssn.k.tolist() == [13, 13]


def test_certify_batch_checks_its_arguments_before_any_forward_pass():
    f, seen = _recorder()
    x = _grid_images(1)
    for n0, n, bad in ((0, 10, "n0"), (10, 0, "n"), (0, 0, "n0"), (-1, 10, "n0")):
        with pytest.raises(ValueError, match=rf"^procedure\.{bad} must be an integer >= 1"):
            certify_batch(f, x, Uniform(0.5), 2, n0=n0, n=n)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
            certify_batch(f, x, Uniform(0.5), 2, n0=4, n=4, alpha=alpha)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        certify_batch(f, x, Uniform(0.5), 1, n0=4, n=4)
    assert seen == []
    cert = certify_batch(f, x, Uniform(0.5), 2, n0=1, n=1)  # the smallest sample sizes are fine
    assert cert.counts_n0.tolist() == [[1, 0]] and cert.counts.tolist() == [[1, 0]] and cert.forward_passes == 2


@pytest.mark.parametrize("name", SAMPLED_NOISES)
def test_certify_batch_draws_its_noise_from_the_generator(name):
    f, seen = _recorder()
    x = _grid_images(2)
    noise = all_noises()[name]
    certify_batch(f, x, noise, 2, n0=4, n=6, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the selection samples, then the estimation samples, from g
    assert torch.equal(seen[0], noise.noisy(x, 0, 4, g).reshape(-1, *x.shape[1:]))
    assert torch.equal(seen[1], noise.noisy(x, 0, 6, g).reshape(-1, *x.shape[1:]))


def test_box_radius_is_only_reported_for_smoothings_that_declare_it():
    class Shift(SampledNoise):  # a third-party randomized smoothing without the box certificate
        name = "shift"

        def scale(self, sigma):
            return sigma

        def radius(self, p_lower):
            return randomized_radius(p_lower, self.lam)

        def _draw(self, x, generator):
            return x + torch.rand(x.shape, generator=generator, dtype=x.dtype)

    cert = certify_batch(_zeros_model(), _grid_images(2), Shift(0.5), 2, n0=4, n=8)
    assert cert.method == "shift" and cert.radius_box is None and cert.radius.shape == (2,)


def test_smoothed_classifier_certifies_with_its_settings_and_overrides():
    class Prefers1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.0, 1.0]))

        def forward(self, z):
            return self.bias.expand(z.shape[0], 2)

    model, noise = Prefers1().train(), Uniform(0.5)
    clf = SmoothedClassifier(model, noise, 2, n0=4, n=10, noise_batch=3)
    assert clf.model is model and clf.smoothing is noise and clf.num_classes == 2
    assert clf.certify_kwargs == {"n0": 4, "n": 10, "noise_batch": 3}
    x = _grid_images(3)
    cert = clf.certify(x)
    assert not model.training  # certify puts the model in eval mode
    assert cert.method == "uniform" and cert.forward_passes == 14 and cert.counts.tolist() == [[0, 10]] * 3
    assert clf.certify(x, n=20).forward_passes == 24
    done = []
    assert clf.predict(x, progress=done.append).tolist() == [1, 1, 1]
    assert sum(done) == 3 * 14
    dssn = SmoothedClassifier(_zeros_model(), DSSN(0.5, q=16, dim=4), 2)
    assert dssn.certify(x).k.tolist() == [13, 13, 13] and dssn.predict(x).tolist() == [0, 0, 0]


# ============================================================================ certify.metrics


def test_certified_count_decides_decimal_and_integer_radii_exactly():
    # rho = k/q: k = 1, q = 10 is exactly the decimal 0.1 (the float 0.1 is slightly more than 1/10)
    assert certified_count([True], np.array([1]), 0.1, q=10) == 1
    assert certified_count([True, True], np.array([3, 4]), 1, q=4) == 1  # an int radius: k >= 4
    assert certified_count([True], np.array([1]), Fraction(1, 3), q=3) == 1


def test_certified_count_takes_any_zero_one_mask_as_correct():
    assert certified_count(np.array([1.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.1]), 0.5) == 1
    assert certified_count(np.array([2, 0]), np.array([1, 1]), 0.5, q=2) == 1


def test_metrics_of_a_single_example_and_of_none():
    assert certified_accuracy([True], [0.7], radii=[0.5]) == {0.5: 1.0}
    assert average_certified_radius([True], [0.7]) == 0.7
    assert average_certified_radius([True], [3], q=4) == 0.75
    with pytest.raises(ValueError, match="^no examples$"):
        certified_accuracy([], [], radii=[0.5])
    with pytest.raises(ValueError, match="^no examples$"):
        average_certified_radius([], [])
    with pytest.raises(ValueError, match="^no runs to pick from$"):
        best_over_sigma([])


def test_acr_of_float32_radii_is_averaged_in_float64():
    # the authors' stored radii are float32 (authors_radius_float32): their mean is taken in float64
    r = np.array([0.1, 0.2, 0.7], dtype=np.float32)
    want = float(np.mean(r.astype(np.float64)))
    assert want != float(np.mean(r))  # a float32 mean would differ
    assert average_certified_radius(np.ones(3, bool), r) == want


def test_best_over_sigma_reads_string_keys_and_reports_a_missing_radius():
    runs = [{"sigma": 0.5, "clean_accuracy": 0.9, "certified_accuracy": {"0.5": 0.7, "1.0": 0.2}}]
    assert best_over_sigma(runs, radii=[0.5])[0].certified_accuracy == 0.7
    with pytest.raises(KeyError, match=r"no certified accuracy at radius 2\.0 \(have \[0\.5, 1\.0\]\)"):
        best_over_sigma(runs, radii=[2.0])


# ============================================================================ box


def test_box_radius_takes_a_flat_vector_as_a_batch_of_one_pixel_images():
    x, p = np.array([0.5, 0.1, 1.0]), [0.9, 0.9, 0.6]
    np.testing.assert_array_equal(box_radius(x, p, 1.0), box_radius(x[:, None], p, 1.0))


def test_box_radius_of_zero_pixel_inputs_below_one_half_is_the_standard_radius():
    out = box_radius(np.zeros((2, 0)), [0.3, 0.5], 1.0)
    assert out.dtype == np.float64 and out.tolist() == [2.0 * (0.3 - 0.5), 0.0]


def test_box_radius_is_quiet_for_a_subnormal_lambda():
    x, p = np.array([[0.0, 0.5, 0.25]]), np.array([0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # m / (2 lam) overflows to inf: no RuntimeWarning may escape
        rho = box_radius(x, p, 1e-309)
    np.testing.assert_array_equal(rho, randomized_radius(p, 1e-309))


def test_dssn_handles_an_empty_batch_like_the_other_noises():
    m = DSSN(0.5, q=16, dim=64)
    assert m.offsets(torch.zeros(0, 1, 8, 8)).shape == (0, 27, 64)
    assert m.sample(torch.zeros(0, 1, 8, 8)).shape == (0, 1, 8, 8)
    assert m.quantize(torch.zeros(0, 64)).shape == (0, 64)


def test_box_radius_of_inputs_without_pixels_is_the_standard_radius():
    p = np.array([0.9, 0.5, 0.3])
    np.testing.assert_array_equal(box_radius(np.zeros((3, 0)), p, 1.0), 2.0 * 1.0 * (p - 0.5))


def test_certified_accuracy_takes_numpy_float_radii_with_q():
    k = np.array([8, 7])  # q = 16: 0.5 and 0.4375
    for r in (np.float32(0.5), np.float64(0.5), 0.5):
        assert certified_accuracy(np.ones(2, bool), k, [r], q=16) == {0.5: 0.5}


# ============================================================================ issue 16 section 6: survivors


@pytest.mark.parametrize("smoothing", [Uniform(0.5), DSSN(0.5, q=16, dim=4)], ids=["uniform", "dssn"])
def test_count_predictions_with_no_samples_returns_zeros_without_looking_at_the_input(smoothing):
    def model(z):
        raise AssertionError("no noisy input exists when n = 0")

    x = torch.full((2, 4), 0.37)  # off the DSSN grid and checked by nobody: nothing is drawn
    counts = count_predictions(model, x, smoothing, n=0, num_classes=3)
    assert counts.dtype == torch.int64 and counts.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert count_predictions(model, torch.full((2, 4), 5.0), smoothing, n=0, num_classes=3).sum() == 0


def test_box_radius_takes_bfloat16_and_half_tensors():
    xs = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    want = box_radius(xs.double(), [0.875], 2.0)
    for dtype in (torch.bfloat16, torch.float16):
        np.testing.assert_array_equal(box_radius(xs.to(dtype), torch.tensor([0.875], dtype=dtype), 2.0), want)


def test_clopper_pearson_of_small_integer_counts_does_not_wrap_around():
    # N - n_A + 1 in uint8 would wrap (or refuse N = 1000): the counts are taken as int64
    for counts in (np.array([200, 0, 250], dtype=np.uint8), np.array([100, 0, 120], dtype=np.int8)):
        want = clopper_pearson_lower(counts.astype(np.int64), 1000)
        assert want[0] > 0.05 and want[1] == 0.0
        np.testing.assert_array_equal(clopper_pearson_lower(counts, 1000), want)


@pytest.mark.parametrize(
    "bad, shown", [(10, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]): "), (11, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] ...): ")]
)
def test_non_finite_logits_list_at_most_ten_positions(bad, shown):
    def nan_model(z):
        return torch.full((z.shape[0], 2), float("nan"))

    with pytest.raises(NonFiniteLogitsError) as e:
        count_predictions(nan_model, torch.zeros(bad, 2), Uniform(0.05), n=2, num_classes=2)
    assert str(e.value) == (
        f"the model returned NaN or infinite logits for {bad} of {bad} examples (batch positions "
        f"{shown}no certificate is computed from them"
    )
    assert e.value.positions == list(range(bad))


def test_box_radius_names_the_argument_that_is_not_numeric_or_out_of_range():
    with pytest.raises(ValueError, match=r"^x must be numeric, got str$"):
        box_radius("abc", [0.9], 1.0)
    with pytest.raises(ValueError, match=r"^p_lower must be numeric, got dict$"):
        box_radius(np.zeros((1, 2)), {}, 1.0)
    with pytest.raises(ValueError, match=r"^x must be finite \(found NaN or inf\)$"):
        box_radius(np.array([[np.nan]]), [0.9], 1.0)
    with pytest.raises(ValueError, match=r"^p_lower must lie in \[0, 1\] \(found values outside or NaN\)$"):
        box_radius(np.zeros((1, 2)), [np.nan], 1.0)


def test_certified_count_errors_say_what_to_pass():
    with pytest.raises(ValueError, match=r"^correct \(2,\) and radius \(3,\) differ in shape$"):
        certified_count([True, False], [1, 2, 3], 0.5)
    with pytest.raises(ValueError, match=r"^with q given, radius must hold the integer numerators k$"):
        certified_count([True], [0.5], 0.5, q=2)
    assert certified_count([True, True], [1, 0], 1, q=1) == 1  # q = 1 is a grid too


def test_the_refusal_of_too_many_offsets_says_what_to_change():
    with pytest.raises(
        ValueError, match=r"\(each certificate costs L forward passes per image\): choose a smaller sigma$"
    ):
        DSSN(300.0, q=255, dim=4)
