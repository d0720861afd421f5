"""Certificates (docs/method.md sections 4-6): exact DSSN certificates and randomized Clopper-Pearson ones.

Plain torch + numpy + scipy, model-agnostic and device-agnostic: the base classifier is any
callable ``f(N, C, H, W) -> logits`` and noise is made on the input's device.
"""

from __future__ import annotations

import itertools
import numbers
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from scipy.special import betainc
from scipy.stats import beta

from ssn_exp.exceptions import UserError
from ssn_exp.noises import Noise, exact_certificate, top_class, uniform_radius

__all__ = [
    "ModelOutputError",
    "NonFiniteLogitsError",
    "check_logits",
    "top_class",
    "exact_certificate",
    "clopper_pearson_lower",
    "check_level",
    "beta_quantile_below",
    "MIN_LEVEL",
    "randomized_radius",
    "count_predictions",
    "forward_chunks",
    "input_dtype",
    "Certificates",
    "authors_radius_float32",
]


class ModelOutputError(UserError, ValueError):
    """The base classifier's output is not (inputs, num_classes) logits (a user's model, reported in one line)."""


def check_logits(logits, rows: int, num_classes: int, who: str = "the model") -> torch.Tensor:
    """The one check of a base classifier's output for ``rows`` inputs (every procedure, the model checks): ``(rows,
    num_classes)`` floating-point logits, else :class:`ModelOutputError`. Returns which rows are finite."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelOutputError(
            f"{who} gives {got} for {rows} inputs; expected ({rows}, num_classes={num_classes}) logits"
        )
    if logits.shape[1] != num_classes:
        raise ModelOutputError(f"{who} gives {logits.shape[1]} logits per input; expected num_classes={num_classes}")
    if not logits.is_floating_point():
        dtype = str(logits.dtype).removeprefix("torch.")
        raise ModelOutputError(f"{who} gives {dtype} logits; they must be floating-point (e.g. float32)")
    return torch.isfinite(logits).all(dim=1)


class NonFiniteLogitsError(UserError, ValueError):
    """The base classifier returned NaN or infinite logits: no certificate can be computed from them.

    ``positions``: the examples concerned, as positions in the batch given to :func:`count_predictions`.
    """

    def __init__(self, message: str, positions: list[int] | None = None):
        super().__init__(message)
        self.positions = list(positions or [])


#: The smallest level a bound is computed at: the smallest positive normal float.
MIN_LEVEL = sys.float_info.min


def check_level(name: str, value, *, share: float = 1.0, error: type[Exception] = ValueError):
    """The one check of a confidence level (alpha, beta, final_share; a float or an array of them): a real number in
    (0, 1) whose every derived level (``value * share``: alpha / 2 of a two-sided bound, the part of alpha one look
    of a sequential test spends) is a positive normal float, so no level underflows. ``error``: the exception raised
    (one line)."""
    if isinstance(value, np.ndarray) and value.ndim:
        v = np.asarray(value, dtype=np.float64)
        if not np.all((v * share >= MIN_LEVEL) & (v < 1)):
            raise error(f"{name} must lie in [{MIN_LEVEL!r}, 1)")
        return v
    if not isinstance(value, numbers.Real) or not 0 < value < 1:  # (True and False are 1 and 0: refused too)
        raise error(f"{name} must lie in (0, 1), got {value!r}")
    if not float(value) * share >= MIN_LEVEL:
        raise error(
            f"{name}={value!r} is too small: a bound would be computed at {float(value) * share!r}, below the "
            f"smallest normal float {MIN_LEVEL!r}"
        )
    return float(value)


def beta_quantile_below(level, a, b) -> np.ndarray:
    """beta.ppf(level, a, b) (a, b >= 1), never above the quantile: where scipy's inversion does not converge (tiny
    levels: NaN, or a point whose CDF exceeds the level) the largest float q with betainc(a, b, q) <= level, by
    bisection over the floats."""
    level, a, b = np.broadcast_arrays(np.asarray(level, dtype=np.float64), np.asarray(a), np.asarray(b))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # scipy/boost warns where its root finding fails; that is checked below
        q = np.asarray(beta.ppf(level, a, b), dtype=np.float64)
        bad = ~(np.isfinite(q) & (betainc(a, b, np.where(np.isfinite(q), q, 0.0)) <= level * (1.0 + 1e-9)))
        if np.any(bad):
            la, lb, lv = a[bad], b[bad], level[bad]
            lo = np.zeros(len(lv), dtype=np.int64)  # bit patterns of floats in [0, 1], ordered like the floats
            hi = np.full(len(lv), np.array(1.0).view(np.int64))
            while np.any(lo < hi):
                mid = lo + (hi - lo + 1) // 2
                ok = betainc(la, lb, mid.view(np.float64)) <= lv
                lo = np.where(ok, mid, lo)
                hi = np.where(ok, hi, mid - 1)
            q = q.copy()
            q[bad] = lo.view(np.float64)
    return q[()]  # a scalar for scalars


def clopper_pearson_lower(n_a, n, alpha: float = 0.001) -> np.ndarray:
    """Two-sided Clopper-Pearson lower bound at level alpha: beta.ppf(alpha/2, n_A, N - n_A + 1)."""
    n_a = np.asarray(n_a, dtype=np.int64)
    if np.any(n_a < 0) or np.any(n_a > n):
        raise ValueError("n_A must lie in [0, N]")
    alpha = check_level("alpha", alpha, share=0.5)
    safe = np.maximum(n_a, 1)
    lb = beta_quantile_below(alpha / 2, safe, n - safe + 1)
    return np.where(n_a == 0, 0.0, lb)


#: rho = 2 lam (p_lb - 1/2) (uniform noise and SSN); negative means nothing is certified.
#: Each noise's own radius is :meth:`ssn_exp.noises.SampledNoise.radius`.
randomized_radius = uniform_radius


def forward_chunks(batch: int, n: int, noise_batch: int) -> Iterator[tuple[int, int, int, int]]:
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
    smoothing: Noise,
    n: int,
    num_classes: int,
    noise_batch: int = 1024,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Counts (batch, num_classes) of the base prediction argmax f(x_tilde) over n noisy copies.

    The copies come from ``smoothing.copies`` (:meth:`ssn_exp.noises.Noise.copies`), in chunks so that at most
    ``noise_batch`` noisy inputs exist at once (DSSN: copies are offsets, n at most ``smoothing.support``). Argmax ties go to the lowest class index.
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
        noisy = smoothing.copies(x, dtype, generator)  # the input is checked here, once for the whole batch
        for i0, i1, start, stop in forward_chunks(batch, n, noise_batch):
            rows = (i1 - i0) * (stop - start)
            logits = model(noisy(i0, i1, start, stop).reshape(-1, *shape))
            finite[i0:i1] &= check_logits(logits, rows, num_classes).view(i1 - i0, stop - start).all(dim=1)
            pred = logits.argmax(dim=1)
            # image i of the chunk owns bins [i C, (i + 1) C)
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
    """Per-example certificates of one batch (numpy arrays, length = batch), as a procedure
    (:mod:`ssn_exp.certify.procedures`) computes them.

    ``values`` holds the procedure's own result columns by name (``k`` for the exact certificate; ``p_lower`` and
    the noise's further radii such as ``radius_box`` for a sampled one); ``k``, ``p_lower`` and ``radius_box`` read
    them (None where the procedure has none).
    """

    method: str
    prediction: np.ndarray  # int64 smoothed prediction
    radius: np.ndarray  # float64 certified l1 radius (k/q for DSSN)
    counts: np.ndarray  # int64 (batch, classes): offset counts (DSSN) or N-sample counts
    forward_passes: int  # base-classifier forward passes per example
    values: dict = field(default_factory=dict)  # the procedure's result columns: name -> array (batch,)
    q: int | None = None  # exact certificates: rho = k / q
    counts_n0: np.ndarray | None = None  # sampled: selection-sample counts

    @property
    def k(self) -> np.ndarray | None:
        """Exact certificates: the integer radius numerator, rho = k / q."""
        return self.values.get("k")

    @property
    def p_lower(self) -> np.ndarray | None:
        """Sampled certificates: the Clopper-Pearson lower bound on the top-class probability."""
        return self.values.get("p_lower")

    @property
    def radius_box(self) -> np.ndarray | None:
        """Uniform noise and SSN: the box-constrained radius (>= radius)."""
        return self.values.get("radius_box")

    @classmethod
    def concat(cls, parts: list[Certificates]) -> Certificates:
        """The certificates of several batches, in order (one record)."""
        first = parts[0]
        joined = {}
        for f in fields(cls):
            value = getattr(first, f.name)
            if f.name == "values":
                value = {key: np.concatenate([p.values[key] for p in parts]) for key in value}
            elif isinstance(value, np.ndarray):
                value = np.concatenate([getattr(p, f.name) for p in parts])
            joined[f.name] = value
        return cls(**joined)


def authors_radius_float32(k, q: int) -> np.ndarray:
    """The authors' stored float32 radius for an integer k: float32(k) * float32(1/q)."""
    return np.asarray(k).astype(np.float32) * np.float32(1.0 / q)
