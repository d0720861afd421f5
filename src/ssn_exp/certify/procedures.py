"""Certificate procedures (docs/method.md sections 4-6, docs/extending.md): how the statistics behind a certificate
are gathered. Plain torch + numpy + scipy (layer 1).

A procedure is one class, chosen in the config (``procedure=fixed|exact``, ``conf/procedure/*.yaml``) and built
from its ``_target_``. It says which noises it certifies (:meth:`Procedure.check`), what its certificates depend
on (:meth:`Procedure.describe`), what it adds to a result row (:meth:`Procedure.columns`) and how such a row is
checked when it is read back (:meth:`Procedure.check_row`), and it certifies a batch (:meth:`Procedure.certify`) or
a stream of batches (:meth:`Procedure.certify_batches`, what the driver calls).
The driver (:mod:`ssn_exp.lightning.certification`), the result record (:mod:`ssn_exp.certify.record`) and the
report never ask which procedure or noise they hold.

- :class:`Exact`: enumerate every noisy copy of an :class:`~ssn_exp.noises.EnumeratedNoise` (DSSN); the
  certificate follows exactly from the counts.
- :class:`FixedSample`: the paper's protocol for a :class:`~ssn_exp.noises.SampledNoise`: n0 samples select the
  class A, n fresh samples give the Clopper-Pearson lower bound p_lower on p_A at level alpha, and the radius is
  the noise's function of p_lower.
- :class:`~ssn_exp.certify.procedures_sequential.Sequential` (``procedure=sequential``, its own module): as
  fixed, but each example stops sampling as soon as its certificate is decided (docs/method.md section 13).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar

import numpy as np
import torch

from ssn_exp.certify.core import (
    Certificates,
    NonFiniteLogitsError,
    check_level,
    clopper_pearson_lower,
    count_predictions,
    top_class,
)
from ssn_exp.exceptions import UserError, list_option
from ssn_exp.noises import EnumeratedNoise, Noise, SampledNoise, check_unit_box

__all__ = [
    "Procedure",
    "Exact",
    "FixedSample",
    "NoiseDefault",
    "ProcedureError",
    "check_radii",
    "default_procedure",
    "certify_batch",
    "SmoothedClassifier",
]


class ProcedureError(UserError, ValueError):
    """A procedure that cannot certify the noise it is given, or bad procedure settings (one-line message)."""


#: The most samples per example: counts stay exact in float64 (the Clopper-Pearson bound).
MAX_SAMPLES = 2**53


def _count(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ProcedureError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and int(value) > maximum:
        raise ProcedureError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return int(value)


def check_radii(value, key: str, allow_empty: bool = True) -> list[float]:
    """The radii of an option such as ``certify.radii`` or ``procedure.radii``: a list (tuple, ``ListConfig``) of
    finite numbers >= 0. A string or a single number is refused as given (``procedure.radii="0.5"`` is not the list
    of characters ['0', '.', '5']), and so is a list with a bad item (or an empty one unless ``allow_empty``)."""
    radii = list_option(value, key, f"{key}=[0.5]")
    if (not radii and not allow_empty) or any(
        isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r < 0 for r in radii
    ):
        raise ProcedureError(f"{key} must be a list of non-negative finite numbers, got {radii!r}")
    return [float(r) for r in radii]


class Procedure:
    """How a certificate's statistics are gathered: the interface every procedure implements."""

    #: The procedure's name (``procedure=<name>``).
    name: ClassVar[str]
    #: The noises it certifies (a base class of :mod:`ssn_exp.noises`).
    noise_type: ClassVar[type] = Noise
    #: Why another noise cannot be certified this way (completes the error message).
    requirement: ClassVar[str] = ""
    #: Constructor settings it accepts and ignores (left out of :meth:`describe`: they change no certificate).
    ignores: ClassVar[frozenset[str]] = frozenset()

    def for_noise(self, noise: Noise) -> Procedure:
        """The procedure that certifies ``noise``: this one, after :meth:`check` (:class:`NoiseDefault` picks the
        noise's own)."""
        self.check(noise)
        return self

    def check(self, noise: Noise) -> None:
        """Raise :class:`ProcedureError` (one line) unless this procedure can certify ``noise`` (a sampled noise's
        radius function is checked too: :meth:`~ssn_exp.noises.SampledNoise.check_radius`)."""
        if not isinstance(noise, self.noise_type):
            raise ProcedureError(
                f"procedure={self.name} cannot certify {noise.name} noise: {self.requirement}; "
                f"choose another procedure (procedure=exact for an enumerated noise such as dssn, "
                "procedure=fixed for a sampled one)"
            )
        if isinstance(noise, SampledNoise):
            noise.check_radius()

    def describe(self) -> dict:
        """The procedure's own settings (JSON values): what its certificates depend on beyond the noise, the weights
        and the certification seed. Recorded in certify_settings.json (a directory of certificates made with other
        values is not resumed) and in metrics.json (so the report names what was run)."""
        return {}

    def columns(self, noise: Noise) -> list[str]:
        """The result columns this procedure adds to a certificate row (between ``seconds`` and ``counts``)."""
        raise NotImplementedError

    def samples_per_example(self, noise: Noise) -> int:
        """The most noisy copies of one example that exist at once (bounds the memory of a certification step)."""
        raise NotImplementedError

    def forward_passes(self, noise: Noise) -> int | None:
        """Base-classifier forward passes per certified example; None where it depends on the data (each row then
        holds its own count in the ``samples`` column, :data:`ssn_exp.certify.record.SAMPLES_COLUMN`)."""
        raise NotImplementedError

    def exact_denominator(self, noise: Noise) -> int | None:
        """q when the radii are exact rationals k / q (a ``k`` column), else None (float radii)."""
        return None

    def certify(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        noise: Noise,
        num_classes: int,
        *,
        noise_batch: int = 1024,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress: Callable[[int], None] | None = None,
        labels=None,
    ) -> Certificates:
        """Certificates of the batch x. ``generator``: one for the whole batch, or a list of one per example (results
        then depend neither on batching nor on sharding). ``labels``: the examples' labels where known (a procedure
        may test them, e.g. ``procedure=sequential select=label``; the others ignore them)."""
        raise NotImplementedError

    def certify_batches(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[tuple[torch.Tensor, list[torch.Generator], list[int] | None]],
        noise: Noise,
        num_classes: int,
        *,
        noise_batch: int = 1024,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[list[int], Certificates]]:
        """Certify a stream of batches ``(x, generators, labels)`` (one generator per example): yields
        ``(positions, certificates)`` as examples are certified, ``positions`` numbering the stream's examples from
        0 in the order given (a :class:`NonFiniteLogitsError` names such positions too). Batches are read lazily.

        This default certifies one batch at a time with :meth:`certify`. A procedure whose examples finish at
        different times overrides it to keep its forward passes full across batches (``sequential``: an example
        that finishes is replaced at once by the next of the stream)."""
        start = 0
        for x, generators, labels in batches:
            kw = dict(noise_batch=noise_batch, generator=generators, progress=progress, labels=labels)
            try:
                cert = self.certify(model, x, noise, num_classes, **kw)
            except NonFiniteLogitsError as exc:
                raise NonFiniteLogitsError(str(exc), positions=[start + p for p in exc.positions]) from None
            yield list(range(start, start + x.shape[0])), cert
            start += x.shape[0]

    def check_row(self, values: dict[str, str], counts: np.ndarray, prediction: int, radius: float, noise) -> None:
        """Raise ``ValueError`` unless a row read back (its :meth:`columns` and its ``label`` as text, its counts,
        prediction and radius) is one this procedure would have written: what follows from the row is recomputed,
        the rest bounded from both sides."""
        raise NotImplementedError


class Exact(Procedure):
    """Enumerate all noisy copies (DSSN's L offsets): prediction and radius k / q follow exactly from the counts."""

    name = "exact"
    noise_type = EnumeratedNoise
    requirement = "it enumerates every noisy copy, and this noise is sampled"

    ignores = frozenset({"n0", "n", "alpha"})

    def __init__(self, n0=None, n=None, alpha=None):
        """Takes no settings: a sample count that a config sets for every procedure (``debug=fast``'s
        ``procedure.n``) means nothing to an enumeration and is ignored (:attr:`ignores`), as ``procedure=auto``
        ignores it for dssn."""

    def columns(self, noise: EnumeratedNoise) -> list[str]:
        return ["k"]

    def samples_per_example(self, noise: EnumeratedNoise) -> int:
        return noise.support

    def forward_passes(self, noise: EnumeratedNoise) -> int:
        return noise.support

    def exact_denominator(self, noise: EnumeratedNoise) -> int:
        return noise.q

    def certify(self, model, x, noise, num_classes, *, noise_batch=1024, generator=None, progress=None, labels=None):
        self.check(noise)
        counts = count_predictions(
            model, x, noise, noise.support, num_classes, noise_batch=noise_batch, progress=progress
        )
        counts = counts.cpu().numpy()
        pred, k = noise.exact_certificate(counts)
        return Certificates(
            method=noise.name,
            prediction=pred,
            radius=k / noise.q,
            counts=counts,
            forward_passes=noise.support,
            values={"k": k},
            q=noise.q,
        )

    def check_row(self, values, counts, prediction, radius, noise) -> None:
        if int(counts.sum()) != noise.support:
            raise ValueError(f"counts sum to {int(counts.sum())}, not L = {noise.support}")
        a, k = noise.exact_certificate(counts[None, :])
        if int(a[0]) != prediction or int(k[0]) != int(values["k"]) or radius != int(values["k"]) / noise.q:
            raise ValueError("prediction, k and radius do not follow from the counts")


class FixedSample(Procedure):
    """The paper's protocol: n0 selection samples pick class A, n fresh samples give the two-sided Clopper-Pearson
    lower bound p_lower on p_A at level alpha; the radius is the noise's :meth:`~ssn_exp.noises.SampledNoise.radius`
    of p_lower, plus the noise's further radii (:meth:`~ssn_exp.noises.SampledNoise.extra_radii`)."""

    name = "fixed"
    noise_type = SampledNoise
    requirement = "it samples the noise and needs its radius as a function of p_lower, and this noise is enumerated"

    def __init__(self, n0: int = 64, n: int = 100_000, alpha: float = 0.001):
        self.n0 = _count("procedure.n0", n0, maximum=MAX_SAMPLES)
        self.n = _count("procedure.n", n, maximum=MAX_SAMPLES)
        self.alpha = check_level("procedure.alpha", alpha, share=0.5, error=ProcedureError)  # two-sided: alpha / 2

    def describe(self) -> dict:
        return {"n0": self.n0, "n": self.n, "alpha": self.alpha}

    def columns(self, noise: SampledNoise) -> list[str]:
        return ["p_lower", *noise.extra_columns]

    def samples_per_example(self, noise) -> int:
        return max(self.n0, self.n)

    def forward_passes(self, noise) -> int:
        return self.n0 + self.n

    def certify(self, model, x, noise, num_classes, *, noise_batch=1024, generator=None, progress=None, labels=None):
        self.check(noise)
        if isinstance(generator, list | tuple):  # one generator per example
            if len(generator) != x.shape[0]:
                raise ValueError(f"{len(generator)} generators for {x.shape[0]} examples")
            check_unit_box(x)
            parts = []
            for j, g in enumerate(generator):
                try:
                    parts.append(self._certify(model, x[j : j + 1], noise, num_classes, noise_batch, g, progress))
                except NonFiniteLogitsError as exc:
                    raise NonFiniteLogitsError(str(exc), positions=[j]) from None
            if not parts:
                return self._certify(model, x, noise, num_classes, noise_batch, None, progress)
            return Certificates.concat(parts)
        return self._certify(model, x, noise, num_classes, noise_batch, generator, progress)

    def _certify(self, model, x, noise, num_classes, noise_batch, generator, progress) -> Certificates:
        kw = dict(num_classes=num_classes, noise_batch=noise_batch, generator=generator, progress=progress)
        check_unit_box(x)
        counts0 = count_predictions(model, x, noise, self.n0, **kw).cpu().numpy()
        pred = top_class(counts0)
        counts = count_predictions(model, x, noise, self.n, **kw).cpu().numpy()
        p_lower = clopper_pearson_lower(counts[np.arange(len(pred)), pred], self.n, self.alpha)
        values = {"p_lower": p_lower, **noise.extra_radii(x, p_lower)}
        missing = [c for c in noise.extra_columns if c not in values]
        if missing:
            raise ValueError(f"{type(noise).__name__}.extra_radii gives no {', '.join(missing)}")
        return Certificates(
            method=noise.name,
            prediction=pred,
            radius=np.asarray(noise.radius(p_lower), dtype=np.float64),
            counts=counts,
            forward_passes=self.n0 + self.n,
            values=values,
            counts_n0=counts0,
        )

    def check_row(self, values, counts, prediction, radius, noise) -> None:
        p = float(values["p_lower"])
        # the radius is p_lower's to 1e-9, relative (math.isclose's default rel_tol) or absolute
        if not 0.0 <= p <= 1.0 or not math.isclose(radius, float(noise.radius(np.array([p]))[0]), abs_tol=1e-9):
            raise ValueError("p_lower and radius disagree")
        if int(counts.sum()) != self.n:
            raise ValueError(f"counts sum to {int(counts.sum())}, not N = {self.n}")
        if abs(p - float(clopper_pearson_lower(int(counts[prediction]), self.n, self.alpha))) > 1e-12:
            raise ValueError("p_lower does not follow from the counts of the prediction")
        noise.check_extra({c: float(values[c]) for c in noise.extra_columns}, radius)


class NoiseDefault(Procedure):
    """``procedure=auto`` (the default): the noise's own procedure, chosen when the noise is known (after training
    starts, or from a checkpoint): :class:`Exact` for an enumerated noise, :class:`FixedSample` with (n0, n, alpha)
    for a sampled one (its settings checked now, whatever the noise). It certifies nothing itself: :meth:`for_noise`
    returns the procedure that does."""

    name = "auto"

    def __init__(self, n0: int = 64, n: int = 100_000, alpha: float = 0.001):
        self.sampled = FixedSample(n0=n0, n=n, alpha=alpha)

    def for_noise(self, noise: Noise) -> Procedure:
        return (Exact() if isinstance(noise, EnumeratedNoise) else self.sampled).for_noise(noise)


def default_procedure(noise: Noise, *, n0: int = 64, n: int = 100_000, alpha: float = 0.001) -> Procedure:
    """The noise's own procedure (what ``procedure=`` defaults to for it): :class:`Exact` for an enumerated noise,
    :class:`FixedSample` with (n0, n, alpha) for a sampled one."""
    return Exact() if isinstance(noise, EnumeratedNoise) else FixedSample(n0=n0, n=n, alpha=alpha)


def certify_batch(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    smoothing: Noise,
    num_classes: int,
    *,
    n0: int = 64,
    n: int = 100_000,
    alpha: float = 0.001,
    noise_batch: int = 1024,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    procedure=None,
) -> Certificates:
    """Certify a batch x (batch, C, H, W) in [0, 1] with the smoothed version of ``model``.

    ``procedure``: how the statistics are gathered (:mod:`ssn_exp.certify.procedures`); by default the noise's
    own: DSSN enumerates all L offsets (exact; n0, n, alpha and generator are unused), a sampled noise (uniform,
    SSN, Laplace) takes class A from n0 samples, then n fresh samples and the Clopper-Pearson bound, and its
    radius from the noise (uniform / SSN: also the box-constrained radius).
    The model should be in eval mode; this runs under ``torch.inference_mode``. Noisy inputs are handed
    to an ``nn.Module`` in the dtype of its parameters (e.g. float64 models get float64 inputs).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if procedure is None:
        procedure = default_procedure(smoothing, n0=n0, n=n, alpha=alpha)
    return procedure.certify(
        model, x, smoothing, num_classes, noise_batch=noise_batch, generator=generator, progress=progress
    )


class SmoothedClassifier:
    """A framework-free smoothed classifier: ``SmoothedClassifier(model, DSSN(...), 10).certify(x)``."""

    def __init__(self, model: torch.nn.Module, smoothing: Noise, num_classes: int, **certify_kwargs):
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
