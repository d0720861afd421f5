"""Box-constrained l1 certificate (ssn_exp.box): standard-radius agreement, brute force, properties."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssn_exp.box import box_radius, largest_box_radius

# ---------------------------------------------------------------- helpers


def standard(p, lam):
    return 2 * lam * (np.asarray(p, dtype=np.float64) - 0.5)


def room(x) -> np.ndarray:
    """m_i = max(x_i, 1 - x_i), flattened per example, sorted descending."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return -np.sort(-np.maximum(x, 1 - x), axis=1)


def reference(x, p: float, lam: float) -> tuple[float, int | None]:
    """Scalar loop written straight from the formula: (rho_box, k), k = d for "whole box", None for p <= 1/2.

    Whole box: max(sum_i m_i, 2 lam (p - 1/2)), so that rho_box >= rho also for tiny boxes.
    """
    if p <= 0.5:
        return 2 * lam * (p - 0.5), None
    m = sorted((max(v, 1 - v) for v in np.ravel(np.asarray(x, dtype=np.float64)).tolist()), reverse=True)
    t, w, prod, total = 1.5 - p, 2 * lam, 1.0, 0.0
    for k, mk in enumerate(m):
        assert prod > t > 0  # the first qualifying k comes before any non-positive factor
        u = w * (1 - t / prod)
        if u <= mk:
            return total + u, k
        total += mk
        prod *= 1 - mk / w
    return max(total, 2 * lam * (p - 0.5)), len(m)


def greedy_overlap(m_sorted: np.ndarray, rho: np.ndarray, lam: float) -> np.ndarray:
    """Overlap prod max(0, 1 - a_i / 2 lam) of the greedy allocation of budget rho (largest room first)."""
    before = np.concatenate([np.zeros((len(m_sorted), 1)), np.cumsum(m_sorted, axis=1)[:, :-1]], axis=1)
    a = np.clip(rho[:, None] - before, 0.0, m_sorted)
    return np.prod(np.maximum(0.0, 1 - a / (2 * lam)), axis=1)


def random_cases(rng, n: int, d: int):
    x = rng.random((n, d))
    special = rng.random((n, d)) < 0.15  # some pixels exactly at 0, 1/2 or 1
    x[special] = rng.choice([0.0, 0.5, 1.0], size=int(special.sum()))
    p = rng.random(n)
    lam = float(rng.choice([0.05, 0.25, 0.5, 1.0, 2.0, 5.0]))
    return x, p, lam


# ---------------------------------------------------------------- 1. the standard radius


def test_equals_standard_radius_when_it_fits_in_one_pixel():
    rng = np.random.default_rng(0)
    for d in (1, 2, 5, 50):
        for _ in range(10):
            x, p, lam = random_cases(rng, 200, d)
            rho = box_radius(x, p, lam)
            std = standard(p, lam)
            fits = std < room(x)[:, 0] * (1 - 1e-9)  # strictly inside: exact equality by construction
            assert fits.any()
            np.testing.assert_array_equal(rho[fits], std[fits])
            assert np.all(rho >= std - 1e-12)  # never below the standard radius
            assert np.all(rho[p <= 0.5] == std[p <= 0.5])


def test_low_confidence_returns_negative_standard_radius_unchanged():
    x = np.array([[0.0, 1.0], [0.5, 0.5], [0.3, 0.2], [0.1, 0.1]])
    p = np.array([0.0, 0.2, 0.5, 0.4999])
    for lam in (0.1, 1.0, 7.0):
        rho = box_radius(x, p, lam)
        np.testing.assert_array_equal(rho, 2 * lam * (p - 0.5))
        assert np.all(rho <= 0) and rho[0] == -lam


def test_max_room_is_at_least_half_so_small_radii_are_standard():
    # max_i m_i >= 1/2 always, so any standard radius <= 1/2 is returned unchanged, even at x = 0.5.
    x = np.full((3, 4), 0.5)
    p = np.array([0.6, 0.75, 0.9])
    lam = 1.0  # standard radii 0.2, 0.5, 0.8
    rho = box_radius(x, p, lam)
    assert rho[0] == pytest.approx(0.2, abs=1e-15) and rho[1] == pytest.approx(0.5, abs=1e-15)
    assert rho[2] == pytest.approx(0.5 + 2 * (1 - 0.6 / 0.75), abs=1e-14)  # 0.8 > 0.5 = room: k = 1, 0.9


def test_matches_scalar_reference_on_random_cases():
    rng = np.random.default_rng(1)
    seen = set()
    for d in (1, 2, 3, 8, 30):
        for _ in range(6):
            x, p, lam = random_cases(rng, 100, d)
            p = np.where(rng.random(100) < 0.5, 1 - 1e-3 * rng.random(100), p)  # many high-confidence cases
            rho = box_radius(x, p, lam)
            for i in range(len(p)):
                want, k = reference(x[i], float(p[i]), lam)
                seen.add("whole" if k == d else k)
                assert rho[i] == pytest.approx(want, rel=1e-12, abs=1e-12), (x[i], p[i], lam, k)
    assert {0, 1, 2, "whole"} <= seen


def test_greedy_overlap_at_the_radius_equals_threshold():
    rng = np.random.default_rng(2)
    kinds = {"boundary": 0, "whole": 0}
    for d in (1, 2, 4, 16):
        for lam in (0.2, 0.5, 1.0, 3.0, 10.0):
            x = rng.random((500, d))
            p = 0.5 + 0.5 * rng.random(500) ** 0.3
            rho = box_radius(x, p, lam)
            m = room(x)
            t = 1.5 - p
            corner = np.prod(np.maximum(0.0, 1 - m / (2 * lam)), axis=1)
            whole = corner > t
            kinds["whole"] += int(whole.sum())
            kinds["boundary"] += int((~whole).sum())
            want = np.maximum(m[whole].sum(axis=1), standard(p[whole], lam))
            np.testing.assert_allclose(rho[whole], want, rtol=1e-14)
            ov = greedy_overlap(m[~whole], rho[~whole], lam)
            np.testing.assert_allclose(ov, t[~whole], rtol=0, atol=1e-9)
    assert kinds["whole"] > 0 and kinds["boundary"] > 0


# ---------------------------------------------------------------- 2. brute force in 2 and 3 dimensions

N2, N3 = 401, 121  # grid points per axis: steps 1/400 and 1/120

# (grid indices of x (x_i = j / (N - 1)), p_lower, lam, expected k: 0, 1, 2 or "whole")
BRUTE_CASES = [
    ((100, 240), 0.8, 0.5, 0),  # m = (0.75, 0.6), standard 0.3 fits into one pixel
    ((100, 240), 0.9, 1.0, 1),  # standard 0.8 > 0.75
    ((0, 120), 0.97, 0.25, 0),  # m_1 = 1 >= 2 lam: a zero factor
    ((200, 200), 0.99, 3.0, "whole"),
    ((0, 400), 0.999, 1.2, 1),  # x on both corners
    ((12, 24, 60), 0.75, 1.0, 0),  # m = (0.9, 0.8, 0.5)
    ((12, 24, 60), 0.99, 1.0, 1),
    ((12, 24, 60), 0.95, 2.0, 2),
    ((12, 24, 60), 0.999, 5.0, "whole"),
    ((0, 110, 30), 0.999, 2.0, 2),
    ((0, 120, 60), 0.9, 0.4, 0),  # m_1 = 1 >= 2 lam = 0.8
]


def brute_force(x_idx, p: float, lam: float, n: int) -> tuple[float, float]:
    """Smallest l1 norm over grid points delta in [-x, 1 - x]^d whose overlap is < t (inf if none)."""
    grid = np.arange(n) / (n - 1)
    x = np.array(x_idx) / (n - 1)
    deltas = [grid - xi for xi in x]  # contains -x_i, 0 and 1 - x_i exactly
    d = len(x)
    ov = np.ones((n,) * d)
    l1 = np.zeros((n,) * d)
    for i, di in enumerate(deltas):
        shape = [1] * d
        shape[i] = n
        ov = ov * np.maximum(0.0, 1 - np.abs(di) / (2 * lam)).reshape(shape)
        l1 = l1 + np.abs(di).reshape(shape)
    broken = ov < 1.5 - p
    return (float(l1[broken].min()) if broken.any() else np.inf), float(room(x[None])[0].sum())


@pytest.mark.parametrize("x_idx,p,lam,kind", BRUTE_CASES)
def test_sound_and_tight_against_brute_force(x_idx, p, lam, kind):
    n = N2 if len(x_idx) == 2 else N3
    h = 1 / (n - 1)
    x = np.array(x_idx, dtype=np.float64) / (n - 1)
    rho = float(box_radius(x[None], [p], lam)[0])
    _, k = reference(x, p, lam)
    assert (k if k < len(x) else "whole") == kind
    best, total = brute_force(x_idx, p, lam, n)
    if kind == "whole":
        assert best == np.inf  # no point of the box breaks the certificate
        assert rho == pytest.approx(max(total, standard(p, lam)), abs=1e-12)
        assert total < standard(p, lam) or 1 - total / (2 * lam) <= 1.5 - p  # else the sum bound would suffice
    else:
        assert rho <= best + 1e-12  # sound: every attack found needs more than rho
        assert rho >= best - h - 1e-12  # tight up to the grid step
        assert rho >= standard(p, lam) - 1e-12
    if kind in (1, 2):
        assert rho > standard(p, lam) + 1e-3  # the box makes a difference here


def test_brute_force_cases_cover_every_branch():
    kinds = {kind for *_, kind in BRUTE_CASES}
    assert kinds == {0, 1, 2, "whole"}
    for x_idx, p, lam, kind in BRUTE_CASES:
        n = N2 if len(x_idx) == 2 else N3
        x = np.array(x_idx) / (n - 1)
        _, k = reference(x, p, lam)
        assert (k if k < len(x) else "whole") == kind


def test_box_beats_standard_on_saturated_example():
    # x = (0.5, 0.5): m = (0.5, 0.5); lam = 0.6, p = 0.99 -> standard 0.588 > 0.5 is out of reach in one pixel.
    rho = box_radius(np.array([[0.5, 0.5]]), [0.99], 0.6)[0]
    # t = 0.51, P_1 = 1 - 0.5 / 1.2 > t >= P_2 -> k = 1: rho = 0.5 + 1.2 (1 - t / P_1)
    assert rho == pytest.approx(0.5 + 1.2 * (1 - 0.51 / (1 - 0.5 / 1.2)), abs=1e-14)
    assert rho > 0.588 + 0.06


# ---------------------------------------------------------------- 3. properties (hypothesis)

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
lams = st.floats(min_value=1e-3, max_value=20.0, allow_nan=False)


@st.composite
def example(draw, max_d: int = 8):
    d = draw(st.integers(min_value=1, max_value=max_d))
    x = np.array(draw(st.lists(unit, min_size=d, max_size=d)))
    return x, draw(unit), draw(lams)


PROPS = settings(deadline=None)  # max_examples: the profile in conftest.py


@PROPS
@given(example())
def test_prop_at_least_standard_and_matches_reference(case):
    x, p, lam = case
    rho = box_radius(x[None], [p], lam)
    assert rho.shape == (1,) and rho.dtype == np.float64 and np.isfinite(rho).all()
    assert rho[0] >= standard(p, lam) - 1e-12
    assert rho[0] <= max(room(x[None])[0].sum(), standard(p, lam)) + 1e-12
    assert rho[0] == pytest.approx(reference(x, p, lam)[0], rel=1e-11, abs=1e-12)


@PROPS
@given(example(max_d=40), st.floats(min_value=0.5, max_value=1.0))
def test_prop_never_above_the_largest_box_radius(case, half):
    """largest_box_radius bounds every input (a radius_box read back above it is refused); with rooms of 1/2 and
    enough pixels the bound is reached within one pixel's room."""
    x, p, lam = case
    x = np.where(x > half, x, 1.0 - x) if half > 0.9 else x  # also inputs whose every room is large
    rho, most = box_radius(x[None], [p], lam)[0], largest_box_radius(p, lam)
    assert rho <= most + 1e-9 * abs(most) + 1e-12
    if p > 0.5 and lam > 0.25:  # the extreme input: 1/2 in every pixel, enough pixels
        extreme = box_radius(np.full((1, 2 * int(np.ceil(most)) + 2), 0.5), [p], lam)[0]
        assert extreme <= most + 1e-9 * most and most - extreme <= 1.5


def test_the_largest_box_radius_is_sound_and_within_a_pixel_for_wide_noise():
    for lam, p in ((20.0, 1.0), (20.0, 0.8), (3.0, 0.99), (0.6, 0.99)):
        most = largest_box_radius(p, lam)
        extreme = box_radius(np.full((1, 2 * int(np.ceil(most)) + 2), 0.5), [p], lam)[0]
        assert most - 1.5 <= extreme <= most, (lam, p)


@pytest.mark.parametrize("p,lam", [(0.5, 1.0), (0.3, 1.0), (0.0, 5.0), (0.9, 0.25), (1.0, 0.25), (0.9, 0.1)])
def test_the_largest_box_radius_is_the_standard_one_where_the_box_cannot_help(p, lam):
    # p_lower <= 1/2: nothing is certified; 2 lam <= 1/2 (also exactly 1/2): one pixel of room 1/2 moves all the mass.
    assert largest_box_radius(p, lam) == 2 * lam * (p - 0.5)


def test_a_threshold_met_exactly_at_the_farthest_corner_gives_the_box_s_l1_size_and_never_more():
    """p_lower chosen so that the farthest corner's overlap P_d equals t = 3/2 - p_lower exactly (in floats): the
    certificate reaches exactly that corner (inclusive limit), sum_i m_i. It never reports more, although u, a
    rounded quotient, often comes out an ulp above the last pixel's room."""
    rng = np.random.default_rng(5)
    cases = 0
    while cases < 200:
        x = rng.integers(0, 256, size=(1, 3)) / 255
        lam = float(rng.choice([1.0, 2.0, 3.0]))
        m = room(x)[0]
        corner = np.cumprod(1.0 - m / (2.0 * lam))  # P_1 .. P_d (all factors positive: 2 lam >= 2)
        if corner[-1] < 0.5:  # t <= 1/2 would need p_lower > 1
            continue
        cases += 1
        p = 1.5 - corner[-1]
        assert 1.0 - (p - 0.5) == corner[-1] < corner[-2]  # t = P_d exactly, P_{d-1} > t: k = d - 1
        rho = box_radius(x, [p], lam)[0]
        size = np.cumsum(m)[-1]
        assert rho <= size and rho == pytest.approx(size, rel=1e-14), (x, p, lam)
        assert rho > standard(p, lam)


def test_the_noise_refuses_a_radius_box_out_of_bounds():
    from ssn_exp.noises import SSN, Uniform

    for noise in (Uniform(0.5), SSN(2.0)):
        x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        p = np.array([0.3, 0.9, 1.0])
        radius = noise.radius(p)
        for r, box in zip(radius, noise.extra_radii(x, p)["radius_box"], strict=True):
            noise.check_extra({"radius_box": float(box)}, float(r))  # what was computed passes
            for bad in (50.0, 1e308, float("inf"), float("nan"), float(r) - 1e-6):
                with pytest.raises(ValueError, match="radius_box"):
                    noise.check_extra({"radius_box": bad}, float(r))


@PROPS
@given(example(), unit)
def test_prop_monotone_in_p_lower(case, p2):
    x, p1, lam = case
    lo, hi = sorted((p1, p2))
    r = box_radius(np.stack([x, x]), [lo, hi], lam)
    assert r[0] <= r[1] + 1e-12


@PROPS
@given(example(), st.lists(unit, min_size=8, max_size=8))
def test_prop_moving_towards_half_never_hurts(case, alphas):
    # Moving pixels towards 1/2 shrinks every m_i, i.e. the adversary's feasible set: the radius can only
    # grow, except that a whole-box answer is capped at sum_i m_i. (So it is NOT non-increasing.)
    x, p, lam = case
    x2 = 0.5 + np.array(alphas[: len(x)]) * (x - 0.5)
    r, r2 = box_radius(np.stack([x, x2]), [p, p], lam)
    assert r2 >= min(r, room(x2[None])[0].sum()) - 1e-12


def test_moving_towards_half_increases_radius_strictly():
    # Counter-example to "non-increasing towards 0.5", and an example of the whole-box cap.
    lam, p = 1.0, 0.99
    r_far, r_mid = box_radius(np.array([[0.2, 0.2], [0.4, 0.4]]), [p, p], lam)
    assert r_mid > r_far + 0.01
    # lam = 1, p = 0.999 (t = 0.501, standard 0.998). m = (0.7, 0.5): P_1 = 0.65 > t >= P_2 = 0.4875, so k = 1 and
    # rho = 0.7 + 2 (1 - t / 0.65). m = (0.6, 0.5): P_2 = 0.525 > t, the whole box (l1 size 1.1) is certified.
    r_k1, r_cap = box_radius(np.array([[0.3, 0.5], [0.4, 0.5]]), [0.999, 0.999], 1.0)
    assert r_k1 == pytest.approx(0.7 + 2 * (1 - 0.501 / 0.65)) and r_cap == pytest.approx(1.1)
    assert r_cap < r_k1  # the raw number drops, although everything in the smaller box is certified


@PROPS
@given(example(max_d=10), st.randoms(use_true_random=False))
def test_prop_permutation_invariant(case, rnd):
    x, p, lam = case
    perm = list(range(len(x)))
    rnd.shuffle(perm)
    r = box_radius(np.stack([x, x[perm]]), [p, p], lam)
    assert r[0] == r[1]


@PROPS
@given(st.lists(example(max_d=4), min_size=0, max_size=6), st.integers(1, 4))
def test_prop_batch_equals_per_example(cases, d):
    lam = 0.7
    xs = np.array([np.resize(x, d) for x, _, _ in cases]).reshape(len(cases), d)
    ps = np.array([p for _, p, _ in cases])
    rho = box_radius(xs, ps, lam)
    assert rho.shape == (len(cases),) and rho.dtype == np.float64
    single = [box_radius(xs[i : i + 1], ps[i : i + 1], lam)[0] for i in range(len(cases))]
    np.testing.assert_array_equal(rho, np.array(single, dtype=np.float64))


def test_empty_batch_and_shapes():
    out = box_radius(np.zeros((0, 3, 4, 4)), [], 0.5)
    assert out.shape == (0,) and out.dtype == np.float64
    out = box_radius(torch.zeros(0, 1, 2, 2), np.zeros(0), 0.5)
    assert out.shape == (0,) and out.dtype == np.float64
    out = box_radius(np.full((2, 1, 3, 3), 0.5, dtype=np.float32), [0.7, 0.3], 0.5)
    assert out.shape == (2,) and out.dtype == np.float64
    # no pixel at all: nothing to move, the standard radius (also for d = 1: the whole box is certified beyond it)
    for x in (np.zeros((2, 0)), np.zeros((2, 3, 0)), np.array([[0.5], [1.0]])):
        np.testing.assert_array_equal(box_radius(x, [0.9, 0.3], 0.5), standard([0.9, 0.3], 0.5))


def test_no_floating_point_warnings_with_non_positive_factors():
    x = np.array([[0.0, 0.0, 1.0, 0.5], [0.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    p = np.array([1.0, 0.999, 0.75])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for lam in (0.05, 0.25, 0.5, 1e-6):  # 2 lam <= m_i for many pixels
            rho = box_radius(x, p, lam)
            assert np.isfinite(rho).all()
            np.testing.assert_allclose(rho, 2 * lam * (p - 0.5), rtol=1e-15)
        # nor when the overlap of a large image's corner underflows (0.75 ** 3072; P_2 = 0.5625 > t = 0.51 >= P_3)
        assert box_radius(np.zeros((1, 3 * 32 * 32)), [0.99], 2.0)[0] == pytest.approx(2 + 4 * (1 - 0.51 / 0.5625))


# ---------------------------------------------------------------- 4. bad input


@pytest.mark.parametrize(
    "x,p,lam,match",
    [
        (np.array([[0.1, np.nan]]), [0.9], 0.5, "finite"),
        (np.array([[0.1, np.inf]]), [0.9], 0.5, "finite"),
        (np.array([[0.1, 1.0001]]), [0.9], 0.5, r"\[0, 1\]"),
        (np.array([[-1e-9, 0.5]]), [0.9], 0.5, r"\[0, 1\]"),
        (np.array([[0.1, 0.2]]), [1.01], 0.5, "p_lower"),
        (np.array([[0.1, 0.2]]), [-0.1], 0.5, "p_lower"),
        (np.array([[0.1, 0.2]]), [np.nan], 0.5, "p_lower"),
        (np.array([[0.1, 0.2]]), [0.9, 0.8], 0.5, "batch"),
        (np.zeros((3, 2)), [0.9], 0.5, "batch"),
        (np.array([[0.1, 0.2]]), [[0.9]], 0.5, "p_lower"),
        (np.array([[0.1, 0.2]]), [0.9], 0.0, "lam"),
        (np.array([[0.1, 0.2]]), [0.9], -1.0, "lam"),
        (np.array([[0.1, 0.2]]), [0.9], float("nan"), "lam"),
        (np.array([[0.1, 0.2]]), [0.9], float("inf"), "lam"),
        (np.array([[0.1, 0.2]]), [0.9], "big", "lam"),
        (np.array([[0.1, 0.2]]), [0.9], True, "lam"),
        (np.float64(0.5), [0.9], 0.5, "batch"),
    ],
)
def test_bad_input_raises(x, p, lam, match):
    with pytest.raises(ValueError, match=match):
        box_radius(x, p, lam)


# ---------------------------------------------------------------- 5. torch and numpy agree


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_and_numpy_inputs_agree(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g, dtype=dtype)
    x[::3] = x[::3].round()  # some saturated images
    p = torch.linspace(0.3, 1.0, 16, dtype=torch.float64)
    for lam in (0.1, 0.5, 2.0):
        from_torch = box_radius(x, p, lam)
        from_numpy = box_radius(x.numpy(), p.numpy(), lam)
        assert from_torch.dtype == np.float64 and from_torch.shape == (16,)
        np.testing.assert_array_equal(from_torch, from_numpy)
        np.testing.assert_array_equal(from_torch, box_radius(x.reshape(16, -1).numpy(), p.tolist(), lam))
    # A permutation of the pixel layout (C, H, W) -> (H, W, C) does not change anything either.
    np.testing.assert_array_equal(box_radius(x, p, 2.0), box_radius(x.permute(0, 2, 3, 1), p, 2.0))


def test_all_combinations_of_corners_in_2d():
    # Every corner/centre combination: rho_box matches the scalar reference exactly enough.
    vals = (0.0, 0.5, 1.0)
    xs = np.array(list(itertools.product(vals, vals)))
    for lam, p in itertools.product((0.3, 1.0, 4.0), (0.55, 0.9, 1.0)):
        rho = box_radius(xs, np.full(len(xs), p), lam)
        want = [reference(x, p, lam)[0] for x in xs]
        np.testing.assert_allclose(rho, want, rtol=1e-13, atol=1e-15)
