"""Verification helpers of the sequential certificate (docs/method.md sections 13.4-13.5), used only by the tests:
the exact false-certificate probability of a :class:`SequentialTest`, simulated Bernoulli streams, and
:func:`certify_sequential` (every example of a batch in flight at once, as arrays)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from ssn_exp.certify.core import input_dtype
from ssn_exp.certify.sequential import SequentialExample, SequentialStream
from ssn_exp.certify.sequential_bounds import SequentialState, SequentialTest


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
