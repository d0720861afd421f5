"""Certificates (docs/method.md sections 4-6): exact DSSN certificates and randomized Clopper-Pearson ones.

Plain torch + numpy + scipy, model-agnostic and device-agnostic: the base classifier is any
callable ``f(N, C, H, W) -> logits`` and noise is made on the input's device.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta

from ssn_exp.certify.box import box_radius
from ssn_exp.exceptions import UserError
from ssn_exp.smoothing import DSSN, Smoothing, check_unit_box

__all__ = [
    "ModelOutputError",
    "NonFiniteLogitsError",
    "top_class",
    "exact_certificate",
    "clopper_pearson_lower",
    "randomized_radius",
    "count_predictions",
    "input_dtype",
    "certify_batch",
    "Certificates",
    "SmoothedClassifier",
    "authors_radius_float32",
]


class ModelOutputError(UserError, ValueError):
    """The base classifier's output is not (inputs, num_classes) logits (a user's model, reported in one line)."""


class NonFiniteLogitsError(UserError, ValueError):
    """The base classifier returned NaN or infinite logits: no certificate can be computed from them.

    ``positions``: the examples concerned, as positions in the batch given to :func:`count_predictions`.
    """

    def __init__(self, message: str, positions: list[int] | None = None):
        super().__init__(message)
        self.positions = list(positions or [])


def top_class(counts) -> np.ndarray:
    """The most frequent class of each row of ``counts`` (n, classes); ties go to the lowest class index."""
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"counts must have shape (n, classes), got {c.shape}")
    return np.argmax(c, axis=1)  # numpy returns the first maximum


def exact_certificate(counts) -> tuple[np.ndarray, np.ndarray]:
    """DSSN certificate from per-class offset counts (docs/method.md section 4).

    ``counts``: integer array (n, classes). Returns integer arrays ``(prediction, k)`` with
    A = argmax c, B = runner-up among the others (ties -> lowest index in both) and
    k = floor((c_A - c_B - [B < A]) / 2); the certified radius is rho = k / q, inclusive.
    """
    c = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"counts must have shape (n, classes >= 2), got {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {c.dtype}")
    c = c.astype(np.int64)
    rows = np.arange(c.shape[0])
    a = top_class(c)
    others = c.copy()
    others[rows, a] = -1
    b = np.argmax(others, axis=1)
    k = (c[rows, a] - c[rows, b] - (b < a).astype(np.int64)) // 2
    return a, k


def clopper_pearson_lower(n_a, n, alpha: float = 0.001) -> np.ndarray:
    """Two-sided Clopper-Pearson lower bound at level alpha: beta.ppf(alpha/2, n_A, N - n_A + 1)."""
    n_a = np.asarray(n_a, dtype=np.int64)
    if np.any(n_a < 0) or np.any(n_a > n):
        raise ValueError("n_A must lie in [0, N]")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    safe = np.maximum(n_a, 1)
    lb = beta.ppf(alpha / 2, safe, n - safe + 1)
    return np.where(n_a == 0, 0.0, lb)


def randomized_radius(p_lower, lam: float) -> np.ndarray:
    """rho = 2 lam (p_lb - 1/2); negative means nothing is certified."""
    return 2.0 * lam * (np.asarray(p_lower, dtype=np.float64) - 0.5)


def _chunks(batch: int, n: int, noise_batch: int) -> Iterator[tuple[int, int, int, int]]:
    """(i0, i1, start, stop): images [i0, i1) x samples [start, stop), about noise_batch inputs each."""
    if n >= noise_batch:
        for i in range(batch):
            for start in range(0, n, noise_batch):
                yield i, i + 1, start, min(start + noise_batch, n)
    else:
        per = max(1, noise_batch // n)
        for i0 in range(0, batch, per):
            yield i0, min(i0 + per, batch), 0, n


def input_dtype(model, x: torch.Tensor) -> torch.dtype:
    """The dtype noisy inputs are handed to ``model`` in: its floating parameters' dtype (an ``nn.Module``), else x's."""
    if isinstance(model, torch.nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.is_floating_point():
                return t.dtype
    return x.dtype if x.is_floating_point() else torch.float32


def count_predictions(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    smoothing: Smoothing,
    n: int,
    num_classes: int,
    noise_batch: int = 1024,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Counts (batch, num_classes) of the base prediction argmax f(x_tilde) over n noisy copies.

    For DSSN, n must be ``smoothing.levels`` (all offsets, enumerated in chunks so that at most
    ``noise_batch`` noisy inputs exist at once). Argmax ties go to the lowest class index.
    Raises :class:`NonFiniteLogitsError` (naming the examples) if the model returns NaN or infinite logits.
    """
    if noise_batch < 1:
        raise ValueError(f"noise_batch must be >= 1, got {noise_batch}")
    batch, shape = x.shape[0], x.shape[1:]
    counts = torch.zeros(batch, num_classes, dtype=torch.int64, device=x.device)
    if batch == 0 or n == 0:
        return counts
    dtype = input_dtype(model, x)
    finite = torch.ones(batch, dtype=torch.bool, device=x.device)
    with torch.inference_mode():
        if isinstance(smoothing, DSSN):
            if not 0 <= n <= smoothing.levels:
                raise ValueError(f"offset range [0, {n}) outside [0, {smoothing.levels})")
            base = smoothing._base(x)  # the grid check and the integer work, once for the whole batch

            def noisy(i0, i1, start, stop):
                return smoothing._offsets_from_base(base[i0:i1], start, stop, dtype)
        else:
            check_unit_box(x)

            def noisy(i0, i1, start, stop):
                return smoothing.noisy(x[i0:i1], start, stop, generator).to(dtype)

        for i0, i1, start, stop in _chunks(batch, n, noise_batch):
            rows = (i1 - i0) * (stop - start)
            logits = model(noisy(i0, i1, start, stop).reshape(-1, *shape))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape != (rows, num_classes):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ModelOutputError(
                    f"the model gives logits of shape {got} for {rows} inputs; "
                    f"expected ({rows}, num_classes={num_classes})"
                )
            if logits.dtype == torch.bool or logits.is_complex():
                raise ModelOutputError(f"the model gives {logits.dtype} logits; they must be real numbers")
            finite[i0:i1] &= torch.isfinite(logits).all(dim=1).view(i1 - i0, stop - start).all(dim=1)
            pred = logits.argmax(dim=1)
            if i1 - i0 == 1:
                counts[i0] += torch.bincount(pred, minlength=num_classes)
            else:  # image i of the chunk owns bins [i C, (i + 1) C)
                owner = torch.arange(0, (i1 - i0) * num_classes, num_classes, device=x.device)
                key = (owner.unsqueeze(1) + pred.view(i1 - i0, stop - start)).view(-1)
                counts[i0:i1] += torch.bincount(key, minlength=(i1 - i0) * num_classes).view(i1 - i0, num_classes)
            if progress is not None:
                progress(pred.numel())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).view(-1).tolist()
        raise NonFiniteLogitsError(
            f"the model returned NaN or infinite logits for {len(bad)} of {batch} examples (batch positions "
            f"{bad[:10]}{' ...' if len(bad) > 10 else ''}): no certificate is computed from them",
            positions=bad,
        )
    return counts


@dataclass
class Certificates:
    """Per-example certificates of one batch (numpy arrays, length = batch)."""

    method: str
    prediction: np.ndarray  # int64 smoothed prediction
    radius: np.ndarray  # float64 certified l1 radius (k/q for DSSN)
    counts: np.ndarray  # int64 (batch, classes): offset counts (DSSN) or N-sample counts
    forward_passes: int  # base-classifier forward passes per example
    k: np.ndarray | None = None  # DSSN: integer radius numerator, rho = k / q
    q: int | None = None
    p_lower: np.ndarray | None = None  # randomized: Clopper-Pearson lower bound
    counts_n0: np.ndarray | None = None  # randomized: prediction-sample counts
    radius_box: np.ndarray | None = None  # uniform/ssn: the box-constrained radius (>= radius)


def certify_batch(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    smoothing: Smoothing,
    num_classes: int,
    *,
    n0: int = 64,
    n: int = 100_000,
    alpha: float = 0.001,
    noise_batch: int = 1024,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> Certificates:
    """Certify a batch x (batch, C, H, W) in [0, 1] with the smoothed version of ``model``.

    DSSN: all L offsets, exact (n0, n, alpha and generator are unused).
    Uniform / SSN: class A from n0 samples, then n fresh samples and the Clopper-Pearson bound; also the
    box-constrained radius (:func:`ssn_exp.certify.box.box_radius`).
    The model should be in eval mode; this runs under ``torch.inference_mode``. Noisy inputs are handed
    to an ``nn.Module`` in the dtype of its parameters (e.g. float64 models get float64 inputs).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    kw = dict(num_classes=num_classes, noise_batch=noise_batch, generator=generator, progress=progress)
    if isinstance(smoothing, DSSN):
        counts = count_predictions(model, x, smoothing, smoothing.levels, **kw).cpu().numpy()
        pred, k = exact_certificate(counts)
        return Certificates(
            method=smoothing.name,
            prediction=pred,
            radius=k / smoothing.q,
            counts=counts,
            forward_passes=smoothing.levels,
            k=k,
            q=smoothing.q,
        )
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    check_unit_box(x)
    counts0 = count_predictions(model, x, smoothing, n0, **kw).cpu().numpy()
    pred = top_class(counts0)
    counts = count_predictions(model, x, smoothing, n, **kw).cpu().numpy()
    p_lower = clopper_pearson_lower(counts[np.arange(len(pred)), pred], n, alpha)
    radius_box = box_radius(x, p_lower, smoothing.lam) if smoothing.box_certificate else None
    return Certificates(
        method=smoothing.name,
        prediction=pred,
        radius=randomized_radius(p_lower, smoothing.lam),
        counts=counts,
        forward_passes=n0 + n,
        p_lower=p_lower,
        counts_n0=counts0,
        radius_box=radius_box,
    )


class SmoothedClassifier:
    """A framework-free smoothed classifier: ``SmoothedClassifier(model, DSSN(...), 10).certify(x)``."""

    def __init__(self, model: torch.nn.Module, smoothing: Smoothing, num_classes: int, **certify_kwargs):
        self.model = model
        self.smoothing = smoothing
        self.num_classes = num_classes
        self.certify_kwargs = certify_kwargs

    def certify(self, x: torch.Tensor, **overrides) -> Certificates:
        if isinstance(self.model, torch.nn.Module):
            self.model.eval()
        return certify_batch(self.model, x, self.smoothing, self.num_classes, **{**self.certify_kwargs, **overrides})

    def predict(self, x: torch.Tensor, **overrides) -> np.ndarray:
        return self.certify(x, **overrides).prediction


def authors_radius_float32(k, q: int) -> np.ndarray:
    """The authors' stored float32 radius for an integer k: float32(k) * float32(1/q)."""
    return np.asarray(k).astype(np.float32) * np.float32(1.0 / q)
