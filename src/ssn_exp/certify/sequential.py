"""Sequential certification (docs/method.md section 13): stop sampling an image as soon as its answer is clear.

Plain numpy + scipy + torch: no Lightning, no Hydra, no I/O. The pieces, bottom up:

- :func:`kt_lower_bound` / :func:`kt_upper_bound`: the Krichevsky-Trofimov (Beta(1/2, 1/2) mixture) confidence
  sequence for a Bernoulli mean, valid at every sample count at once (Ville's inequality);
  :func:`cp_lower_bound` / :func:`cp_upper_bound`: one-sided Clopper-Pearson bounds, for the variants
  that spend alpha on a few fixed looks;
- :class:`Schedule`: the check points (per-image batches 32, 64, ..., ``max_batch``, up to the cap n);
- :class:`SequentialTest`: the lower bound family (``bound``), the stopping rule (decide every threshold,
  or know the radius within ``tolerance``, or reach the cap) and the precomputed integer decision thresholds;
- :func:`false_certificate_probability`: the exact (dynamic programming over the counts) probability that
  a stream whose true p sits on or below a threshold ever gets certified at it;
- :class:`PackingScheduler`, :class:`SequentialStream` and :func:`certify_sequential`: pack the next samples of
  many images into forward passes of at most ``noise_batch`` inputs, for any model callable; a stream keeps a
  fixed number of images in flight, replacing each as soon as it finishes.

The guarantee is per image: P(p_lower > p_A) <= alpha, whatever the stopping time, so R(p_lower) is a
certified radius with probability >= 1 - alpha, as for the fixed-n Clopper-Pearson protocol.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import betaln
from scipy.stats import binom

from ssn_exp.certify.core import (
    NonFiniteLogitsError,
    beta_quantile_below,
    check_level,
    check_logits,
    input_dtype,
    top_class,
)
from ssn_exp.noises import check_radius_function

__all__ = [
    "BOUNDS",
    "kt_lower_bound",
    "kt_upper_bound",
    "cp_lower_bound",
    "cp_upper_bound",
    "Schedule",
    "SequentialTest",
    "SequentialState",
    "thresholds_for_radii",
    "false_certificate_probability",
    "simulate",
    "PackingScheduler",
    "SequentialCertificates",
    "SequentialExample",
    "SequentialStream",
    "certify_sequential",
    "sequential_certificates",
    "smoothing_noise",
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
    a = np.asarray(a)
    t = np.asarray(t)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError("success counts must be integers")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.isfinite(t)) or np.any(t != np.round(t)):
            raise ValueError("trial counts must be integers")
    a, t = np.broadcast_arrays(a.astype(np.int64), t.astype(np.int64))
    if np.any(t < 0) or np.any(a < 0) or np.any(a > t):
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
    alpha = check_level("alpha", np.asarray(alpha, dtype=np.float64) if np.ndim(alpha) else alpha)
    a, t = _counts(a, t)
    af, tf = a.astype(np.float64), t.astype(np.float64)
    bf = tf - af
    pos = a > 0
    # h(p) = a log p + (t - a) log(1 - p) increases on [0, a/t]; M_t(p) >= 1/alpha <=> h(p) <= c.
    c = betaln(af + 0.5, bf + 0.5) - _LOG_PI + np.log(alpha)
    c = c - _SLACK * (1.0 + np.abs(c))
    lo = np.zeros(c.shape)
    hi = np.broadcast_to(np.where(pos, af / np.maximum(tf, 1.0), 1.0), c.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            h = af * np.log(mid) + np.where(bf > 0, bf * np.log1p(-mid), 0.0)
            below = h <= c  # M_t(mid) >= 1/alpha: mid is still excluded, the infimum lies above it
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
    return np.where(pos, lo, 0.0)[()] if lo.ndim == 0 else np.where(pos, lo, 0.0)


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
    alpha = check_level("alpha", np.asarray(alpha, dtype=np.float64) if np.ndim(alpha) else alpha)
    a, t = _counts(a, t)
    safe = np.maximum(a, 1)
    q = beta_quantile_below(alpha * (1.0 - 1e-9), safe, t - safe + 1)
    return np.where(a > 0, np.maximum(np.nextafter(q, 0.0), 0.0), 0.0)


def cp_upper_bound(a, t, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: the mirror of :func:`cp_lower_bound` on failures."""
    a, t = _counts(a, t)
    return 1.0 - cp_lower_bound(t - a, t, alpha)


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
    reach = np.asarray(radius_fn(np.ones(len(r))), dtype=np.float64) >= r
    while np.any(lo < hi):
        mid = lo + (hi - lo) // 2
        ok = np.asarray(radius_fn(mid.view(np.float64)), dtype=np.float64) >= r
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
        self.radius_fn = radius_fn if radius_fn is not None else (lambda q: np.asarray(q, dtype=np.float64))
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

    def _bound(self, a, step, levels, lower: bool) -> np.ndarray:
        step = np.asarray(step, dtype=np.int64)
        if np.any(step < 0) or np.any(step >= len(self.checkpoints)):
            raise ValueError(f"step must lie in [0, {len(self.checkpoints)})")
        a, step = np.broadcast_arrays(np.asarray(a, dtype=np.int64), step)
        t = self.checkpoints[step]
        main, extra = levels[0][step], levels[1][step]
        if lower:
            kt, cp, pick = kt_lower_bound, cp_lower_bound, np.maximum
        else:
            kt, cp, pick = kt_upper_bound, cp_upper_bound, np.minimum
        out = kt(a, t, main) if self.bound != "union" else cp(a, t, main)
        has = ~np.isnan(extra)
        if np.any(has):
            out = np.asarray(out, dtype=np.float64).copy()
            out[has] = pick(out[has], cp(a[has], t[has], extra[has]))
        return out

    def lower_at(self, a, step) -> np.ndarray:
        """The lower bound after the check at schedule index ``step`` (t = checkpoints[step]) with a successes."""
        return self._bound(a, step, self.levels_lower, True)

    def upper_at(self, a, step) -> np.ndarray:
        """The upper bound (level beta) after the check at schedule index ``step``."""
        return self._bound(a, step, self.levels_upper, False)

    def _search(self, fn, p) -> np.ndarray:
        """Per check point i and threshold j: the smallest a in [0, t_i + 1] with fn(a, i) >= p[j] (t_i + 1: none)."""
        k, nj = len(self.checkpoints), len(p)
        steps = np.repeat(np.arange(k), nj)
        t = self.checkpoints[steps]
        return self._least(fn, steps, np.tile(p, k), np.zeros(k * nj, dtype=np.int64), t).reshape(k, nj)

    @staticmethod
    def _least(fn, steps, target, lo, top) -> np.ndarray:
        """Per entry: the smallest a in [lo, top + 1] with fn(a, step) >= target (top + 1: none). A binary search
        over a, vectorised; fn is non-decreasing in a."""
        lo, hi, top = np.asarray(lo, dtype=np.int64), np.asarray(top, dtype=np.int64) + 1, np.asarray(top)
        lo, hi = np.broadcast_arrays(lo, hi)
        lo, hi = lo.copy(), hi.copy()  # invariant: the answer lies in [lo, hi]
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            good = (np.asarray(fn(np.minimum(mid, top), steps)) >= target) & (mid <= top)
            hi = np.where(good, mid, hi)
            lo = np.where(good, lo, mid + 1)
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
        at_hi = np.asarray(self.lower_at(hi, steps), dtype=np.float64)
        at_lo = np.asarray(self.lower_at(lo, steps), dtype=np.float64)
        least = np.maximum.accumulate(at_lo)
        most_up = np.minimum.accumulate(np.asarray(self.upper_at(hi, steps), dtype=np.float64))
        least_up = np.minimum.accumulate(np.asarray(self.upper_at(lo, steps), dtype=np.float64))
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
        reached = np.asarray(self.lower_at(a_j, j), dtype=np.float64) == lower
        if any(reached[i] and np.all(open_at[i:step]) for i in j):
            return None
        return "p_lower is not a bound the test computes from the counts of the prediction"

    def decided(self, lower, upper) -> np.ndarray:
        """The stopping rule, given running lower and upper bounds (arrays)."""
        lower = np.asarray(lower, dtype=np.float64)
        upper = np.asarray(upper, dtype=np.float64)
        stop = np.zeros(lower.shape, dtype=bool)
        if len(self.thresholds):
            p = self.thresholds[None, :]
            stop |= np.all((lower[:, None] >= p) | (upper[:, None] < p), axis=1)
        if self.tolerance is not None:
            width = np.asarray(self.radius_fn(upper)) - np.asarray(self.radius_fn(lower))
            stop |= width <= self.tolerance
        return stop


def _binom_kernel(b: int, p: float, eps: float) -> tuple[int, np.ndarray, float]:
    """Binomial(b, p) pmf on [lo, hi] keeping all but at most eps of its mass: (lo, pmf, dropped tail mass)."""
    if p <= 0.0 or p >= 1.0:
        return (0 if p <= 0 else b), np.ones(1), 0.0
    lo, hi = 0, b
    if eps > 0:
        lo = max(int(binom.ppf(eps / 2, b, p)) - 1, 0)
        hi = min(int(binom.isf(eps / 2, b, p)) + 1, b)
    pmf = binom.pmf(np.arange(lo, hi + 1), b, p)
    dropped = (float(binom.cdf(lo - 1, b, p)) if lo > 0 else 0.0) + (float(binom.sf(hi, b, p)) if hi < b else 0.0)
    return lo, pmf, dropped


def false_certificate_probability(
    p: float,
    threshold: float,
    test: SequentialTest,
    *,
    refute: bool = False,
    eps: float = 1e-18,
) -> tuple[float, float]:
    """P(the test ever certifies ``threshold``) for a stream of Bernoulli(p) samples, by exact DP over the counts.

    State: the distribution of the success count at the check points of ``test.schedule``, with the mass that has
    already crossed ``test.certify_counts`` removed. Between checks it is convolved with Binomial(batch, p); at
    each check the mass at a >= certify_counts[i] is the probability of certifying there. With ``refute=False``
    no other stopping is modelled: this is the probability that the certificate happens at ANY check up to the
    cap, an upper bound for every stopping rule (stopping early only truncates the path). ``refute=True`` also
    removes the mass where the upper bound refutes this threshold (the exact value for a single-radius test).

    Returns ``(probability, error)``: the computed probability and a bound on what the truncation of negligible
    tails (at most ``eps`` per step) may have missed; the true value lies in [probability, probability + error]
    up to float rounding of non-negative sums.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p!r}")
    j = np.flatnonzero(test.thresholds == threshold)
    if len(j) == 0:
        test = SequentialTest(
            [threshold],
            alpha=test.alpha,
            beta=test.beta,
            schedule=test.schedule,
            bound=test.bound,
            final_share=test.final_share,
        )
        j = 0
    else:
        j = int(j[0])
    k_cert = test.certify_counts[:, j]
    k_ref = test.refute_counts[:, j]
    dist = np.ones(1)  # P(A_t = off + index, not yet certified)
    off = 0
    hit = 0.0
    error = 0.0
    kernels: dict[int, tuple] = {}
    for i, b in enumerate(test.schedule.batches):
        if b not in kernels:
            kernels[b] = _binom_kernel(int(b), p, eps)
        klo, kernel, dropped = kernels[b]
        error += dropped
        dist = np.convolve(dist, kernel)
        off += klo
        # certified here: a >= k_cert[i]
        cut = int(k_cert[i]) - off
        if cut <= 0:
            hit += float(dist.sum())
            return hit, error
        if cut < len(dist):
            hit += float(dist[cut:].sum())
            dist = dist[:cut]
        if refute:
            keep = int(k_ref[i]) + 1 - off  # a <= k_ref[i] stops without a certificate
            if keep > 0:
                dist = dist[keep:]
                off += keep
        # trim the far lower tail (it can only matter by its mass, counted as error)
        if len(dist):
            csum = np.cumsum(dist)
            drop = int(np.searchsorted(csum, eps, side="right"))
            if drop > 0:
                error += float(csum[drop - 1])
                dist = dist[drop:]
                off += drop
        if len(dist) == 0:
            break
    return hit, error


def simulate(test: SequentialTest, p, rng: np.random.Generator) -> SequentialState:
    """Run ``test`` on simulated Bernoulli(p[i]) streams (one per entry of p) through :meth:`SequentialTest.update`."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    state = test.start(len(p))
    active = np.arange(len(p))
    while len(active):
        batch = test.next_batch(state, active)
        done = test.update(state, active, rng.binomial(batch, p[active]))
        active = active[~done]
    return state


class PackingScheduler:
    """Packs per-image sample requests into forward passes of at most ``noise_batch`` samples (bookkeeping only).

    ``add(image, n)`` queues a request; ``next_forward()`` returns a list of ``(image, count)`` pieces taken from
    the queue in order (a request may be split over several forward passes), or an empty list when nothing is
    queued. ``finished`` lists the requests completed by the last forward pass.
    """

    def __init__(self, noise_batch: int):
        if isinstance(noise_batch, bool) or not isinstance(noise_batch, int | np.integer) or noise_batch < 1:
            raise ValueError(f"noise_batch must be an integer >= 1, got {noise_batch!r}")
        self.noise_batch = int(noise_batch)
        self._queue: deque[list[int]] = deque()  # [image, remaining, total]
        self._queued: set[int] = set()
        self.finished: list[tuple[int, int]] = []

    def add(self, image: int, n: int) -> None:
        if n < 1:
            raise ValueError(f"a request needs at least one sample, got {n}")
        if image in self._queued:
            raise ValueError(f"image {image} already has a request queued")
        self._queue.append([int(image), int(n), int(n)])
        self._queued.add(int(image))

    def __len__(self) -> int:
        return len(self._queue)

    def next_forward(self) -> list[tuple[int, int]]:
        pieces, room = [], self.noise_batch
        self.finished = []
        while room and self._queue:
            req = self._queue[0]
            take = min(room, req[1])
            pieces.append((req[0], take))
            req[1] -= take
            room -= take
            if req[1] == 0:
                self._queue.popleft()
                self._queued.discard(req[0])
                self.finished.append((req[0], req[2]))
        return pieces


@dataclass
class SequentialCertificates:
    """Per-example results of :func:`certify_sequential` (numpy arrays, length = batch)."""

    prediction: np.ndarray  # int64: class A (the label when labels were given)
    p_lower: np.ndarray  # float64: the lower bound on p_A at stopping (running max over the checks)
    p_upper: np.ndarray  # float64: the upper bound at stopping (level beta; only used for stopping)
    successes: np.ndarray  # int64: samples of the test predicted as A
    samples: np.ndarray  # int64: forward passes spent on the example (selection + test)
    counts: np.ndarray  # int64 (batch, classes): the test's votes per class (counts[i, A] = successes[i])
    counts_n0: np.ndarray | None  # int64 (batch, classes): the selection counts (None with labels)
    forward_batches: int  # forward passes of the model (calls), all examples together


def smoothing_noise(smoothing, x: torch.Tensor, seed: int = 0) -> Callable[[int, int], torch.Tensor]:
    """A ``noise_fn`` for :func:`certify_sequential`: fresh noisy copies of x[i] from a generator per image.

    Each image has its own torch generator (seeds from ``numpy.random.SeedSequence(seed)``), so its samples do
    not depend on how images are packed into forward passes.
    """
    states = np.random.SeedSequence(seed).spawn(x.shape[0])
    gens = [torch.Generator(device=x.device).manual_seed(int(s.generate_state(1, np.uint64)[0] >> 1)) for s in states]

    def noise_fn(i: int, n: int) -> torch.Tensor:
        return smoothing.noisy(x[i : i + 1], 0, n, gens[i])[0]

    return noise_fn


@dataclass
class SequentialExample:
    """One example's result from :class:`SequentialStream` (as :class:`SequentialCertificates`, for one example)."""

    key: object  # the key the example was given with
    prediction: int
    p_lower: float
    p_upper: float
    successes: int
    samples: int
    counts: np.ndarray  # int64 (classes,)
    counts_n0: np.ndarray | None  # int64 (classes,); None with labels


class SequentialStream:
    """Certify a stream of examples sequentially, ``capacity`` of them in flight at once, packing the next samples
    of every example in flight into forward passes of at most ``noise_batch`` inputs.

    :meth:`run` takes an iterable of ``(key, shape, noise_fn, label)``: ``noise_fn(n)`` returns n fresh noisy
    copies of the example, shape (n, *shape); ``label`` is tested directly when ``use_labels`` (else ignored).
    It yields, after every forward pass that finishes some examples, the list of their
    :class:`SequentialExample` in the order they finished, and takes the next examples of the stream into the
    freed places, so forward passes stay full until the stream runs dry. ``noise_fn`` is called once per batch of
    the schedule (and once for the n0 selection samples), in the same order for an example whatever ``capacity``,
    ``noise_batch`` or the other examples are, so per-example generators make each result independent of the
    packing. Selection: class A is the most frequent of n0 fresh samples (ties: lowest index).
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int,
        test: SequentialTest,
        *,
        n0: int = 64,
        use_labels: bool = False,
        noise_batch: int = 1024,
        capacity: int = 1,
        dtype: torch.dtype | None = None,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not use_labels and (isinstance(n0, bool) or not isinstance(n0, int) or n0 < 1):
            raise ValueError(f"n0 must be an integer >= 1 (or give labels), got {n0!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.model, self.num_classes, self.test = model, num_classes, test
        self.n0, self.use_labels, self.capacity, self.dtype = n0, use_labels, capacity, dtype
        self.sched = PackingScheduler(noise_batch)
        self.forward_batches = 0  # forward passes of the model (calls) so far

    def run(self, examples) -> Iterator[list[SequentialExample]]:
        test, sched, k = self.test, self.sched, self.num_classes
        cap = self.capacity
        state = test.start(cap)  # one place ("slot") per example in flight
        samples = np.zeros(cap, dtype=np.int64)
        counts = np.zeros((cap, k), dtype=np.int64)  # the test's votes (selection samples excluded)
        counts0 = np.zeros((cap, k), dtype=np.int64)
        pred = np.zeros(cap, dtype=np.int64)
        got = np.zeros(cap, dtype=np.int64)  # successes so far in the current request
        selecting = np.zeros(cap, dtype=bool)
        keys: list = [None] * cap
        shapes: list = [None] * cap
        fns: list = [None] * cap
        pending: dict[int, list] = {}  # slot -> [noisy copies of the current request, next index]
        free = deque(range(cap))
        feed = iter(examples)

        def take() -> None:  # the next examples of the stream into the free slots
            while free:
                try:
                    key, shape, fn, label = next(feed)
                except StopIteration:
                    return
                s = free.popleft()
                state.reset(s)
                samples[s], got[s] = 0, 0
                counts[s], counts0[s] = 0, 0
                keys[s], shapes[s], fns[s] = key, tuple(shape), fn
                if self.use_labels:
                    if isinstance(label, bool) or not isinstance(label, int | np.integer) or not 0 <= label < k:
                        raise ValueError(f"labels must be integers in [0, {k}), got {label!r} for example {key!r}")
                    pred[s], selecting[s] = int(label), False
                    sched.add(s, int(test.next_batch(state, [s])[0]))
                else:
                    selecting[s] = True
                    sched.add(s, self.n0)

        def result(s: int) -> SequentialExample:
            return SequentialExample(
                key=keys[s],
                prediction=int(pred[s]),
                p_lower=float(state.lower[s]),
                p_upper=float(state.upper[s]),
                successes=int(state.successes[s]),
                samples=int(samples[s]),
                counts=counts[s].copy(),
                counts_n0=None if self.use_labels else counts0[s].copy(),
            )

        take()
        with torch.inference_mode():
            while len(sched):
                pieces = sched.next_forward()
                inputs = []
                for s, m in pieces:
                    if s not in pending:
                        size = self.n0 if selecting[s] else int(test.next_batch(state, [s])[0])
                        noisy = fns[s](size)
                        if tuple(noisy.shape) != (size, *shapes[s]):
                            raise ValueError(
                                f"noise_fn of example {keys[s]!r} returned shape {tuple(noisy.shape)} for {size} "
                                f"copies; expected {(size, *shapes[s])}"
                            )
                        pending[s] = [noisy, 0]
                    buf = pending[s]
                    inputs.append(buf[0][buf[1] : buf[1] + m])
                    buf[1] += m
                batch = torch.cat(inputs)
                logits = self.model(batch if self.dtype is None else batch.to(self.dtype))
                self.forward_batches += 1
                finite = check_logits(logits, sum(m for _, m in pieces), k).cpu().numpy()
                out = logits.argmax(dim=1).cpu().numpy()
                pos = 0
                for s, m in pieces:
                    if not finite[pos : pos + m].all():
                        raise NonFiniteLogitsError(
                            f"the model returned NaN or infinite logits for example {keys[s]!r}: "
                            "no certificate is computed",
                            positions=[keys[s]],
                        )
                    piece = out[pos : pos + m]
                    pos += m
                    samples[s] += m
                    if selecting[s]:
                        counts0[s] += np.bincount(piece, minlength=k)
                    else:
                        votes = np.bincount(piece, minlength=k)
                        counts[s] += votes
                        got[s] += int(votes[pred[s]])
                finished = [s for s, _ in sched.finished]
                for s in finished:
                    del pending[s]
                sel = [s for s in finished if selecting[s]]
                if sel:
                    pred[sel] = top_class(counts0[sel])
                    selecting[sel] = False
                tested = np.asarray([s for s in finished if s not in sel], dtype=np.int64)
                done_now: list[int] = []
                if len(tested):
                    done = test.update(state, tested, got[tested])
                    got[tested] = 0
                    for s in tested[~done]:
                        sched.add(int(s), int(test.next_batch(state, [s])[0]))
                    done_now = [int(s) for s in tested[done]]
                for s in sel:
                    sched.add(int(s), int(test.next_batch(state, [s])[0]))
                if done_now:
                    results = [result(s) for s in done_now]
                    for s in done_now:
                        keys[s] = shapes[s] = fns[s] = None
                    free.extend(done_now)
                    yield results
                    take()


def certify_sequential(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    noise_fn: Callable[[int, int], torch.Tensor],
    num_classes: int,
    test: SequentialTest,
    *,
    n0: int = 64,
    labels=None,
    noise_batch: int = 1024,
) -> SequentialCertificates:
    """Certify every example of x sequentially, all of them in flight at once (:class:`SequentialStream`).

    ``noise_fn(i, n)`` returns n fresh noisy copies of example i, shape (n, *x.shape[1:]); it is called once per
    batch of the schedule (and once for the n0 selection samples), in the same order for an example whatever
    ``noise_batch`` is, so per-example generators (:func:`smoothing_noise`) make the results independent of the
    packing. Selection: class A is the most frequent of n0 fresh samples (ties: lowest index); with ``labels`` the
    test is run on the label directly and no selection samples are drawn (valid for certified accuracy on a
    labelled set, docs/method.md section 13.1). Forward passes hold at most ``noise_batch`` inputs.
    """
    n_img = x.shape[0]
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
        if labels.shape != (n_img,) or np.any(labels < 0) or np.any(labels >= num_classes):
            raise ValueError(f"labels must be {n_img} integers in [0, {num_classes})")
    stream = SequentialStream(
        model,
        num_classes,
        test,
        n0=n0,
        use_labels=labels is not None,
        noise_batch=noise_batch,
        capacity=max(1, n_img),
        dtype=input_dtype(model, x),
    )
    shape = tuple(x.shape[1:])
    examples = (
        (i, shape, (lambda n, i=i: noise_fn(i, n)), None if labels is None else int(labels[i])) for i in range(n_img)
    )
    found = {r.key: r for group in stream.run(examples) for r in group}
    rs = [found[i] for i in range(n_img)]
    return sequential_certificates(
        rs, num_classes, with_selection=labels is None, forward_batches=stream.forward_batches
    )


def sequential_certificates(
    results: list[SequentialExample], num_classes: int, *, with_selection: bool, forward_batches: int = 0
) -> SequentialCertificates:
    """The results of :class:`SequentialStream` for some examples, as arrays in the order given."""

    def ints(name):
        return np.array([getattr(r, name) for r in results], dtype=np.int64)

    def floats(name):
        return np.array([getattr(r, name) for r in results], dtype=np.float64)

    def table(name):
        return np.array([getattr(r, name) for r in results], dtype=np.int64).reshape(len(results), num_classes)

    return SequentialCertificates(
        prediction=ints("prediction"),
        p_lower=floats("p_lower"),
        p_upper=floats("p_upper"),
        successes=ints("successes"),
        samples=ints("samples"),
        counts=table("counts"),
        counts_n0=table("counts_n0") if with_selection else None,
        forward_batches=forward_batches,
    )
