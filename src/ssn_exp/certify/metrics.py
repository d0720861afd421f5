"""Metrics over certificates (docs/method.md section 7): certified accuracy, ACR, best-over-sigma table.

DSSN radii are kept as integers k with their q (rho = k/q) so that "rho >= r" is decided exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "PAPER_RADII",
    "certified_count",
    "certified_accuracy",
    "average_certified_radius",
    "BestRow",
    "best_over_sigma",
]

#: The radii of the paper's Table 3.
PAPER_RADII: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


def _as_fraction(r) -> Fraction:
    """r as a fraction: a float by its shortest decimal (0.1 -> 1/10), an integer or fraction exactly."""
    if isinstance(r, bool):
        raise ValueError(f"radius must be a number, got {r!r}")
    if isinstance(r, float | np.floating):
        r = float(r)
        if not math.isfinite(r):
            raise ValueError(f"radius must be finite, got {r!r}")
        return Fraction(repr(r))
    try:
        return Fraction(r)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"radius must be a number, got {r!r}") from exc


def _check_q(q) -> int:
    if isinstance(q, bool) or not isinstance(q, numbers.Integral) or q < 1:
        raise ValueError(f"q must be a positive integer, got {q!r}")
    return int(q)


def _smallest_float_at_least(r) -> float:
    """The smallest float x with x >= r (exactly, for a fraction r): float data x passes "x >= r" iff x >= this."""
    f = _as_fraction(r)  # also rejects NaN and inf
    if isinstance(r, float | np.floating):
        return float(r)
    try:
        x = float(f)  # nearest float: may lie below f
    except OverflowError:
        return math.inf if f > 0 else -math.inf
    return float(np.nextafter(x, np.inf)) if Fraction(x) < f else x


def _at_least(radius: np.ndarray, threshold: int) -> np.ndarray:
    """radius >= threshold for an integer array and a Python integer of any size, exactly."""
    info = np.iinfo(radius.dtype)
    if threshold > info.max:
        return np.zeros(radius.shape, dtype=bool)
    if threshold <= info.min:
        return np.ones(radius.shape, dtype=bool)
    return radius >= radius.dtype.type(threshold)


def certified_count(correct, radius, r, q: int | None = None) -> int:
    """Number of examples that are correct and certified at radius r (rho >= r).

    With ``q`` given, ``radius`` holds integer numerators k (rho = k/q) and the test is exact: k >= ceil(r q)
    in Python integers, with r a :class:`~fractions.Fraction` or integer taken exactly and a float read by its
    shortest decimal (0.3 -> 3/10). Without ``q`` the radii are floats, compared with r (a fraction exactly).
    """
    correct = np.asarray(correct, dtype=bool)
    radius = np.asarray(radius)
    if correct.shape != radius.shape:
        raise ValueError(f"correct {correct.shape} and radius {radius.shape} differ in shape")
    if q is None:
        ok = radius >= _smallest_float_at_least(r)
    else:
        q = _check_q(q)
        if not np.issubdtype(radius.dtype, np.integer):
            raise ValueError("with q given, radius must hold the integer numerators k")
        f = _as_fraction(r)
        ok = _at_least(radius, -((-f.numerator * q) // f.denominator))  # k/q >= a/b  <=>  k >= ceil(a q / b)
    return int(np.count_nonzero(correct & ok))


def certified_accuracy(correct, radius, radii: Iterable = PAPER_RADII, q: int | None = None) -> dict[float, float]:
    """radius -> fraction of ALL examples that are correct with rho >= radius (keys: ``float(radius)``).

    Radii are decided as in :func:`certified_count`; two radii that differ but are the same float are an error.
    """
    n = len(np.asarray(correct))
    if n == 0:
        raise ValueError("no examples")
    out: dict[float, float] = {}
    exact: dict[float, Fraction] = {}
    for r in radii:
        key = float(r)
        f = _as_fraction(r)
        if exact.setdefault(key, f) != f:
            raise ValueError(f"radii {exact[key]} and {f} are both {key!r} as floats: pass certified_count each")
        out[key] = certified_count(correct, radius, r, q) / n
    return out


def average_certified_radius(correct, radius, q: int | None = None) -> float:
    """ACR: mean over all examples of rho * [correct], negative radii counting as 0."""
    rho = np.asarray(radius, dtype=np.float64)
    if q is not None:
        rho = rho / q
    if len(rho) == 0:
        raise ValueError("no examples")
    return float(np.mean(np.where(correct, np.maximum(rho, 0.0), 0.0)))


@dataclass(frozen=True)
class BestRow:
    radius: float
    certified_accuracy: float  # fraction
    sigma: float
    clean_accuracy: float  # fraction, of the model achieving the best


def best_over_sigma(runs: Sequence[Mapping], radii: Iterable = PAPER_RADII) -> list[BestRow]:
    """For each radius the best certified accuracy over runs (a sigma sweep), with its sigma and clean accuracy.

    Each run is a mapping with ``sigma``, ``clean_accuracy`` and ``certified_accuracy``
    (radius -> fraction; keys may be floats or strings). Ties go to the smaller sigma.
    """
    if not runs:
        raise ValueError("no runs to pick from")
    rows = []
    for r in radii:
        r = float(r)
        best = None
        for run in sorted(runs, key=lambda run: float(run["sigma"])):
            acc = _lookup(run["certified_accuracy"], r)
            if best is None or acc > best[0]:
                best = (acc, run)
        rows.append(BestRow(r, best[0], float(best[1]["sigma"]), float(best[1]["clean_accuracy"])))
    return rows


def _lookup(table: Mapping, r: float) -> float:
    for key, value in table.items():
        if float(key) == r:
            return float(value)
    raise KeyError(f"no certified accuracy at radius {r} (have {sorted(float(k) for k in table)})")
