"""The statistics of sequential certification (docs/method.md section 13): when an example may stop sampling.

Plain numpy + scipy: no torch, no Lightning, no Hydra, no I/O. The pieces, bottom up:

- :func:`kt_lower_bound` / :func:`kt_upper_bound`: the Krichevsky-Trofimov (Beta(1/2, 1/2) mixture) confidence
  sequence for a Bernoulli mean, valid at every sample count at once (Ville's inequality);
  :func:`cp_lower_bound` / :func:`cp_upper_bound`: one-sided Clopper-Pearson bounds, for the variants
  that spend alpha on a few fixed looks;
- :class:`Schedule`: the check points (per-image batches 32, 64, ..., ``max_batch``, up to the cap n);
- :class:`SequentialTest`: the lower bound family (``bound``), the stopping rule (decide every threshold,
  or know the radius within ``tolerance``, or reach the cap) and the precomputed integer decision thresholds.

The guarantee is per image: P(p_lower > p_A) <= alpha, whatever the stopping time, so R(p_lower) is a
certified radius with probability >= 1 - alpha, as for the fixed-n Clopper-Pearson protocol. The stream that runs
many examples through a test is :mod:`ssn_exp.certify.sequential`; the exact validity check and the simulations
that verify the test are in the tests (``tests/sequential_sim.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import betaln

from ssn_exp.certify.core import beta_quantile_below, check_level
from ssn_exp.noises import check_radius_function

__all__ = [
    "BOUNDS",
    "MAX_LOOKS",
    "kt_lower_bound",
    "kt_upper_bound",
    "cp_lower_bound",
    "cp_upper_bound",
    "level_shares",
    "least_share",
    "Schedule",
    "SequentialTest",
    "SequentialState",
    "thresholds_for_radii",
]

#: The most check points a schedule may have (each is a bound per threshold, precomputed; a cap beyond needs a larger
#: max_batch): n = 100,000 with batches of up to 1024 takes 102.
MAX_LOOKS = 1024
#: The lower-bound families :class:`SequentialTest` knows (docs/method.md section 13.2).
BOUNDS = ("kt", "kt+final", "union")

_LOG_PI = math.log(math.pi)  # log B(1/2, 1/2)
#: Relative slack subtracted from the log-threshold before root finding, so that floating-point error in
#: evaluating log-likelihoods (a few ulp of terms that never cancel) can only move a lower bound down.
_SLACK = 1e-10
_BISECT_STEPS = 64


def _counts(a, t) -> tuple[np.ndarray, np.ndarray]:
    a, t = np.asarray(a), np.asarray(t)
    for what, x in (("success", a), ("trial", t)):
        if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
            raise ValueError(f"{what} counts must be integers")
    a, t = np.broadcast_arrays(a.astype(np.int64), t.astype(np.int64))
    if np.any(a < 0) or np.any(a > t):  # (so t >= 0)
        raise ValueError("counts must satisfy 0 <= successes <= trials")
    return a, t


def kt_lower_bound(a, t, alpha: float) -> np.ndarray:
    """Lower end L_t of the KT-mixture confidence sequence after ``a`` successes in ``t`` trials.

    M_t(p) = B(a + 1/2, t - a + 1/2) / B(1/2, 1/2) / (p^a (1 - p)^(t - a)) is a non-negative martingale with
    mean 1 under p, so P(exists t: M_t(p) >= 1/alpha) <= alpha (Ville) and L_t = inf{p <= a/t: M_t(p) < 1/alpha}
    is below p at every t at once with probability >= 1 - alpha. Vectorised over arrays of counts; the root of
    log M_t(p) = log(1/alpha) is found by bisection and returned from below (never above the true infimum).
    L_t = 0 when a = 0 (or t = 0).
    """
    alpha = check_level("alpha", np.asarray(alpha) if np.ndim(alpha) else alpha)
    a, t = _counts(a, t)
    af, tf = a.astype(np.float64), t.astype(np.float64)
    bf = tf - af
    # h(p) = a log p + (t - a) log(1 - p) increases on [0, a/t]; M_t(p) >= 1/alpha <=> h(p) <= c. c < 0 (as
    # B(a + 1/2, t - a + 1/2) <= B(1/2, 1/2)), so a nan h (0 log 0: a = 0, where hi = 0, or a = t at p = 1) is never
    # below c: a = 0 keeps lo = 0.
    c = betaln(af + 0.5, bf + 0.5) - _LOG_PI + np.log(alpha)
    c = c - _SLACK * (1.0 + np.abs(c))
    lo = np.zeros(c.shape)
    hi = np.broadcast_to(af / np.maximum(tf, 1.0), c.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            h = af * np.log(mid) + bf * np.log1p(-mid)
            below = h <= c  # M_t(mid) >= 1/alpha: mid is still excluded, the infimum lies above it
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
    return lo[()]


def kt_upper_bound(a, t, alpha: float) -> np.ndarray:
    """Upper end U_t of the KT-mixture confidence sequence: the mirror of :func:`kt_lower_bound` on failures."""
    a, t = _counts(a, t)
    return 1.0 - kt_lower_bound(t - a, t, alpha)


def cp_lower_bound(a, t, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound at level alpha: beta.ppf(alpha, a, t - a + 1) (0 when a = 0).

    alpha is shrunk by a relative 1e-9 and the result moved one ulp down, so scipy's inversion error can only
    make the bound smaller; where the inversion does not converge (tiny alpha), :func:`beta_quantile_below` falls
    back to bisection on the CDF, so the bound is never above the quantile.
    """
    alpha = check_level("alpha", np.asarray(alpha) if np.ndim(alpha) else alpha)
    a, t = _counts(a, t)
    safe = np.maximum(a, 1)
    q = beta_quantile_below(alpha * (1.0 - 1e-9), safe, t - safe + 1)
    return np.where(a > 0, np.maximum(np.nextafter(q, 0.0), 0.0), 0.0)


def cp_upper_bound(a, t, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: the mirror of :func:`cp_lower_bound` on failures."""
    a, t = _counts(a, t)
    return 1.0 - cp_lower_bound(t - a, t, alpha)


#: The bound functions of each side of a test, and how the extra cap look combines with the main bound.
_LOWER = (kt_lower_bound, cp_lower_bound, np.maximum)
_UPPER = (kt_upper_bound, cp_upper_bound, np.minimum)


def level_shares(bound: str, final_share: float, looks: int) -> tuple[np.ndarray, np.ndarray]:
    """The share of the level each of ``looks`` check points spends: on its main bound, and on the extra cap look
    (nan: none). ``kt``: all of it at every look (a confidence sequence); ``kt+final``: 1 - final_share at every look
    and final_share on a Clopper-Pearson bound at the cap; ``union``: final_share at the cap, the rest split equally
    over the other looks."""
    w = final_share
    main = np.ones(looks)
    extra = np.full(looks, np.nan)
    if bound == "kt+final":
        main[:] = 1 - w
        extra[-1] = w
    elif bound == "union" and looks > 1:
        main[:-1] = (1 - w) / (looks - 1)
        main[-1] = w
    return main, extra


def least_share(bound: str, final_share: float, looks: int) -> float:
    """The smallest share of the level one bound of the test is computed at (:func:`level_shares`)."""
    main, extra = level_shares(bound, final_share, looks)
    return float(np.nanmin(np.concatenate([main, extra])))


@dataclass(frozen=True)
class Schedule:
    """Per-image batches ``first, first * growth, ...`` up to ``max_batch`` each, until ``cap`` samples.

    The test looks at the counts only at the check points ``checkpoints`` (cumulative sums of ``batches``);
    the last batch is cut so that the last check point is exactly ``cap``.
    """

    first: int = 32
    growth: int = 2
    max_batch: int = 1024
    cap: int = 100_000
    batches: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("first", "growth", "max_batch", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"schedule {name} must be an integer >= 1, got {value!r}")
        if self.max_batch < self.first:
            raise ValueError(f"schedule max_batch ({self.max_batch}) must be >= first ({self.first})")
        looks, total, b = 0, 0, self.first  # counted before anything is built: a huge cap is refused at once
        while total < self.cap and b < self.max_batch and self.growth > 1:
            looks, total, b = looks + 1, total + b, min(b * self.growth, self.max_batch)
        looks += -(-max(self.cap - total, 0) // b)
        if looks > MAX_LOOKS:
            raise ValueError(
                f"a cap of {self.cap} samples takes {looks} looks of batches up to {self.max_batch}, more than "
                f"{MAX_LOOKS}: lower the cap (n) or raise max_batch"
            )
        batches, total, b = [], 0, self.first
        while total < self.cap:
            take = min(b, self.cap - total)
            batches.append(take)
            total += take
            b = min(b * self.growth, self.max_batch)
        object.__setattr__(self, "batches", tuple(batches))

    @property
    def checkpoints(self) -> np.ndarray:
        """Cumulative sample counts at which the test looks (int64, strictly increasing, last = cap)."""
        return np.cumsum(np.asarray(self.batches, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.batches)


def thresholds_for_radii(radius_fn: Callable[[np.ndarray], np.ndarray], radii) -> np.ndarray:
    """For each radius r, the smallest float p in [0, 1] with radius_fn(p) >= r (inf if none), by bisection.

    ``radius_fn`` must be non-decreasing in p (e.g. ``lambda p: randomized_radius(p, lam)``); then
    R(L) >= r exactly when L >= p*(r), so certifying "radius >= r" is the test "p_A >= p*(r)".
    """
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(r)):
        raise ValueError("radii must be finite")
    check_radius_function(radius_fn, "radius_fn")
    # bisect over the bit patterns of the floats in [0, 1] (ordered like the floats): the exact smallest float
    lo = np.zeros(len(r), dtype=np.int64)  # invariant: the answer's bit pattern lies in [lo, hi]
    hi = np.full(len(r), np.array(1.0).view(np.int64))
    reach = np.asarray(radius_fn(np.ones(len(r)))) >= r
    while np.any(lo < hi):
        mid = lo + (hi - lo) // 2
        ok = np.asarray(radius_fn(mid.view(np.float64))) >= r
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid + 1)
    p = lo.view(np.float64)
    return np.where(reach, p, np.inf)


@dataclass
class SequentialState:
    """Per-image state of a :class:`SequentialTest` (numpy arrays of length n_images)."""

    step: np.ndarray  # int64: checks done so far (index into the schedule of the next batch)
    trials: np.ndarray  # int64: samples of the test so far (a check point of the schedule, or 0)
    successes: np.ndarray  # int64
    lower: np.ndarray  # float64: running max of the lower bound (the certified p_lower)
    upper: np.ndarray  # float64: running min of the upper bound
    done: np.ndarray  # bool

    def reset(self, i: int) -> None:
        """Start image ``i`` afresh (a place reused for the next image of a stream)."""
        self.step[i], self.trials[i], self.successes[i] = 0, 0, 0
        self.lower[i], self.upper[i], self.done[i] = 0.0, 1.0, False


class SequentialTest:
    """A sequential test of p_A against thresholds, with its stopping rule and precomputed integer thresholds.

    ``thresholds``: probabilities p* (one per radius, see :func:`thresholds_for_radii`; inf = never reachable).
    ``bound`` (docs/method.md section 13.2):

    - ``"kt"``: the KT-mixture confidence sequence at level alpha at every check point;
    - ``"kt+final"``: the KT sequence at alpha (1 - final_share) and, at the cap only, also a one-sided
      Clopper-Pearson bound at alpha final_share (union bound);
    - ``"union"``: a one-sided Clopper-Pearson bound at every check point, alpha split over the check points
      (``final_share`` of it at the cap, the rest equally over the others).

    The upper bound (for stopping "not certifiable") is the same family at level ``beta`` on failures; it only
    decides when to give up, never what is certified. Stopping (after a check): every threshold decided
    (running-max lower >= p* or running-min upper < p*), or ``tolerance`` given and
    radius_fn(upper) - radius_fn(lower) <= tolerance, or the cap. With no thresholds and no tolerance every
    image runs to the cap.
    """

    def __init__(
        self,
        thresholds=(),
        *,
        alpha: float = 0.001,
        beta: float | None = None,
        schedule: Schedule | None = None,
        bound: str = "union",
        final_share: float = 0.5,
        tolerance: float | None = None,
        radius_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.alpha = check_level("alpha", alpha)
        self.beta = self.alpha if beta is None else check_level("beta", beta)
        self.schedule = Schedule() if schedule is None else schedule
        if not isinstance(self.schedule, Schedule):
            raise ValueError(f"schedule must be a Schedule, got {type(self.schedule).__name__}")
        if bound not in BOUNDS:
            raise ValueError(f"unknown bound {bound!r}; choose one of {list(BOUNDS)}")
        self.bound = bound
        self.final_share = check_level("final_share", final_share)
        p = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if np.any(np.isnan(p)) or np.any(p < 0):
            raise ValueError("thresholds must be probabilities >= 0 (inf for an unreachable radius)")
        self.thresholds = p
        if tolerance is not None and (not isinstance(tolerance, int | float) or not tolerance > 0):
            raise ValueError(f"tolerance must be > 0 (or None), got {tolerance!r}")
        self.tolerance = None if tolerance is None else float(tolerance)
        self.radius_fn = radius_fn if radius_fn is not None else np.asarray  # default: the identity
        self.checkpoints = self.schedule.checkpoints
        share = least_share(self.bound, self.final_share, len(self.checkpoints))
        check_level("alpha", self.alpha, share=share)
        check_level("beta", self.beta, share=share)
        self.levels_lower = self._levels(self.alpha)
        self.levels_upper = self._levels(self.beta)
        #: certify_counts[i, j]: the smallest a with lower(a, i) >= thresholds[j] (t_i + 1: never).
        self.certify_counts = self._certify_counts(self.thresholds)
        #: refute_counts[i, j]: the largest a with upper(a, i) < thresholds[j] (-1: never).
        self.refute_counts = self._refute_counts(self.thresholds)

    # -- the bounds at check point i --------------------------------------------------------------------
    def _levels(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Per check point: the level of the main bound and of the extra cap look (nan: none)."""
        main, extra = level_shares(self.bound, self.final_share, len(self.checkpoints))
        return level * main, level * extra

    def _bound(self, a, step, levels, side) -> np.ndarray:
        step = np.asarray(step)
        if np.any(step < 0) or np.any(step >= len(self.checkpoints)):
            raise ValueError(f"step must lie in [0, {len(self.checkpoints)})")
        a, step = np.broadcast_arrays(np.asarray(a), step)
        t = self.checkpoints[step]
        main, extra = levels[0][step], levels[1][step]
        kt, cp, pick = side
        out = kt(a, t, main) if self.bound != "union" else cp(a, t, main)
        has = ~np.isnan(extra)
        if np.any(has):
            out = np.array(out)  # a copy, written in place
            out[has] = pick(out[has], cp(a[has], t[has], extra[has]))
        return out

    def lower_at(self, a, step) -> np.ndarray:
        """The lower bound after the check at schedule index ``step`` (t = checkpoints[step]) with a successes."""
        return self._bound(a, step, self.levels_lower, _LOWER)

    def upper_at(self, a, step) -> np.ndarray:
        """The upper bound (level beta) after the check at schedule index ``step``."""
        return self._bound(a, step, self.levels_upper, _UPPER)

    def _search(self, fn, p) -> np.ndarray:
        """Per check point i and threshold j: the smallest a in [0, t_i + 1] with fn(a, i) >= p[j] (t_i + 1: none)."""
        k, nj = len(self.checkpoints), len(p)
        steps = np.repeat(np.arange(k), nj)
        t = self.checkpoints[steps]
        return self._least(fn, steps, np.tile(p, k), 0, t).reshape(k, nj)

    @staticmethod
    def _least(fn, steps, target, lo, top) -> np.ndarray:
        """Per entry: the smallest a in [lo, top + 1] with fn(a, step) >= target (top + 1: none). A binary search
        over a, vectorised; fn is non-decreasing in a."""
        top = np.asarray(top)
        lo, hi = np.broadcast_arrays(lo, top + 1)  # integers (counts)
        lo, hi = lo.copy(), hi.copy()  # invariant: the answer lies in [lo, hi]
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            good = (np.asarray(fn(np.minimum(mid, top), steps)) >= target) & (mid <= top)
            hi = np.where(good, mid, hi)
            lo = np.where(good, lo, np.minimum(mid + 1, hi))  # a finished entry (lo = hi = top + 1: none) stays
        return lo

    def _certify_counts(self, p) -> np.ndarray:
        return self._search(self.lower_at, p)

    def _refute_counts(self, p) -> np.ndarray:
        # the upper bound is non-decreasing in a: the largest a with upper < p is (smallest a with upper >= p) - 1
        return self._search(self.upper_at, p) - 1

    # -- running the test ---------------------------------------------------------------------------------
    def start(self, n: int) -> SequentialState:
        return SequentialState(
            step=np.zeros(n, dtype=np.int64),
            trials=np.zeros(n, dtype=np.int64),
            successes=np.zeros(n, dtype=np.int64),
            lower=np.zeros(n),
            upper=np.ones(n),
            done=np.zeros(n, dtype=bool),
        )

    def next_batch(self, state: SequentialState, images) -> np.ndarray:
        """The size of the next batch of each listed image (the images must not be done)."""
        images = np.asarray(images, dtype=np.int64)
        if np.any(state.done[images]):
            raise ValueError("an image that is done has no next batch")
        return np.asarray(self.schedule.batches, dtype=np.int64)[state.step[images]]

    def update(self, state: SequentialState, images, successes) -> np.ndarray:
        """Add each listed image's next batch (``successes`` in it), check, and return which of them are done."""
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        s = np.asarray(successes, dtype=np.int64).reshape(-1)
        if images.shape != s.shape or len(np.unique(images)) != len(images):
            raise ValueError("update needs one success count per distinct image")
        if np.any(images < 0) or np.any(images >= len(state.done)):
            raise ValueError(f"images must lie in [0, {len(state.done)})")
        batch = self.next_batch(state, images)
        if np.any(s < 0) or np.any(s > batch):
            raise ValueError("successes must lie in [0, batch size] of each image's next batch")
        state.successes[images] += s
        state.trials[images] += batch
        a = state.successes[images]
        steps = state.step[images]
        lower = self.lower_at(a, steps)
        upper = self.upper_at(a, steps)
        state.lower[images] = np.maximum(state.lower[images], lower)
        state.upper[images] = np.minimum(state.upper[images], upper)
        state.step[images] += 1
        done = self.decided(state.lower[images], state.upper[images]) | (state.step[images] >= len(self.checkpoints))
        state.done[images] = done
        return done

    def stopped_with(self, a: int, step: int, lower: float) -> str | None:
        """Why no run of this test stops after the check at schedule index ``step`` with ``a`` successes and the
        running lower bound ``lower`` (None: some run does). Checks a row read back (``procedure=sequential``).

        Only the final count is known, so the successes at look i lie in [a - (t_step - t_i), min(a, t_i)]; the
        bounds are non-decreasing in the count and :meth:`decided` is monotone, so each look gets the least running
        lower and the most running upper bound any path allows. ``lower`` must be exactly the bound of some look
        j <= step at a count its range allows (the running maximum is one of the computed bounds), no look before
        ``step`` may have decided (the test would have stopped there), and ``step`` must decide or be the cap.
        """
        t = self.checkpoints[: step + 1]
        steps = np.arange(step + 1)
        hi = np.minimum(a, t)
        lo = np.maximum(a - (t[-1] - t), 0)
        at_hi = self.lower_at(hi, steps)
        at_lo = self.lower_at(lo, steps)
        least = np.maximum.accumulate(at_lo)
        most_up = np.minimum.accumulate(self.upper_at(hi, steps))
        least_up = np.minimum.accumulate(self.upper_at(lo, steps))
        if not lower <= at_hi.max():
            return "p_lower is above what the counts of the prediction allow"
        if lower < least[-1]:
            return "p_lower is below the bound of the counts of the prediction at the last look"
        if step + 1 < len(self.checkpoints) and not self.decided([lower], [least_up[-1]])[0]:
            return "the test would not have stopped at these samples: its bounds decide nothing new there"
        open_least = ~self.decided(least, most_up)  # look i undecided on some path
        open_at = ~self.decided(np.maximum(least, lower), most_up)  # ... with the running lower already at `lower`
        if not np.all(open_least[:-1]):
            return "an earlier look would have decided every radius: the test stops there, not at these samples"

        if at_lo[-1] == lower:  # the bound of the last look (lo = hi = a there): the usual case
            return None
        # else the bound of an earlier look j at a count its range allows, and no look from j on decided
        j = steps[:-1]
        a_j = np.minimum(self._least(self.lower_at, j, lower, lo[j], hi[j]), hi[j])
        reached = self.lower_at(a_j, j) == lower
        if any(reached[i] and np.all(open_at[i:step]) for i in j):
            return None
        return "p_lower is not a bound the test computes from the counts of the prediction"

    def decided(self, lower, upper) -> np.ndarray:
        """The stopping rule, given running lower and upper bounds (arrays)."""
        lower, upper = np.asarray(lower), np.asarray(upper)
        stop = np.zeros(lower.shape, dtype=bool)
        if len(self.thresholds):
            p = self.thresholds[None, :]
            stop = np.all((lower[:, None] >= p) | (upper[:, None] < p), axis=1)
        if self.tolerance is not None:
            width = np.asarray(self.radius_fn(upper)) - np.asarray(self.radius_fn(lower))
            stop |= width <= self.tolerance
        return stop
