"""Sequential certification (ssn_exp.certify.sequential_bounds and .sequential; docs/method.md section 13): bounds,
thresholds, exact validity by dynamic programming, Monte Carlo, packing and the driver on a toy model (the helpers
that only verify are in sequential_sim.py)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import betainc, betaln
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from sequential_sim import certify_sequential, false_certificate_probability, simulate, smoothing_noise
from ssn_exp.certify.core import NonFiniteLogitsError, randomized_radius
from ssn_exp.certify.sequential import PackingScheduler
from ssn_exp.certify.sequential_bounds import (
    BOUNDS,
    Schedule,
    SequentialTest,
    cp_lower_bound,
    cp_upper_bound,
    kt_lower_bound,
    kt_upper_bound,
    thresholds_for_radii,
)
from ssn_exp.noises import Uniform


def log_m(a, t, p):
    """log M_t(p) of the KT mixture, straight from its definition (float64)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = np.where(a > 0, a * np.log(p), 0.0) + np.where(t - a > 0, (t - a) * np.log1p(-p), 0.0)
    return betaln(a + 0.5, t - a + 0.5) - math.log(math.pi) - ll


# -- the bounds ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize("a,t", [(1, 1), (3, 10), (32, 32), (90, 96), (500, 1000), (99_000, 100_000), (7, 100_000)])
def test_kt_lower_bound_is_safe_and_tight_against_a_grid(a, t, alpha):
    low = float(kt_lower_bound(a, t, alpha))
    # safe: M_t(L) >= 1/alpha, i.e. L is not inside the confidence set, so it is at or below its infimum
    assert log_m(a, t, low) >= math.log(1 / alpha)
    # brute force: every grid point in [0, a/t] outside the set lies at or below L; the first one inside is above
    grid = np.linspace(0.0, a / t, 200_001)[1:]
    inside = log_m(a, t, grid) < math.log(1 / alpha)
    first_inside = grid[np.argmax(inside)]
    assert inside.any() and first_inside > low
    assert np.all(~inside[grid <= low])
    # tight: just above L the point is inside the set
    step = max(1e-9, 1e-7 * low)
    assert log_m(a, t, low + step) < math.log(1 / alpha)


def test_kt_bounds_edge_cases_and_monotonicity():
    assert kt_lower_bound(0, 10, 0.05) == 0.0
    assert kt_lower_bound(0, 0, 0.05) == 0.0
    assert kt_upper_bound(10, 10, 0.05) == 1.0
    # all successes: h(p) = t log p, the root is closed form
    t = 224
    closed = math.exp((betaln(t + 0.5, 0.5) - math.log(math.pi) + math.log(0.001)) / t)
    assert float(kt_lower_bound(t, t, 0.001)) == pytest.approx(closed, abs=1e-9)
    assert float(kt_lower_bound(t, t, 0.001)) <= closed
    t = 1000
    a = np.arange(t + 1)
    low = kt_lower_bound(a, t, 0.01)
    up = kt_upper_bound(a, t, 0.01)
    assert np.all(np.diff(low) > 0) and np.all(np.diff(up) > 0)
    assert np.all(low <= a / t) and np.all(up >= a / t) and np.all(low < up)
    np.testing.assert_array_equal(up, 1.0 - kt_lower_bound(t - a, t, 0.01))
    # smaller alpha, lower lower bound; more samples at the same frequency, higher lower bound
    assert np.all(kt_lower_bound(a[1:], t, 0.001) < low[1:])
    assert kt_lower_bound(800, 1000, 0.01) < kt_lower_bound(8000, 10_000, 0.01)
    # vectorised over alpha as well
    both = kt_lower_bound([5, 5], [10, 10], [0.01, 0.05])
    assert both[0] == kt_lower_bound(5, 10, 0.01) and both[1] == kt_lower_bound(5, 10, 0.05)


@pytest.mark.parametrize("alpha", [1e-6, 0.001, 0.05])
def test_cp_bounds_are_safe_against_the_binomial_tail(alpha):
    t = 500
    a = np.arange(1, t + 1)
    low = cp_lower_bound(a, t, alpha)
    # the exact one-sided CP bound is the p with P(Bin(t, p) >= a) = alpha; ours is at or below it
    assert np.all(binom.sf(a - 1, t, low) <= alpha * (1 + 1e-6))
    assert np.all(binom.sf(a - 1, t, low + 1e-7) > alpha)
    assert cp_lower_bound(0, t, alpha) == 0.0
    np.testing.assert_allclose(cp_upper_bound(a, t, alpha), 1.0 - cp_lower_bound(t - a, t, alpha))


@pytest.mark.parametrize(
    "call",
    [
        lambda: kt_lower_bound(5, 4, 0.05),
        lambda: kt_lower_bound(-1, 4, 0.05),
        lambda: kt_lower_bound(1.5, 4, 0.05),
        lambda: kt_lower_bound(1, 4, 0.0),
        lambda: kt_lower_bound(1, 4, 1.0),
        lambda: kt_lower_bound(1, 4, float("nan")),
        lambda: cp_lower_bound(1, 4, [0.1, 1.2]),
        lambda: Schedule(first=0),
        lambda: Schedule(first=64, max_batch=32),
        lambda: Schedule(cap=True),
        lambda: SequentialTest([0.5], bound="bogus"),
        lambda: SequentialTest([float("nan")]),
        lambda: SequentialTest([0.5], tolerance=0),
        lambda: SequentialTest([0.5], beta=2),
        lambda: PackingScheduler(0),
    ],
)
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: kt_lower_bound(1, 4, 0.0), "^alpha must lie"),
        (lambda: cp_lower_bound(1, 4, 1.5), "^alpha must lie"),
        (lambda: SequentialTest([0.5], alpha=2), "^alpha must lie"),
        (lambda: SequentialTest([0.5], beta=-1.0), "^beta must lie"),
        (lambda: SequentialTest([0.5], final_share=1.0), "^final_share must lie"),
        (lambda: SequentialTest([0.5], bound="bogus"), "^unknown bound 'bogus'"),
        (lambda: SequentialTest([0.5], schedule=1000), "^schedule must be a Schedule, got int$"),
        (lambda: SequentialTest([0.5, -0.1]), "^thresholds must be probabilities >= 0"),
        (lambda: SequentialTest([None]), "^thresholds must be probabilities >= 0"),
        (lambda: SequentialTest([0.5], tolerance=-1.0), "^tolerance must be > 0"),
        (lambda: thresholds_for_radii(lambda q: 1.0 - q, [0.1]), "^radius_fn decreases"),
        (lambda: thresholds_for_radii(lambda q: q, [0.1, float("nan")]), "^radii must be finite$"),
        (lambda: thresholds_for_radii(lambda q: q, [float("inf")]), "^radii must be finite$"),
        (lambda: thresholds_for_radii(lambda q: q, [None]), "^radii must be finite$"),  # a missing radius (null)
    ],
)
def test_bad_arguments_are_named_in_the_error(call, words):
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.parametrize(
    "a,t,words",
    [
        (1.5, 4, "^success counts must be integers$"),
        (np.inf, 4, "^success counts must be integers$"),
        (1, 4.5, "^trial counts must be integers$"),
        (1, np.nan, "^trial counts must be integers$"),
        (-1, 4, "^counts must satisfy 0 <= successes <= trials$"),
        (5, 4, "^counts must satisfy 0 <= successes <= trials$"),
        (0, -1, "^counts must satisfy 0 <= successes <= trials$"),
    ],
)
def test_bad_counts_are_named(a, t, words):
    for fn in (kt_lower_bound, cp_lower_bound):
        with pytest.raises(ValueError, match=words):
            fn(a, t, 0.05)


def test_counts_may_be_integral_floats():
    for fn in (kt_lower_bound, kt_upper_bound, cp_lower_bound, cp_upper_bound):
        np.testing.assert_array_equal(fn(np.array([0.0, 3.0, 10.0]), 10.0, 0.05), fn([0, 3, 10], 10, 0.05))


def test_bounds_are_silent_and_keep_the_shape_of_their_counts():
    """Every count is a number without a numpy warning (a = 0 and a = t included); a scalar count gives a scalar,
    like scipy; the level may be an array (or a list) per count."""
    t = 10
    a = np.arange(t + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (kt_lower_bound, kt_upper_bound, cp_lower_bound, cp_upper_bound):
            out = fn(a, t, 0.05)
            assert out.shape == a.shape and np.all(np.isfinite(out))
        low = kt_lower_bound(a, t, 0.05)
    assert low[0] == 0.0 and np.all(low[1:] > 0)
    assert isinstance(kt_lower_bound(3, 10, 0.05), float) and np.ndim(kt_lower_bound(3, 10, 0.05)) == 0
    for fn in (kt_lower_bound, cp_lower_bound):
        both = fn([5, 5], [10, 10], [0.01, 0.05])
        assert both[0] == fn(5, 10, 0.01) and both[1] == fn(5, 10, 0.05) and both[0] < both[1]


def test_cp_lower_bound_is_strictly_below_scipy_s_quantile():
    """As documented: alpha shrunk by a relative 1e-9 and the quantile moved one ulp down, so that an inversion
    error of scipy's in the last bits cannot put the bound above the exact one."""
    t = 200
    a = np.arange(1, t + 1)
    for alpha in (1e-6, 0.001, 0.05):
        assert np.all(cp_lower_bound(a, t, alpha) < beta_dist.ppf(alpha * (1 - 1e-9), a, t - a + 1))


@pytest.mark.parametrize("alpha", [1e-100, 1e-200, 1e-300])
def test_cp_lower_bound_guards_its_own_inversion(alpha):
    """Where scipy's beta.ppf does not converge (tiny alpha: NaN, or a point above the quantile, with a warning), the
    bound falls back to bisection on the CDF: always a number whose tail is at most alpha, silently."""
    a = np.array([1, 2, 3, 9, 90, 10_000, 999_999])
    t = np.array([32, 100, 1_000_000, 10, 100, 100_000, 1_000_000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lower = cp_lower_bound(a, t, alpha)
        tail = betainc(a, t - a + 1, lower)
    assert np.all(np.isfinite(lower)) and np.all((lower > 0) & (lower < a / t))
    assert np.all(tail <= alpha), tail / alpha
    assert np.all(tail >= alpha * 1e-6)  # and still a bound, not 0 (bisection finds the quantile)


def test_schedule_grows_then_stays_and_ends_at_the_cap():
    s = Schedule(first=32, growth=2, max_batch=1024, cap=100_000)
    assert s.batches[:7] == (32, 64, 128, 256, 512, 1024, 1024)
    assert s.checkpoints[-1] == 100_000 and sum(s.batches) == 100_000
    assert max(s.batches) == 1024 and len(s) == len(s.checkpoints)
    assert Schedule(first=10, max_batch=10, cap=25).batches == (10, 10, 5)
    assert Schedule(first=100, max_batch=100, cap=30).batches == (30,)


def test_schedule_counts_its_looks_exactly_at_the_limit():
    """MAX_LOOKS = 1024 looks are allowed, one more is refused, with or without a growing start; the refusal is
    immediate even for an absurd cap (nothing is built); every parameter may be 1."""
    assert Schedule(first=1, growth=1, max_batch=1, cap=1).batches == (1,)
    assert len(Schedule(first=1, growth=1, max_batch=1, cap=1024)) == 1024
    assert len(Schedule(first=1, growth=2, max_batch=2, cap=2047)) == 1024  # 1, then 1023 batches of 2
    for kwargs, looks in [
        (dict(first=1, growth=1, max_batch=1, cap=1025), 1025),
        (dict(first=1, growth=2, max_batch=2, cap=2048), 1025),
        (dict(first=1, growth=1, max_batch=2, cap=10**18), 10**18),
        (dict(cap=10**18), 976562500000000 + 5),
    ]:
        with pytest.raises(
            ValueError,
            match=f"^a cap of {kwargs['cap']} samples takes {looks} looks .* more than 1024: lower the cap \\(n\\) or raise max_batch$",
        ):
            Schedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(first=0), "^schedule first must be an integer >= 1, got 0$"),
        (dict(growth=2.0), "^schedule growth must be an integer >= 1, got 2.0$"),
        (dict(max_batch=True), "^schedule max_batch must be an integer >= 1, got True$"),
        (dict(cap=-5), "^schedule cap must be an integer >= 1, got -5$"),
        (dict(first=64, max_batch=32), r"^schedule max_batch \(32\) must be >= first \(64\)$"),
    ],
)
def test_schedule_names_its_bad_parameter(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Schedule(**kwargs)


def test_thresholds_for_radii_invert_the_radius_exactly():
    lam = math.sqrt(3) * 0.5

    def radius(p):
        return randomized_radius(p, lam)

    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    p = thresholds_for_radii(radius, radii)
    assert np.isinf(p[-1])  # 1.0 > lam: never certifiable
    for pi, r in zip(p[:-1], radii[:-1]):
        assert radius(np.array([pi]))[0] >= r
        assert radius(np.array([np.nextafter(pi, 0.0)]))[0] < r
    np.testing.assert_allclose(p[:-1], 0.5 + np.array(radii[:-1]) / (2 * lam))
    np.testing.assert_array_equal(thresholds_for_radii(radius, [-5.0, -lam]), [0.0, 0.0])  # reached at p = 0
    with pytest.raises(ValueError):
        thresholds_for_radii(lambda q: -q, [0.1])


def test_thresholds_for_radii_at_the_edges_of_0_1():
    """A radius reached only at p = 1 has the threshold 1 (not inf); radius_fn is only ever asked about
    probabilities in [0, 1], unreachable radii included; a single radius may be a scalar."""
    lam = 0.5
    seen = []

    def radius(p):
        p = np.asarray(p, dtype=np.float64)
        seen.append(p.copy())
        return randomized_radius(p, lam)

    top = float(radius(np.array([1.0]))[0])
    p = thresholds_for_radii(radius, [top, np.nextafter(top, 2.0), 0.0])
    assert p[0] == 1.0 and np.isinf(p[1]) and p[2] == 0.5
    every = np.concatenate(seen)
    assert np.all((every >= 0.0) & (every <= 1.0))
    np.testing.assert_array_equal(thresholds_for_radii(radius, 0.25), thresholds_for_radii(radius, [0.25]))
    assert thresholds_for_radii(radius, 0.25).shape == (1,)


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("share", [0.25, 0.5])
def test_each_family_spends_exactly_alpha_by_the_union_bound(bound, share):
    """The validity proof's accounting (docs/method.md 13.2): a KT sequence counts once for all its looks,
    every Clopper-Pearson look counts separately; together exactly alpha (and beta for the upper side)."""
    for level in (0.001, 0.05):
        test = SequentialTest([0.5], alpha=level, beta=level / 10, bound=bound, final_share=share)
        for budget, (main, extra) in [(level, test.levels_lower), (level / 10, test.levels_upper)]:
            spent = (main.max() if bound != "union" else main.sum()) + np.nansum(extra)
            assert spent == pytest.approx(budget, rel=1e-12)
            assert np.all(main > 0)
            if bound == "kt":
                assert np.all(main == budget) and np.all(np.isnan(extra))


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_level_shares_with_one_and_two_looks(share):
    """union: one look spends all of alpha; two looks spend 1 - final_share, then final_share at the cap; kt+final
    spends its extra share only at the cap."""
    one = Schedule(first=100, max_batch=100, cap=30)
    two = Schedule(first=8, max_batch=8, cap=16)
    alpha = 0.01
    np.testing.assert_array_equal(
        SequentialTest([0.5], alpha=alpha, schedule=one, final_share=share).levels_lower[0], [alpha]
    )
    main, extra = SequentialTest([0.5], alpha=alpha, schedule=two, final_share=share).levels_lower
    np.testing.assert_allclose(main, [alpha * (1 - share), alpha * share], rtol=1e-15)
    assert np.all(np.isnan(extra))
    three = Schedule(first=8, max_batch=8, cap=24)
    main, extra = SequentialTest([0.5], alpha=alpha, schedule=three, bound="kt+final", final_share=share).levels_lower
    np.testing.assert_allclose(main, alpha * (1 - share), rtol=1e-15)
    assert np.all(np.isnan(extra[:-1])) and extra[-1] == pytest.approx(alpha * share, rel=1e-15)


def test_a_level_that_one_look_would_spend_below_the_normal_floats_is_refused():
    """check_level with the least share of a look: the union bound over ~100 looks spends alpha / 200 at each, so
    alpha = 1e-306 is refused for it (its looks would compute at a subnormal level), and accepted for kt."""
    SequentialTest([0.5], alpha=1e-306, bound="kt")
    SequentialTest([0.5], alpha=1e-306, bound="kt+final", final_share=0.5)
    for kwargs, name in [
        (dict(alpha=1e-306), "alpha"),
        (dict(beta=1e-306), "beta"),
        (dict(alpha=1e-306, bound="kt+final", final_share=1e-3), "alpha"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}=1e-306 is too small"):
            SequentialTest([0.5], **kwargs)


@pytest.mark.parametrize("step", [-1, 10**6])
def test_a_look_outside_the_schedule_is_refused(step):
    test = SequentialTest([0.5], schedule=Schedule(first=8, max_batch=8, cap=16))
    for fn in (test.lower_at, test.upper_at):
        with pytest.raises(ValueError, match=r"^step must lie in \[0, 2\)$"):
            fn(0, step)
        with pytest.raises(ValueError):
            fn(0, len(test.checkpoints))


def test_kt_final_adds_its_clopper_pearson_look_at_the_cap_only():
    """bound=kt+final (docs/method.md 13.2): the KT sequence at alpha (1 - final_share) at every look and, at the cap
    only, the better of it and a Clopper-Pearson bound at alpha final_share (each side)."""
    alpha, w = 0.05, 0.5
    sched = Schedule(first=8, max_batch=64, cap=500)
    final = SequentialTest([0.5], alpha=alpha, beta=alpha, schedule=sched, bound="kt+final", final_share=w)
    last = len(final.checkpoints) - 1
    t = int(final.checkpoints[last])
    a = np.arange(0, t + 1, 10)
    kt_low, cp_low = kt_lower_bound(a, t, alpha * (1 - w)), cp_lower_bound(a, t, alpha * w)
    np.testing.assert_array_equal(final.lower_at(a, last), np.maximum(kt_low, cp_low))
    kt_up, cp_up = kt_upper_bound(a, t, alpha * (1 - w)), cp_upper_bound(a, t, alpha * w)
    np.testing.assert_array_equal(final.upper_at(a, last), np.minimum(kt_up, cp_up))
    assert np.any(cp_low > kt_low) and np.any(cp_up < kt_up)  # the cap look does change the bounds
    t0 = int(final.checkpoints[last - 1])
    np.testing.assert_array_equal(final.lower_at(a[a <= t0], last - 1), kt_lower_bound(a[a <= t0], t0, alpha * (1 - w)))


# -- integer thresholds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", BOUNDS)
def test_integer_thresholds_agree_with_the_bounds_for_every_count(bound):
    p = np.array([0.3, 0.5, 0.8, 0.95, 0.999, np.inf])
    test = SequentialTest(p, alpha=0.05, beta=0.01, schedule=Schedule(first=8, max_batch=256, cap=3000), bound=bound)
    for i, t in enumerate(test.checkpoints):
        a = np.arange(t + 1)
        low = test.lower_at(a, i)
        up = test.upper_at(a, i)
        for j, pj in enumerate(p):
            np.testing.assert_array_equal(low >= pj, a >= test.certify_counts[i, j])
            np.testing.assert_array_equal(up < pj, a <= test.refute_counts[i, j])


@pytest.mark.parametrize("bound", BOUNDS)
def test_integer_thresholds_of_an_unreachable_or_free_threshold(bound):
    """The documented sentinels: an infinite threshold is never certified (t_i + 1) and refuted at every count (t_i);
    the threshold 0 is certified at every count (0) and never refuted (-1)."""
    test = SequentialTest([np.inf, 0.0], alpha=0.05, schedule=Schedule(first=8, max_batch=32, cap=200), bound=bound)
    t = test.checkpoints
    np.testing.assert_array_equal(test.certify_counts, np.stack([t + 1, np.zeros_like(t)], axis=1))
    np.testing.assert_array_equal(test.refute_counts, np.stack([t, np.full_like(t, -1)], axis=1))


def test_integer_thresholds_agree_at_the_boundaries_for_the_full_cap():
    p = np.array([0.6443, 0.7887, 0.9330, 0.9999])
    for bound in BOUNDS:
        test = SequentialTest(p, alpha=0.001, bound=bound)
        steps = np.arange(len(test.checkpoints))
        for j, pj in enumerate(p):
            k = test.certify_counts[:, j]
            ok = k <= test.checkpoints
            assert np.all(test.lower_at(k[ok], steps[ok]) >= pj)
            assert np.all(test.lower_at(k[ok] - 1, steps[ok]) < pj)
            r = test.refute_counts[:, j]
            ok = r >= 0
            assert np.all(test.upper_at(r[ok], steps[ok]) < pj)
            assert np.all(test.upper_at(r[ok] + 1, steps[ok]) >= pj)


# -- exact validity (dynamic programming) -------------------------------------------------------------------

THRESHOLDS = [0.5, 0.78867513, 0.95, 0.999]


def brute_force_hit(p, test, j):
    """P(ever a_t >= certify_counts) by enumerating every path of a tiny schedule."""
    batches = test.schedule.batches
    total = 0.0
    for xs in itertools.product(*[range(b + 1) for b in batches]):
        prob = np.prod([binom.pmf(x, b, p) for x, b in zip(xs, batches)])
        a = np.cumsum(xs)
        if np.any(a >= test.certify_counts[:, j]):
            total += prob
    return total


@pytest.mark.parametrize("bound", BOUNDS)
def test_dp_matches_enumeration_of_every_path(bound):
    test = SequentialTest([0.6], alpha=0.3, schedule=Schedule(first=3, max_batch=6, cap=15), bound=bound)
    for p in [0.4, 0.6, 0.75]:
        prob, err = false_certificate_probability(p, 0.6, test, eps=0.0)
        assert err == 0.0
        assert prob == pytest.approx(brute_force_hit(p, test, 0), abs=1e-13)
        assert prob > 0.0


@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize("bound", BOUNDS)
def test_exact_false_certificate_probability_is_at_most_alpha(alpha, bound):
    """On the threshold and just below it, with cap 100,000 and the default schedule: exact DP, no Monte Carlo."""
    test = SequentialTest(THRESHOLDS, alpha=alpha, bound=bound)
    for p_star in THRESHOLDS:
        probs = []
        for p in (p_star, p_star - 1e-6, p_star - 1e-3):
            prob, err = false_certificate_probability(p, p_star, test)
            assert err < 1e-12
            assert prob + err <= alpha, (bound, alpha, p_star, p, prob)
            probs.append(prob)
        # non-decreasing in p (a coupling argument, docs 13.4): p = p* is the worst case of all p <= p*
        assert probs[0] >= probs[1] >= probs[2] > 0
    # coverage of the final lower bound at any p (not only the thresholds): P(max_t L_t >= p) <= alpha
    if bound == "union":
        for p in np.linspace(0.02, 0.98, 9):
            prob, err = false_certificate_probability(p, p, test)
            assert prob + err <= alpha
    # also the single-radius test that stops on refutation (exact for that rule; smaller)
    refuting, err = false_certificate_probability(THRESHOLDS[1], THRESHOLDS[1], test, refute=True)
    assert refuting + err <= false_certificate_probability(THRESHOLDS[1], THRESHOLDS[1], test)[0] + 1e-15


def test_dp_sees_an_invalid_test():
    """The check can fail: the union bound at 20 alpha (a broken test) certifies a threshold with probability > alpha."""
    alpha = 0.001
    loose = SequentialTest([0.8], alpha=20 * alpha, bound="union", schedule=Schedule(cap=20_000))
    assert false_certificate_probability(0.8, 0.8, loose)[0] > alpha
    # far above the threshold the certificate is (correctly) near certain
    assert false_certificate_probability(0.9, 0.8, loose)[0] > 0.99


# -- Monte Carlo ------------------------------------------------------------------------------------------------


def test_monte_carlo_false_certificates_and_coverage():
    """10^4 simulated streams at alpha = 0.05 through SequentialTest.update: false certificates on a threshold and
    coverage of the final lower bound, each within alpha + 3 standard errors."""
    alpha, n = 0.05, 10_000
    rng = np.random.default_rng(2024)
    sched = Schedule(cap=10_000)
    p_star = 0.8
    se = math.sqrt(alpha * (1 - alpha) / n)
    test = SequentialTest([p_star], alpha=alpha, schedule=sched)
    state = simulate(test, np.full(n, p_star), rng)
    false_cert = np.mean(state.lower >= p_star)
    assert false_cert <= alpha + 3 * se
    assert false_cert > 0  # the test is not vacuous: it does certify at p* sometimes
    assert np.all(state.done) and np.all(state.trials <= sched.cap)
    # exact DP agrees with the simulation within 4 standard errors of the simulation
    exact, _ = false_certificate_probability(p_star, p_star, test, refute=True)
    assert abs(false_cert - exact) <= 4 * math.sqrt(exact * (1 - exact) / n)
    # coverage: p_A spread over [0, 1] against several radii; P(L_tau > p_A) <= alpha
    p = rng.uniform(0.0, 1.0, n)
    multi = SequentialTest([0.5, 0.7, 0.9], alpha=alpha, schedule=sched)
    state = simulate(multi, p, rng)
    assert np.mean(state.lower > p) <= alpha + 3 * se
    assert np.mean(state.upper < p) <= alpha + 3 * se  # the upper side (level beta = alpha) covers too
    assert np.mean(state.lower > 0.5) > 0.3  # and the bounds are informative


def test_stopping_rules():
    rng = np.random.default_rng(0)
    sched = Schedule(cap=20_000)
    p = np.array([0.99, 0.2, 0.801, 0.7])
    # decide 0.8: clear cases stop early; the borderline one runs to the cap
    test = SequentialTest([0.8], alpha=0.001, schedule=sched)
    state = simulate(test, p, rng)
    assert state.trials[0] < 1000 and state.trials[1] < 100 and state.trials[2] == sched.cap
    assert state.lower[0] >= 0.8 > state.upper[1]
    # tolerance in radius units: stop once R(U) - R(L) <= 0.05
    tol = SequentialTest([], alpha=0.001, schedule=sched, tolerance=0.05, radius_fn=lambda q: 2 * np.asarray(q))
    state = simulate(tol, p, rng)
    width = 2 * (state.upper - state.lower)
    assert np.all((width <= 0.05) | (state.trials == sched.cap))
    assert state.trials[0] < sched.cap
    # neither: every stream runs to the cap
    state = simulate(SequentialTest([], schedule=Schedule(cap=500)), p, rng)
    np.testing.assert_array_equal(state.trials, 500)


def test_the_reported_lower_bound_is_the_running_max_over_the_checks():
    test = SequentialTest([], alpha=0.05, schedule=Schedule(first=32, max_batch=64, cap=32 + 64 * 3))
    state = test.start(1)
    seen = []
    for step, s in enumerate([32, 10, 64, 0]):  # a lucky start, then failures: L_t falls again
        test.update(state, [0], [s])
        seen.append(float(test.lower_at(state.successes[0], step)))
    assert seen[0] > seen[-1] > 0 or seen[-1] == 0
    assert state.lower[0] == max(seen) and state.done[0]


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("radii,tolerance", [([0.0, 0.25, 0.5, 0.75], None), ([0.3], 0.1)])
def test_every_stop_of_a_run_is_one_the_row_check_accepts(bound, radii, tolerance):
    """stopped_with (the check of a sequential row read back) accepts what every simulated run ends with, those whose
    running maximum came from an earlier look included; one ulp more, or an earlier stop, it refuses."""
    noise = Uniform(0.5)
    test = SequentialTest(
        thresholds_for_radii(noise.radius, radii),
        alpha=0.05,
        schedule=Schedule(first=8, max_batch=64, cap=500),
        bound=bound,
        tolerance=tolerance,
        radius_fn=noise.radius,
    )
    rng = np.random.default_rng(1)
    state = simulate(test, np.concatenate([rng.uniform(0.3, 1.0, 40), [0.0, 1.0]]), rng)
    earlier, later, refused = 0, 0, 0
    for a, step, lower in zip(state.successes, state.step - 1, state.lower, strict=True):
        assert test.stopped_with(int(a), int(step), float(lower)) is None
        assert test.stopped_with(int(a), int(step), float(np.nextafter(lower, 2.0))) is not None
        earlier += bool(lower != test.lower_at(a, step))
        if step + 1 < len(test.checkpoints) and a in (0, test.checkpoints[step]):
            # one path only (all successes or all failures), and it stopped: one more batch like it is impossible
            more = 0 if a == 0 else int(a + test.schedule.batches[step + 1])
            later += 1
            refused += bool(test.stopped_with(more, int(step + 1), float(test.lower_at(more, step + 1))))
    assert earlier > 0  # the case where p_lower is not the last look's bound is exercised
    assert refused == later > 0, (refused, later)


def test_update_refuses_inconsistent_input():
    test = SequentialTest([0.5], schedule=Schedule(cap=100))
    state = test.start(2)
    with pytest.raises(ValueError):
        test.update(state, [0], [33])  # more successes than the batch of 32
    with pytest.raises(ValueError):
        test.update(state, [0, 0], [1, 1])
    with pytest.raises(ValueError):
        test.update(state, [2], [1])
    test.update(state, [0], [32])
    assert state.trials[0] == 32 and state.successes[0] == 32 and state.step[0] == 1


def test_update_refuses_out_of_range_images_and_counts_and_done_images():
    test = SequentialTest([0.5], schedule=Schedule(first=8, max_batch=8, cap=16))
    state = test.start(2)
    for images, successes in (([-1], [1]), ([0], [-1])):
        with pytest.raises(ValueError):
            test.update(state, images, successes)
    assert np.all(state.step == 0) and np.all(state.trials == 0)  # nothing half-done
    test.update(state, 0, 8)
    test.update(state, 0, 8)
    assert state.done[0]
    with pytest.raises(ValueError):
        test.next_batch(state, [0])


def test_start_reset_and_empty_updates_keep_the_documented_state():
    """start gives the documented dtypes and the values of no samples; reset puts an image back there; an update
    of no images (a step of the stream with nothing to add) changes nothing; one image may be given as scalars."""
    test = SequentialTest([0.5], schedule=Schedule(first=8, max_batch=16, cap=40))
    state = test.start(3)
    kinds = {"step": np.int64, "trials": np.int64, "successes": np.int64, "lower": np.float64, "upper": np.float64}
    kinds["done"] = np.bool_
    fresh = {name: getattr(state, name).copy() for name in kinds}
    for name, kind in kinds.items():
        assert fresh[name].dtype == kind and fresh[name].shape == (3,), name
    assert np.all(fresh["lower"] == 0.0) and np.all(fresh["upper"] == 1.0) and not fresh["done"].any()
    assert not fresh["step"].any() and not fresh["trials"].any() and not fresh["successes"].any()
    np.testing.assert_array_equal(test.next_batch(state, []), np.zeros(0, dtype=np.int64))
    assert test.update(state, [], []).shape == (0,)
    done = test.update(state, 1, 8)  # a scalar image and count: the image's first batch (all 8 successes)
    assert done.shape == (1,) and state.trials[1] == 8 and state.successes[1] == 8 and state.step[1] == 1
    assert state.lower[1] > 0 and state.upper[1] == 1.0
    state.reset(1)
    for name in kinds:
        np.testing.assert_array_equal(getattr(state, name), fresh[name], err_msg=name)


def test_thresholds_may_be_a_scalar_or_zero():
    """A single threshold may be a scalar; p* = 0 (a radius every p reaches, see thresholds_for_radii) is decided at
    the first look whatever the counts."""
    test = SequentialTest(0.0, schedule=Schedule(first=8, max_batch=8, cap=16))
    assert test.thresholds.shape == (1,)
    np.testing.assert_array_equal(test.certify_counts, [[0], [0]])
    np.testing.assert_array_equal(test.decided([0.0], [1.0]), [True])


def test_the_stopping_rule_at_its_boundaries():
    """Certified once the running lower bound reaches p* (>=), refuted once the upper bound is below it (<);
    the tolerance rule stops at a width of exactly the tolerance."""
    test = SequentialTest([0.5, 0.75])
    np.testing.assert_array_equal(test.decided([0.75, 0.5, 0.6], [1.0, 0.75, 0.75]), [True, False, False])
    np.testing.assert_array_equal(test.decided([0.5, 0.0], [0.75, 0.5]), [False, False])
    np.testing.assert_array_equal(test.decided([0.5, 0.0], [0.7, 0.4]), [True, True])
    tol = SequentialTest([], tolerance=0.5)  # radius_fn: the identity
    np.testing.assert_array_equal(tol.decided([0.25, 0.25], [0.75, 0.8]), [True, False])


def test_the_row_check_names_what_is_wrong():
    """stopped_with on rows that no run of the test ends with: each reason names itself (a row's error line)."""
    sched = Schedule(first=8, max_batch=64, cap=500)
    free = SequentialTest([], alpha=0.05, schedule=sched)  # no thresholds, no tolerance: every run reaches the cap
    last = len(free.checkpoints) - 1
    for a in (0, 20, 300, 500):
        at_cap = float(free.lower_at(a, last))
        assert free.stopped_with(a, last, at_cap) is None
        most = max(float(free.lower_at(min(a, t), i)) for i, t in enumerate(free.checkpoints))
        assert free.stopped_with(a, last, most) is None
        why = free.stopped_with(a, last, float(np.nextafter(most, 2.0)))
        assert why.startswith("p_lower is above what the counts of the prediction allow")
        before = float(free.lower_at(min(a, free.checkpoints[last - 1]), last - 1))
        why = free.stopped_with(min(a, free.checkpoints[last - 1]), last - 1, before)
        assert why.startswith("the test would not have stopped at these samples")
    # 8 successes of the first 8, then few: the running maximum is the first look's bound, which is accepted; a
    # value just below it is no bound the test computes, and one below the last look's bound is refused as such
    first = float(free.lower_at(8, 0))
    assert first > float(free.lower_at(20, last))
    assert free.stopped_with(20, last, first) is None
    why = free.stopped_with(20, last, float(np.nextafter(first, 0.0)))
    assert why.startswith("p_lower is not a bound the test computes")
    below = float(np.nextafter(free.lower_at(20, last), 0.0))
    assert free.stopped_with(20, last, below).startswith("p_lower is below the bound of the counts")
    # all successes decide p* = 0.3 at the first look: a row that stops later with all successes is refused
    test = SequentialTest([0.3], alpha=0.05, schedule=sched, bound="kt")
    assert test.decided([test.lower_at(8, 0)], [1.0])[0]
    t3 = int(test.checkpoints[3])
    why = test.stopped_with(t3, 3, float(test.lower_at(t3, 3)))
    assert why.startswith("an earlier look would have decided every radius")


# -- packing ----------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    noise_batch=st.integers(1, 50),
    requests=st.lists(st.lists(st.integers(1, 80), min_size=1, max_size=4), min_size=1, max_size=8),
)
def test_packing_never_exceeds_noise_batch_and_delivers_every_request(noise_batch, requests):
    sched = PackingScheduler(noise_batch)
    todo = {i: list(r) for i, r in enumerate(requests)}
    for i in todo:
        sched.add(i, todo[i].pop(0))
    delivered = {i: [] for i in todo}
    current = {i: 0 for i in todo}
    passes = 0
    while len(sched):
        pieces = sched.next_forward()
        passes += 1
        assert 0 < sum(m for _, m in pieces) <= noise_batch
        # full unless the queue ran dry
        if len(sched):
            assert sum(m for _, m in pieces) == noise_batch
        for i, m in pieces:
            current[i] += m
        for i, n in sched.finished:
            assert current[i] == n
            delivered[i].append(n)
            current[i] = 0
            if todo[i]:
                sched.add(i, todo[i].pop(0))
        assert passes < 10_000
    assert delivered == {i: list(r) for i, r in enumerate(requests)}
    assert all(v == 0 for v in current.values())


def test_packing_refuses_a_second_request_for_an_image():
    sched = PackingScheduler(4)
    sched.add(0, 3)
    with pytest.raises(ValueError):
        sched.add(0, 1)
    with pytest.raises(ValueError):
        sched.add(1, 0)


# -- the driver -------------------------------------------------------------------------------------------------


class Toy(torch.nn.Module):
    """A fixed linear classifier on 1x4x4 images, 3 classes, float64 (no batch-size-dependent rounding)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 3, generator=g, dtype=torch.float64))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x.reshape(x.shape[0], -1) @ self.w


@pytest.fixture(scope="module")
def toy_setup():
    torch.manual_seed(1)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    x[0] = 0.0
    smoothing = Uniform(0.5)
    lam = smoothing.lam
    p_star = thresholds_for_radii(lambda q: randomized_radius(q, lam), [0.1, 0.3])
    test = SequentialTest(p_star, alpha=0.01, schedule=Schedule(first=16, max_batch=256, cap=1500))
    return x, smoothing, test


def run_driver(x, smoothing, test, noise_batch, labels=None, model=None):
    model = model or Toy()
    out = certify_sequential(
        model, x, smoothing_noise(smoothing, x, seed=7), 3, test, n0=20, labels=labels, noise_batch=noise_batch
    )
    return out, model


def test_driver_does_not_depend_on_noise_batch_and_matches_per_image_runs(toy_setup):
    x, smoothing, test = toy_setup
    ref, model = run_driver(x, smoothing, test, noise_batch=1024)
    assert max(model.calls) <= 1024 and sum(model.calls) == int(ref.samples.sum())
    assert len(set(ref.samples.tolist())) > 1  # the images stop at different times
    assert np.all(ref.samples <= 20 + test.schedule.cap)
    for nb in (97, 5000):
        out, model = run_driver(x, smoothing, test, noise_batch=nb)
        assert max(model.calls) <= nb
        for f in ("prediction", "p_lower", "p_upper", "successes", "samples", "counts_n0"):
            np.testing.assert_array_equal(getattr(out, f), getattr(ref, f))
    # a direct run of each image alone: the same per-image draws, one forward per batch, the test by hand
    full = smoothing_noise(smoothing, x, seed=7)
    toy = Toy()
    for i in range(x.shape[0]):
        counts0 = np.bincount(toy(full(i, 20)).argmax(dim=1).numpy(), minlength=3)
        np.testing.assert_array_equal(counts0, ref.counts_n0[i])
        a = int(np.argmax(counts0))
        state = test.start(1)
        while not state.done[0]:
            b = int(test.next_batch(state, [0])[0])
            test.update(state, [0], [int((toy(full(i, b)).argmax(dim=1) == a).sum())])
        assert ref.prediction[i] == a and ref.samples[i] == 20 + state.trials[0]
        assert ref.successes[i] == state.successes[0]
        assert ref.p_lower[i] == state.lower[0] and ref.p_upper[i] == state.upper[0]
    # selection used n0 = 20 samples per image; the rest ran to a check point of the schedule
    assert ref.counts_n0.sum(axis=1).tolist() == [20] * x.shape[0]
    assert np.all(np.isin(ref.samples - 20, test.checkpoints))
    np.testing.assert_array_equal(ref.prediction, ref.counts_n0.argmax(axis=1))


def test_driver_with_labels_draws_no_selection_samples(toy_setup):
    x, smoothing, test = toy_setup
    ref, _ = run_driver(x, smoothing, test, noise_batch=1024)
    labels = torch.as_tensor(ref.prediction)
    out, _ = run_driver(x, smoothing, test, noise_batch=100, labels=labels)
    assert out.counts_n0 is None
    np.testing.assert_array_equal(out.prediction, ref.prediction)
    assert np.all(np.isin(out.samples, test.checkpoints))  # the test's samples only, no selection samples
    wrong, _ = run_driver(x, smoothing, test, noise_batch=100, labels=(labels + 1) % 3)
    np.testing.assert_array_equal(wrong.prediction, (ref.prediction + 1) % 3)  # the label is what is tested
    with pytest.raises(ValueError, match="labels"):
        run_driver(x, smoothing, test, noise_batch=100, labels=[0, 1])


def test_driver_reports_bad_models(toy_setup):
    x, smoothing, test = toy_setup

    class Nan(Toy):
        def forward(self, z):
            out = super().forward(z)
            out[0, 0] = float("nan")
            return out

    class Wide(Toy):
        def forward(self, z):
            return torch.zeros(z.shape[0], 4, dtype=torch.float64)

    with pytest.raises(NonFiniteLogitsError):
        run_driver(x, smoothing, test, noise_batch=64, model=Nan())
    with pytest.raises(ValueError, match="gives 4 logits per input"):
        run_driver(x, smoothing, test, noise_batch=64, model=Wide())
    with pytest.raises(ValueError, match="noise_fn"):
        certify_sequential(Toy(), x, lambda i, n: torch.zeros(n, 16), 3, test, n0=4)
    with pytest.raises(ValueError, match="n0"):
        certify_sequential(Toy(), x, smoothing_noise(smoothing, x), 3, test, n0=0)
