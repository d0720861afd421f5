"""Exact counting at every radius (issue 16 section 5): "k/q >= r" decided against a Fraction reference.

``certified_count(correct, k, r, q)`` once tested ``k * b >= a * q`` in int64 with r = a/b; a float radius
with many decimals (0.1 + 0.2, numpy grids) has b ~ 10^17 and the product overflowed. The per-run curve also
evaluated its k/q grid as floats, whose decimal reading lies above k/q for about half of the points.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssn_exp.certify import certified_accuracy, certified_count
from ssn_exp.lightning.accuracy_curve import CURVE_POINTS, run_curve

QS = (16, 255, 256)


def reference(correct, k, r, q=None) -> int:
    """The count by definition, in fractions: a float r by its shortest decimal (with q) or its exact value."""
    if q is None:
        rr = Fraction(r)  # float data against r: the float's exact value (a Fraction r as itself)
        return sum(bool(c) and Fraction(float(x)) >= rr for c, x in zip(correct, k, strict=True))
    rr = Fraction(repr(float(r))) if isinstance(r, float | np.floating) else Fraction(r)
    return sum(bool(c) and Fraction(int(x), q) >= rr for c, x in zip(correct, k, strict=True))


def near(r, q, spread=2) -> np.ndarray:
    """The numerators k around r*q (where a wrong decision shows), clipped at 0, plus 0 and a large k."""
    centre = int(Fraction(repr(float(r))) * q) if isinstance(r, float) else int(Fraction(r) * q)
    ks = [max(centre + d, 0) for d in range(-spread, spread + 1)]
    return np.array(ks + [0, 10**9], dtype=np.int64)


def test_the_reported_overflow_is_gone():
    # 0.1 + 0.2 = 0.30000000000000004: b = 10^17, and 369 * 10^17 overflowed int64
    assert certified_count([True], [369], 0.1 + 0.2, q=255) == 1
    # its decimal reading is above 0.3: 76.5000...01 -> k >= 77
    assert certified_count([True, True], [76, 77], 0.1 + 0.2, q=255) == 1


@pytest.mark.parametrize("q", QS)
def test_sums_of_decimals_and_linspace_grids_match_fractions(q):
    radii = [0.1 + 0.2, 0.7 + 0.1, 1.1 + 2.2, 0.1 * 3, 4.35 + 0.01]
    radii += [float(r) for r in np.linspace(0.0, 4.0, 37)] + [float(r) for r in np.linspace(0, 1.3, 7)]
    radii += [float(r) for r in np.arange(0.0, 3.0, 0.1)]
    for r in radii:
        k = near(r, q)
        correct = np.ones(len(k), bool)
        correct[1] = False
        assert certified_count(correct, k, r, q=q) == reference(correct, k, r, q), (r, q)


@pytest.mark.parametrize("q", QS)
def test_a_grid_of_exact_fractions_counts_k_at_its_own_point(q):
    ks = np.arange(0, 3 * q + 1, dtype=np.int64)
    for j in range(0, 3 * q + 1):
        # ks >= j exactly: the example whose radius IS j/q counts, the one just below does not
        assert certified_count(np.ones(len(ks), bool), ks, Fraction(j, q), q=q) == len(ks) - j


def test_a_float_radius_keeps_its_decimal_reading():
    # documented: a float typed as a radius means its shortest decimal, also when that lies above k/q
    above = [k for k in range(400) if Fraction(repr(k / 255)) > Fraction(k, 255)]
    assert len(above) == 193  # the count: passing k/255 as floats would drop these steps early
    for k in above[:20]:
        assert certified_count([True], [k], k / 255, q=255) == 0
        assert certified_count([True], [k], Fraction(k, 255), q=255) == 1
    assert certified_count([True], [1], 0.1, q=10) == 1  # the float 0.1 is above 1/10 but reads as 0.1


@settings(max_examples=150, deadline=None)
@given(
    k=st.lists(st.integers(0, 10**9), min_size=1, max_size=6),
    q=st.sampled_from(QS),
    num=st.integers(0, 4 * 10**9),
    den=st.integers(1, 10**18),
)
def test_any_fraction_radius_up_to_a_billion(k, q, num, den):
    r = Fraction(num, den)
    k = np.array(k, dtype=np.int64)
    correct = np.ones(len(k), bool)
    assert certified_count(correct, k, r, q=q) == reference(correct, k, r, q)
    # and at the numerators right at the threshold
    t = max(-(-r.numerator * q // r.denominator), 0)
    edge = np.array([max(t - 1, 0), t, t + 1], dtype=np.int64)
    assert certified_count(np.ones(3, bool), edge, r, q=q) == reference(np.ones(3, bool), edge, r, q)


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(0, 10**9),
    q=st.sampled_from(QS),
    a=st.integers(0, 10**6),
    b=st.integers(0, 10**6),
    places=st.integers(1, 9),
)
def test_sums_of_decimals_up_to_a_billion(k, q, a, b, places):
    r = a / 10**places + b / 10**places  # a float with up to 17 significant digits
    ks = np.array([k, *near(r, q)], dtype=np.int64)
    correct = np.ones(len(ks), bool)
    assert certified_count(correct, ks, r, q=q) == reference(correct, ks, r, q)


def test_extreme_integer_dtypes_and_thresholds_beyond_them():
    big = np.array([2**63 - 1, 0], dtype=np.int64)
    assert certified_count([True, True], big, Fraction(2**63 - 1, 255), q=255) == 1
    assert certified_count([True, True], big, Fraction(2**63, 255), q=255) == 0  # threshold above int64
    assert certified_count([True, True], big, -(2**70), q=255) == 2  # threshold below int64
    u8 = np.array([255, 3], dtype=np.uint8)
    assert certified_count([True, True], u8, 1, q=255) == 1
    assert certified_count([True, True], u8, 2, q=255) == 0
    assert certified_count([True, True], u8, -1, q=255) == 2
    assert certified_count([True, True], np.array([2**64 - 1, 1], np.uint64), Fraction(2**64 - 1, 16), q=16) == 1


@pytest.mark.parametrize("q", [0, -255, 2.5, True, "255", np.float64(255.0)])
def test_q_must_be_a_positive_integer(q):
    with pytest.raises(ValueError, match="q must be a positive integer"):
        certified_count([True], [1], 0.5, q=q)


def test_numpy_integer_q_is_accepted():
    assert certified_count([True], [128], 0.5, q=np.int64(256)) == 1


@pytest.mark.parametrize("r", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_a_radius_must_be_finite(r):
    for q in (None, 255):
        with pytest.raises(ValueError, match="radius must be finite"):
            certified_count([True], [1], r, q=q)


@pytest.mark.parametrize("r", [True, "half", None])
def test_a_radius_must_be_a_number(r):
    with pytest.raises(ValueError, match="radius must be a number"):
        certified_count([True], [1], r, q=255)


def test_float_radii_against_an_exact_fraction():
    # without q the data are floats: 0.3 (the float) is below 3/10, 0.30000000000000004 is above
    x = np.array([0.3, 0.1 + 0.2, 0.4])
    assert certified_count(np.ones(3, bool), x, Fraction(3, 10)) == reference(np.ones(3, bool), x, Fraction(3, 10))
    assert certified_count(np.ones(3, bool), x, Fraction(3, 10)) == 2
    assert certified_count(np.ones(3, bool), x, 0.3) == 3  # a float radius: compared as the float it is
    assert certified_count([True], [1e308], 10**400) == 0  # beyond every float
    assert certified_count([True], [-1e308], -(10**400)) == 1
    assert certified_count([True], [0.5], Fraction(1, 2)) == 1
    for j in range(1, 300):
        assert certified_count([True], [j / 255], Fraction(j, 255)) == reference([True], [j / 255], Fraction(j, 255))


def test_certified_accuracy_refuses_two_radii_that_are_one_float():
    a, b = Fraction(1, 3), Fraction(1, 3) + Fraction(1, 10**30)
    with pytest.raises(ValueError, match="are both 0.333"):
        certified_accuracy([True], [1], [a, b], q=3)
    # the same radius twice is fine, and so is a float next to the fraction of its decimal
    assert certified_accuracy([True], [1], [a, a], q=3) == {float(a): 1.0}
    assert certified_accuracy([True], [1], [0.5, Fraction(1, 2)], q=2) == {0.5: 1.0}


# ------------------------------------------------------------------------------------- the per-run curve


def curve_reference(correct, k, q, grid) -> list[float]:
    n = len(correct)
    return [100.0 * (reference(correct, k, g, q) / n) for g in grid]


@pytest.mark.parametrize("q", QS)
def test_the_run_curve_is_exact_at_every_multiple_of_1_over_q(q):
    rng = np.random.default_rng(q)
    k = rng.integers(0, int(1.2 * q), size=300)  # CIFAR-10 DSSN sigma = 0.5: radii up to ~1.2
    k[:5] = [0, 1, q - 1, q, int(0.36 * q) + 1]
    correct = rng.random(300) < 0.8
    grid, acc, extra = run_curve(correct, k, q)
    assert extra == {}
    exact = [Fraction(j, q) for j in range(int((k.max() / q * 1.05 + 1e-3) * q) + 1)]
    np.testing.assert_array_equal(acc, curve_reference(correct, k, q, exact))
    assert grid == exact


def test_a_long_run_curve_keeps_exact_multiples_and_at_most_the_point_limit():
    q = 255
    k = np.array([0, 500, 1000, 4000], dtype=np.int64)
    correct = np.array([True, True, False, True])
    grid, acc, _ = run_curve(correct, k, q)
    last = int((4000 / q * 1.05 + 1e-3) * q)  # 4200 multiples of 1/q: too many
    s = int((grid[1] - grid[0]) * q)
    assert grid == [Fraction(j, q) for j in range(0, last + 1, s)]
    assert len(grid) <= CURVE_POINTS < len(range(0, last + 1, s - 1))  # the smallest step that keeps within
    np.testing.assert_array_equal(acc, curve_reference(correct, k, q, grid))


def test_the_box_curve_and_the_float_curve():
    rho = np.array([0.1 + 0.2, 0.5, 1.0, -0.2])
    box = np.array([0.35, 0.5, 2.0, -0.2])
    correct = np.array([True, True, True, False])
    grid, acc, curves = run_curve(correct, rho, None, {"box": box})
    box_acc = curves["box"]
    assert len(grid) == CURVE_POINTS and grid[0] == 0.0 and grid[-1] == pytest.approx(2.0 * 1.05 + 1e-3)
    np.testing.assert_array_equal(acc, curve_reference(correct, rho, None, grid))
    np.testing.assert_array_equal(box_acc, curve_reference(correct, box, None, grid))
    # the DSSN box curve is decided on the same exact grid
    k = np.array([3, 8, 2])
    grid, acc, curves = run_curve([True, True, False], k, 16, {"box": np.array([0.25, 0.8, 0.1])})
    box_acc = curves["box"]
    assert grid[-1] == Fraction(int((0.8 * 1.05 + 1e-3) * 16), 16)
    np.testing.assert_array_equal(box_acc, curve_reference([True, True, False], [0.25, 0.8, 0.1], None, grid))
    np.testing.assert_array_equal(acc, curve_reference([True, True, False], k, 16, grid))


def test_the_run_curve_matches_the_report_curve_of_the_same_run(tmp_path):
    from ssn_exp.certify.procedures import Exact
    from ssn_exp.certify.record import CertificateRecord
    from ssn_exp.lightning.results import summarize, write_rows_atomic
    from ssn_exp.noises import DSSN
    from ssn_exp.report.plots import curve, radius_grid
    from ssn_exp.report.records import load_run_dir

    q = 255
    dssn = DSSN(0.5, q=q, dim=4)
    rng = np.random.default_rng(0)
    k = rng.integers(0, dssn.levels // 2, size=60)
    k[:3] = [92, 93, 94]  # 0.36 * 255 = 91.8: where the overflowing float grid went wrong
    labels = rng.integers(0, 3, size=60)
    pred = np.where(rng.random(60) < 0.8, labels, (labels + 1) % 3)
    rows = [
        {
            "index": i,
            "label": int(labels[i]),
            "prediction": int(pred[i]),
            "correct": int(pred[i] == labels[i]),
            "radius": int(k[i]) / q,
            "seconds": 0.01,
            "k": int(k[i]),
            "counts": "",
        }
        for i in range(60)
    ]
    write_rows_atomic(tmp_path / "certificates.csv", CertificateRecord(dssn, Exact()).columns, rows)
    meta = {"q": q, "dataset": "cifar10", "training": "noise", "seed": 0}
    summarize(tmp_path, CertificateRecord(dssn, Exact()), meta, radii=[0.5, 1.0], plot=False)
    (rec,) = load_run_dir(tmp_path)
    correct = pred == labels
    grid, acc, _ = run_curve(correct, k, q)
    np.testing.assert_array_equal(curve(rec, grid), acc)  # the report, given the run's grid, draws the same
    np.testing.assert_array_equal(acc, curve_reference(correct, k, q, grid))
    rgrid = radius_grid(float(k.max()) / q)
    np.testing.assert_array_equal(curve(rec, rgrid), curve_reference(correct, k, q, [float(r) for r in rgrid]))
