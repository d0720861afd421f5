"""Metrics over certificates (docs/method.md section 7): certified accuracy, ACR, best-over-sigma table.

DSSN radii are kept as integers k with their q (rho = k/q) so that "rho >= r" is decided exactly.
"""

from __future__ import annotations

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
    if isinstance(r, float | np.floating):
        return Fraction(str(float(r)))
    return Fraction(r)


def certified_count(correct, radius, r, q: int | None = None) -> int:
    """Number of examples that are correct and certified at radius r (rho >= r).

    With ``q`` given, ``radius`` holds integer numerators k (rho = k/q) and the test is exact.
    """
    correct = np.asarray(correct, dtype=bool)
    radius = np.asarray(radius)
    if correct.shape != radius.shape:
        raise ValueError(f"correct {correct.shape} and radius {radius.shape} differ in shape")
    if q is None:
        ok = radius >= float(r)
    else:
        if not np.issubdtype(radius.dtype, np.integer):
            raise ValueError("with q given, radius must hold the integer numerators k")
        f = _as_fraction(r)
        ok = radius.astype(np.int64) * f.denominator >= f.numerator * q
    return int(np.count_nonzero(correct & ok))


def certified_accuracy(correct, radius, radii: Iterable = PAPER_RADII, q: int | None = None) -> dict[float, float]:
    """radius -> fraction of ALL examples that are correct with rho >= radius."""
    n = len(np.asarray(correct))
    if n == 0:
        raise ValueError("no examples")
    return {float(r): certified_count(correct, radius, r, q) / n for r in radii}


def average_certified_radius(correct, radius, q: int | None = None) -> float:
    """ACR: mean over all examples of rho * [correct], negative radii counting as 0."""
    correct = np.asarray(correct, dtype=bool)
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
