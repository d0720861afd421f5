"""The sequential certificate procedure (``procedure=sequential``, docs/method.md section 13): the statistical core
of :mod:`ssn_exp.certify.sequential` behind the :class:`~ssn_exp.certify.procedures.Procedure` interface, so the
driver, the record, the run files and the report certify with it without knowing it. Plain torch + numpy (layer 1).

Per example: n0 selection samples pick class A (or, ``select="label"``, the label is tested directly); then
batches of 32, 64, ..., ``max_batch`` fresh samples until every radius of ``radii`` is decided (or, with
``tolerance``, the radius is known within it), or the cap ``n``. The lower bound on p_A holds at every look at
once, so the certified radius R(p_lower) at the stopping time keeps the 1 - alpha guarantee of the fixed protocol.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from ssn_exp.certify.core import Certificates, check_level, input_dtype, top_class
from ssn_exp.certify.procedures import Procedure, ProcedureError, _count, check_radii
from ssn_exp.certify.record import SAMPLES_COLUMN
from ssn_exp.certify.sequential import SequentialStream
from ssn_exp.certify.sequential_bounds import BOUNDS, Schedule, SequentialTest, least_share, thresholds_for_radii
from ssn_exp.noises import SampledNoise

__all__ = ["Sequential", "SELECT"]

#: How class A is chosen: ``top`` (the most frequent of n0 selection samples, the paper's) or ``label``.
SELECT = ("top", "label")
#: The radii the stopping rule decides by default: certify.radii's default (conf/certify/default.yaml).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


def _level(name: str, value, allow_none: bool = False, share: float = 1.0) -> float | None:
    if value is None and allow_none:
        return None
    return check_level(f"procedure.{name}", value, share=share, error=ProcedureError)


class Sequential(Procedure):
    """Sequential certification: stop sampling an example as soon as its certificate is decided.

    ``n0``: selection samples (unused with ``select="label"``); ``n``: the cap on the test's samples (the fixed
    protocol's n); ``alpha``: the level (P(p_lower > p_A) <= alpha per example); ``radii``: the radii the
    stopping rule decides (each certified or refuted); ``tolerance``: also stop when R(upper) - R(lower) <= it;
    ``bound``: the lower-bound family (``union``, ``kt``, ``kt+final``); ``beta``: the level of the upper bound
    that only decides when to give up (default 0.05; None: alpha); ``final_share``: the share of alpha spent at the cap;
    ``first_batch``, ``growth``, ``max_batch``: the per-example schedule (32, 64, ..., 1024, then 1024 at a time).

    Result columns: ``p_lower`` (the running maximum of the lower bound at the stopping time), ``samples``
    (forward passes spent on the example: selection + test) and the noise's further radii from the same p_lower;
    ``counts`` holds the test's votes (every class; selection samples not included). With ``select="label"`` the
    prediction is the label where the label is certified (radius >= 0), else the majority of the test's votes.
    """

    name = "sequential"
    noise_type = SampledNoise
    requirement = "it samples the noise and needs its radius as a function of p_lower, and this noise is enumerated"

    def __init__(
        self,
        n0: int = 64,
        n: int = 100_000,
        alpha: float = 0.001,
        radii: Sequence[float] | None = DEFAULT_RADII,
        tolerance: float | None = None,
        select: str = "top",
        bound: str = "union",
        beta: float | None = 0.05,
        final_share: float = 0.5,
        first_batch: int = 32,
        growth: int = 2,
        max_batch: int = 1024,
    ):
        self.n0 = _count("procedure.n0", n0)
        self.n = _count("procedure.n", n)
        self.alpha = _level("alpha", alpha)
        self.beta = _level("beta", beta, allow_none=True)
        self.final_share = _level("final_share", final_share)
        if select not in SELECT:
            raise ProcedureError(f"procedure.select must be one of {list(SELECT)}, got {select!r}")
        self.select = select
        if bound not in BOUNDS:
            raise ProcedureError(f"procedure.bound must be one of {list(BOUNDS)}, got {bound!r}")
        self.bound = bound
        self.radii = sorted(set(check_radii([] if radii is None else radii, "procedure.radii")))
        if tolerance is not None and (
            isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 < tolerance < math.inf
        ):
            raise ProcedureError(f"procedure.tolerance must be a positive radius or null, got {tolerance!r}")
        self.tolerance = None if tolerance is None else float(tolerance)
        first_batch = _count("procedure.first_batch", first_batch)
        growth = _count("procedure.growth", growth)
        max_batch = _count("procedure.max_batch", max_batch)
        if max_batch < first_batch:
            raise ProcedureError(f"procedure.max_batch ({max_batch}) must be >= procedure.first_batch ({first_batch})")
        try:
            self.schedule = Schedule(first=first_batch, growth=growth, max_batch=max_batch, cap=self.n)
        except ValueError as exc:
            raise ProcedureError(f"procedure.n: {exc}") from None
        share = least_share(self.bound, self.final_share, len(self.schedule))  # every look's level is a normal float
        _level("alpha", self.alpha, share=share)
        _level("beta", self.beta, allow_none=True, share=share)
        self._tests: dict[str, SequentialTest] = {}

    # -- what the certificates depend on ------------------------------------------------------------------
    @property
    def _n_select(self) -> int:
        """Selection samples per example (0 when the label is tested)."""
        return 0 if self.select == "label" else self.n0

    def describe(self) -> dict:
        s = self.schedule
        return {
            "procedure": self.name,  # (certify_settings.json: not resumed as fixed with the same n0, n, alpha)
            "n0": self.n0,
            "n": self.n,
            "alpha": self.alpha,
            "select": self.select,
            "radii": list(self.radii),
            "tolerance": self.tolerance,
            "bound": self.bound,
            "beta": self.beta,
            "final_share": self.final_share,
            "first_batch": s.first,
            "growth": s.growth,
            "max_batch": s.max_batch,
        }

    def columns(self, noise: SampledNoise) -> list[str]:
        return ["p_lower", SAMPLES_COLUMN, *noise.extra_columns]

    def samples_per_example(self, noise) -> int:
        return max(self._n_select, min(self.schedule.max_batch, self.n))

    def forward_passes(self, noise) -> None:
        return None  # data dependent: each row's samples column

    def test(self, noise: SampledNoise) -> SequentialTest:
        """The sequential test for ``noise``: the thresholds p*(r) of :attr:`radii` under the noise's radius."""
        key = repr(sorted(noise.describe().items()))
        if key not in self._tests:
            self._tests[key] = SequentialTest(
                thresholds_for_radii(noise.radius, self.radii),
                alpha=self.alpha,
                beta=self.beta,
                schedule=self.schedule,
                bound=self.bound,
                final_share=self.final_share,
                tolerance=self.tolerance,
                radius_fn=noise.radius,
            )
        return self._tests[key]

    # -- certifying ---------------------------------------------------------------------------------------
    def certify(
        self, model, x, noise, num_classes, *, noise_batch=1024, generator=None, progress=None, labels=None
    ) -> Certificates:
        """Certificates of the batch x, all of its examples in flight at once."""
        found = {}
        for group, _ in self._finished(model, [(x, generator, labels)], noise, num_classes, noise_batch):
            found.update((r.key, r) for r in group)
        return self._certificates([found[i] for i in range(x.shape[0])], x, noise, num_classes)

    def certify_batches(self, model, batches, noise, num_classes, *, noise_batch=1024, progress=None):
        """Certify a stream of batches with ``certify.batch_size`` examples in flight (the first batch's size): an
        example that finishes is replaced at once by the next of the stream, so the forward passes stay full
        until the stream runs dry. Yields the examples that finish after each forward pass."""
        for group, x in self._finished(model, batches, noise, num_classes, noise_batch):
            yield [r.key for r in group], self._certificates(group, x, noise, num_classes)

    def _finished(self, model, batches, noise, num_classes, noise_batch):
        """Run the stream; yield, per forward pass that finishes examples, their results and inputs."""
        self.check(noise)
        test = self.test(noise)
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        rows: dict[int, torch.Tensor] = {}  # position in flight -> its x row
        dtype = input_dtype(model, first[0])  # the noisy copies are drawn in the model's dtype

        def examples():
            pos = 0
            for x, generators, labels in itertools.chain([first], batches):
                labels = self._labels(labels, x.shape[0])
                for j, fn in enumerate(self._noise_fns(x, noise, dtype, generators)):
                    rows[pos] = x[j : j + 1]
                    yield pos, tuple(x.shape[1:]), fn, None if labels is None else int(labels[j])
                    pos += 1

        stream = SequentialStream(
            model,
            num_classes,
            test,
            n0=self.n0,
            use_labels=self.select == "label",
            noise_batch=noise_batch,
            capacity=max(1, first[0].shape[0]),
        )
        for group in stream.run(examples()):
            yield group, torch.cat([rows.pop(r.key) for r in group])

    def _labels(self, labels, size: int) -> list | None:
        """The labels the test runs on (select=label), else None."""
        if self.select != "label":
            return None
        if labels is None:
            raise ProcedureError(
                "procedure.select=label tests each example's label, and no labels were given; "
                "use procedure.select=top to certify inputs without labels"
            )
        labels = torch.as_tensor(labels).reshape(-1).tolist()  # from any device
        if len(labels) != size:
            raise ValueError(f"{len(labels)} labels for {size} examples")
        return labels

    @staticmethod
    def _noise_fns(x, noise: SampledNoise, dtype, generator) -> list:
        """Per example of x: fn(m), its next m noisy copies. One generator per example (results independent of
        batching and sharding) or one for the batch (drawn per example in turn)."""
        if isinstance(generator, list | tuple):
            if len(generator) != x.shape[0]:
                raise ValueError(f"{len(generator)} generators for {x.shape[0]} examples")
            draws = [noise.copies(x[j : j + 1], dtype, g) for j, g in enumerate(generator)]
            return [lambda m, d=d: d(0, 1, 0, m)[0] for d in draws]
        draw = noise.copies(x, dtype, generator)
        return [lambda m, j=j: draw(j, j + 1, 0, m)[0] for j in range(x.shape[0])]

    def _certificates(self, group, x, noise: SampledNoise, num_classes: int) -> Certificates:
        """The certificates of examples x that finished with the results ``group``."""

        def stack(name: str, dtype=np.int64) -> np.ndarray:  # a field of every result, as one array
            return np.array([getattr(r, name) for r in group], dtype=dtype)

        def table(name: str) -> np.ndarray:  # (examples, classes) votes
            return stack(name).reshape(len(group), num_classes)

        p_lower, samples, prediction, counts = (
            stack("p_lower", np.float64),
            stack("samples"),
            stack("prediction"),
            table("counts"),
        )
        radius = np.asarray(noise.radius(p_lower), dtype=np.float64)
        if self.select == "label":  # the label where it is certified, else the majority of the votes
            prediction = np.where(radius >= 0, prediction, top_class(counts))
        values = {"p_lower": p_lower, SAMPLES_COLUMN: samples, **noise.extra_radii(x, p_lower)}
        missing = [c for c in noise.extra_columns if c not in values]
        if missing:
            raise ValueError(f"{type(noise).__name__}.extra_radii gives no {', '.join(missing)}")
        return Certificates(
            method=noise.name,
            prediction=prediction,
            radius=radius,
            counts=counts,
            forward_passes=int(samples.max()) if len(samples) else 0,  # the most any example took
            values=values,
            counts_n0=table("counts_n0") if self.select == "top" else None,
        )

    # -- checking a row read back -------------------------------------------------------------------------
    def check_row(self, values, counts, prediction, radius, noise) -> None:
        p = float(values["p_lower"])
        samples = int(values[SAMPLES_COLUMN])
        if not 0.0 <= p <= 1.0 or not math.isclose(
            radius, float(noise.radius(np.array([p]))[0]), rel_tol=1e-9, abs_tol=1e-9
        ):
            raise ValueError("p_lower and radius disagree")
        if not 1 <= samples <= self._n_select + self.n:
            raise ValueError(f"samples {samples} outside [1, {self._n_select + self.n}]")
        t = int(counts.sum())
        if t != samples - self._n_select:
            raise ValueError(f"counts sum to {t}, not samples - n0 = {samples - self._n_select}")
        test = self.test(noise)
        looks = np.flatnonzero(test.checkpoints == t)
        if len(looks) == 0:
            raise ValueError(f"the test's {t} samples are not a check point of the schedule")
        tested = prediction  # the class the test ran on: the prediction, or with select=label the label
        if self.select == "label":
            tested = int(values["label"])
            if radius >= 0 and prediction != tested:
                raise ValueError("a certified row of select=label must predict its label")
            if radius < 0 and prediction != int(top_class(counts[None, :])[0]):
                raise ValueError("the prediction is neither a certified label nor the majority of the counts")
        # p_lower is recomputed as far as the counts allow: one of the test's own bounds, on a path that stops here
        why = test.stopped_with(int(counts[tested]), int(looks[0]), p)
        if why:
            raise ValueError(why)
        noise.check_extra({c: float(values[c]) for c in noise.extra_columns}, radius)
