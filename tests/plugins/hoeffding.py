"""A certificate procedure defined outside ssn_exp (tests/test_user_procedure.py; the recipe: docs/extending.md, "A
procedure of your own"): the paper's fixed-sample protocol with Hoeffding's lower confidence bound in place of
Clopper-Pearson's.

n0 selection samples pick the class A; n fresh samples count n_A votes for A; with probability >= 1 - alpha,
p_A >= n_A / n - sqrt(ln(1 / alpha) / (2 n)) (Hoeffding's inequality, one-sided), taken as 0 where that is below 0.
The certified radius is the noise's function of that bound. Valid but looser than Clopper-Pearson, and a rule of its
own: a row that procedure=fixed writes does not pass this procedure's read-back check (:meth:`Hoeffding.check_row`).
It uses only ssn_exp's public procedure contract (:class:`ssn_exp.certify.procedures.Procedure`).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ssn_exp.certify.core import Certificates, NonFiniteLogitsError, count_predictions, top_class
from ssn_exp.certify.procedures import Procedure, ProcedureError
from ssn_exp.noises import SampledNoise, check_unit_box


class Hoeffding(Procedure):
    name = "hoeffding"
    noise_type = SampledNoise
    requirement = "it samples the noise and needs its radius as a function of p_lower, and this noise is enumerated"

    def __init__(self, n0: int = 64, n: int = 100_000, alpha: float = 0.001):
        for key, value in (("n0", n0), ("n", n)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ProcedureError(f"procedure.{key} must be an integer >= 1, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
            raise ProcedureError(f"procedure.alpha must be a number in (0, 1), got {alpha!r}")
        self.n0, self.n, self.alpha = int(n0), int(n), float(alpha)

    def describe(self) -> dict:
        # "procedure": a directory certified by procedure=fixed with the same n0, n, alpha is not resumed by this one
        return {"procedure": self.name, "n0": self.n0, "n": self.n, "alpha": self.alpha}

    def columns(self, noise: SampledNoise) -> list[str]:
        return ["p_lower", *noise.extra_columns]

    def samples_per_example(self, noise) -> int:
        return max(self.n0, self.n)

    def forward_passes(self, noise) -> int:
        return self.n0 + self.n

    def lower_bound(self, n_a) -> np.ndarray:
        """Hoeffding's one-sided lower confidence bound at level alpha on p_A from n_A of n votes (>= 0)."""
        slack = math.sqrt(math.log(1.0 / self.alpha) / (2.0 * self.n))
        return np.maximum(np.asarray(n_a, dtype=np.float64) / self.n - slack, 0.0)

    def certify(self, model, x, noise, num_classes, *, noise_batch=1024, generator=None, progress=None, labels=None):
        self.check(noise)
        check_unit_box(x)
        gens = list(generator) if isinstance(generator, list | tuple) else [generator] * x.shape[0]
        if len(gens) != x.shape[0]:
            raise ValueError(f"{len(gens)} generators for {x.shape[0]} examples")
        kw = dict(num_classes=num_classes, noise_batch=noise_batch, progress=progress)
        counts0, counts = [], []
        for j, g in enumerate(gens):  # one example at a time: its certificate depends on its own generator only
            try:
                counts0.append(count_predictions(model, x[j : j + 1], noise, self.n0, generator=g, **kw).cpu().numpy())
                counts.append(count_predictions(model, x[j : j + 1], noise, self.n, generator=g, **kw).cpu().numpy())
            except NonFiniteLogitsError as exc:
                raise NonFiniteLogitsError(str(exc), positions=[j]) from None
        empty = np.zeros((0, num_classes), dtype=np.int64)
        counts0 = np.concatenate(counts0) if counts0 else empty
        counts = np.concatenate(counts) if counts else empty
        pred = top_class(counts0)
        p_lower = self.lower_bound(counts[np.arange(len(pred)), pred])
        return Certificates(
            method=noise.name,
            prediction=pred,
            radius=np.asarray(noise.radius(p_lower), dtype=np.float64),
            counts=counts,
            forward_passes=self.n0 + self.n,
            values={"p_lower": p_lower, **noise.extra_radii(x, p_lower)},
            counts_n0=counts0,
        )

    def check_row(self, values, counts, prediction, radius, noise) -> None:
        # recomputed from the row: p_lower from the prediction's votes, the radius from p_lower; the rest bounded
        if int(counts.sum()) != self.n:
            raise ValueError(f"counts sum to {int(counts.sum())}, not n = {self.n}")
        p = float(values["p_lower"])
        if not abs(p - float(self.lower_bound(int(counts[prediction])))) <= 1e-12:  # (NaN too)
            raise ValueError("p_lower is not Hoeffding's bound of the prediction's counts")
        if not math.isclose(radius, float(noise.radius(np.array([p]))[0]), rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError("p_lower and radius disagree")
        noise.check_extra({c: float(values[c]) for c in noise.extra_columns}, radius)
