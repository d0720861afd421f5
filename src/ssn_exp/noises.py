"""Smoothing noises for l1 certification (docs/method.md sections 1-3 and 14; docs/extending.md).

Plain torch + numpy: no Lightning, no Hydra, no I/O. Every noise works on any device (noise is made where
the input lives) and on NCHW or flat inputs.

A noise is one class: its scale from sigma (:meth:`Noise.scale`), noisy copies (:meth:`Noise.sample` for
training, :meth:`Noise.copies` for certification) and the certificate its samples support:

- :class:`SampledNoise`: drawn at random; certified by sampling (``procedure=fixed``) with the l1 radius as a
  function of the lower confidence bound on the top-class probability (:meth:`SampledNoise.radius`), plus any
  further radii that hold for it (:meth:`SampledNoise.extra_radii`, e.g. uniform noise's box-constrained one).
- :class:`EnumeratedNoise`: finitely many noisy copies, enumerated (``procedure=exact``); the certificate
  follows exactly from the counts (:meth:`EnumeratedNoise.exact_certificate`).

The noises shipped here:

- :class:`Uniform` -- additive uniform noise x + U(-lam, lam)^d (Yang et al. 2020), lam = sqrt(3) sigma.
- :class:`SSN`     -- independent splitting noise, s ~ U(0, 2 lam)^d (Levine & Feizi 2021), lam = sqrt(3) sigma.
- :class:`DSSN`    -- deterministic SSN: L = floor(2 lam q) split offsets sharing one fixed
  vector v; certification enumerates all L of them.
- :class:`Laplace` -- additive Laplace noise x + Laplace(0, lam)^d (Teng, Lee & Yuan 2020), lam = sigma / sqrt(2);
  radius -lam log(2 (1 - p_lower)).

sigma is the standard deviation of the noise per pixel (for uniform noise and SSN: of the matched uniform noise;
for Laplace noise: of the Laplace noise itself).
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import numpy as np
import torch

from ssn_exp.box import box_radius, largest_box_radius
from ssn_exp.exceptions import UserError

__all__ = [
    "Noise",
    "SampledNoise",
    "EnumeratedNoise",
    "Uniform",
    "SSN",
    "DSSN",
    "Laplace",
    "InputDomainError",
    "OffGridError",
    "RadiusError",
    "check_radius_function",
    "check_unit_box",
    "exact_table",
    "levine2021_table",
    "MAX_LEVELS",
    "ARITHMETICS",
    "uniform_radius",
    "top_class",
    "exact_certificate",
]


class InputDomainError(UserError, ValueError):
    """An input outside the domain a certificate holds for (images in [0, 1]; DSSN: the k/q grid)."""


class OffGridError(InputDomainError):
    """An input that DSSN cannot certify: not on the k/q quantization grid."""


#: DSSN accepts x when |x q - k| <= _GRID_TOL for an integer k in [0, q].
_GRID_TOL = 1e-3
#: The most split offsets DSSN enumerates: every certificate costs L forward passes per image.
MAX_LEVELS = 1_000_000
#: The most entries of DSSN's lookup table ((q + 1) x 2L values; 2**27 float32 = 512 MiB).
_MAX_TABLE = 2**27
#: DSSN's table indices: below (q + 1) 2L + L <= _MAX_TABLE + MAX_LEVELS < 2**31, so int32 holds them all.
_INDEX_DTYPE = torch.int32
#: How DSSN's noisy values are computed: ``exact`` rounds the exact value once (default);
#: ``levine2021`` repeats the float32 operations of the authors' code, so their values are matched bit for bit.
ARITHMETICS = ("exact", "levine2021")


class RadiusError(UserError, ValueError):
    """A noise's radius function that cannot make a certificate: it raises, or gives NaN, infinity, a value of the
    wrong shape, a negative radius at p >= 1/2, or a radius that decreases as p grows (one-line message)."""


#: The probabilities a radius function is checked on (:func:`check_radius_function`): a grid of [0, 1).
RADIUS_GRID = np.linspace(0.0, 1.0, 1025)[:-1]


def check_radius_function(radius_fn, owner: str) -> None:
    """Raise :class:`RadiusError` naming ``owner`` unless ``radius_fn`` maps an array of probabilities on
    :data:`RADIUS_GRID` to an array of that shape of finite radii, non-decreasing, >= 0 from p = 1/2 on (negative
    below: nothing certified). Checked once before a certification writes its first row."""
    try:
        values = np.asarray(radius_fn(RADIUS_GRID.copy()), dtype=np.float64)
    except Exception as exc:  # a user's function: whatever it raises is reported in one line
        text = " ".join(str(exc).split())
        raise RadiusError(f"{owner} raises {type(exc).__name__} ({text}) for an array of probabilities") from None
    if values.shape != RADIUS_GRID.shape:
        problem = f"gives shape {values.shape} for {RADIUS_GRID.shape[0]} probabilities (one radius per p expected)"
    elif not np.all(np.isfinite(values)):
        bad = float(RADIUS_GRID[~np.isfinite(values)][0])
        problem = f"is not finite at p = {bad!r}"
    elif np.any(values[RADIUS_GRID >= 0.5] < 0):
        problem = "is negative at some p >= 1/2"
    elif np.any(np.diff(values) < 0):
        problem = "decreases as p grows"
    else:
        return
    raise RadiusError(f"{owner} {problem}: a certified radius must be a finite non-decreasing function of p_lower")


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    return sigma


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_unit_box(x: torch.Tensor) -> None:
    """Raise :class:`InputDomainError` unless every value of x is finite and in [0, 1] (one host sync)."""
    if not x.is_floating_point():
        raise InputDomainError(f"inputs must be floating-point images in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if lo >= 0.0 and hi <= 1.0:  # NaN fails both comparisons
        return
    flat = x.detach().reshape(x.shape[0], -1) if x.dim() > 0 else x.detach().reshape(1, 1)
    bad = ~((flat >= 0) & (flat <= 1))
    row, col = (int(v) for v in torch.nonzero(bad)[0])
    raise InputDomainError(
        f"input out of the image domain [0, 1]: example {row}, coordinate {col} has value {float(flat[row, col])!r} "
        "(noise is added to raw images in [0, 1]; normalise inside the model, not in the data)"
    )


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniforms in [0, 1) like x (floating point: :func:`check_unit_box` has passed), where x lives."""
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def uniform_radius(p_lower, lam: float) -> np.ndarray:
    """rho = 2 lam (p_lower - 1/2): the l1 radius of uniform noise U(-lam, lam)^d and of SSN (negative: nothing)."""
    return 2.0 * lam * (np.asarray(p_lower, dtype=np.float64) - 0.5)


class Noise:
    """A smoothing noise. Subclasses set ``name`` and implement :meth:`scale` and :meth:`_draw` (or :meth:`sample`
    and :meth:`copies`); the certificate comes from :class:`SampledNoise` or :class:`EnumeratedNoise`.

    ``sample(x)`` gives training-time noise: fresh per example. ``copies(x, dtype, generator)`` gives
    certification's noisy copies in chunks.
    """

    name: ClassVar[str]
    #: The display name in reports, tables and wandb (e.g. "DSSN"); a noise that sets ``name`` without ``label``
    #: is shown by its name.
    label: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and "label" not in cls.__dict__:
            cls.label = cls.name

    def __init__(self, sigma: float):
        self.sigma = _check_sigma(sigma)
        #: The noise's own scale parameter (uniform noise: the half-width lam = sqrt(3) sigma).
        self.lam = float(self.scale(self.sigma))

    def scale(self, sigma: float) -> float:
        """The noise's scale parameter for a standard deviation ``sigma`` per pixel (stored as ``self.lam``)."""
        raise NotImplementedError

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One noisy copy of every example of x (a batch of images in [0, 1]), fresh noise per example."""
        check_unit_box(x)
        return self._draw(x, generator)

    def _draw(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, x: torch.Tensor, start: int, stop: int, generator: torch.Generator | None = None):
        """``stop - start`` noisy copies of each example of x: shape (batch, stop - start, *x.shape[1:]).

        Every copy is a fresh draw; DSSN overrides this with its deterministic offsets (flattened to ``dim``).
        """
        check_unit_box(x)
        b, n = x.shape[0], stop - start
        return self._draw(x.unsqueeze(1).expand(b, n, *x.shape[1:]), generator)

    def copies(self, x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None):
        """Certification's noisy copies of the batch x, in chunks: a function ``draw(i0, i1, start, stop)`` giving
        copies ``[start, stop)`` of examples ``[i0, i1)`` in ``dtype``, shape (i1 - i0, stop - start, ...).

        The input is checked once, here (images in [0, 1]; DSSN: the quantization grid)."""
        check_unit_box(x)

        def draw(i0: int, i1: int, start: int, stop: int) -> torch.Tensor:
            return self.noisy(x[i0:i1], start, stop, generator).to(dtype)

        return draw

    def misfit(self, q: int, dim: int) -> str | None:
        """Why this noise cannot smooth inputs of ``dim`` values on the grid k/``q`` (e.g. "was built for q=16"), or
        None if it can. A noise built for no particular input space fits every one."""
        return None

    def describe(self) -> dict:
        """What the noise is (written to metrics.json and certify_settings.json): name, sigma, scale, parameters."""
        return {"method": self.name, "sigma": self.sigma, "lambda": self.lam}

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}(sigma={self.sigma:g})"


class SampledNoise(Noise):
    """A noise drawn at random, certified from samples: the certificate is a function of p_lower, a lower confidence
    bound on the smoothed classifier's top-class probability (``procedure=fixed``)."""

    #: Result columns of further certified radii (each ``radius_<name>``, e.g. ``radius_box``), as :meth:`extra_radii`.
    extra_columns: ClassVar[tuple[str, ...]] = ()

    def radius(self, p_lower) -> np.ndarray:
        """The certified l1 radius (float64 array) for lower bounds ``p_lower`` (array); negative: nothing certified.
        Finite, of p_lower's shape, non-decreasing and >= 0 from p_lower = 1/2 on (:meth:`check_radius`)."""
        raise NotImplementedError

    def check_radius(self) -> None:
        """Raise :class:`RadiusError` (one line, naming the class) unless :meth:`radius` is such a function on a
        grid of p: what a procedure that certifies this noise checks before its first row."""
        check_radius_function(self.radius, f"{type(self).__name__}.radius")

    def extra_radii(self, x: torch.Tensor, p_lower) -> dict[str, np.ndarray]:
        """Further certified radii of the examples x for ``p_lower``, one array per name of :attr:`extra_columns`."""
        return {}

    def check_extra(self, values: dict[str, float], radius: float) -> None:
        """Raise ``ValueError`` if the further radii ``values`` read back from a result file cannot be right."""


class EnumeratedNoise(Noise):
    """A noise with finitely many equally likely noisy copies, all enumerated: an exact certificate
    (``procedure=exact``). The radius is k / q for an integer k (:meth:`exact_certificate`)."""

    #: How many noisy copies enumerate the noise (each certificate costs this many forward passes per example).
    support: int
    #: The radius denominator: rho = k / q exactly.
    q: int

    def exact_certificate(self, counts) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, k) from the per-class counts over all :attr:`support` copies; the radius is k / q."""
        raise NotImplementedError


class _BoxConstrained(SampledNoise):
    """Independent per-pixel noise of half-width lam = sqrt(3) sigma whose shifted copies overlap in
    prod_i (1 - |delta_i| / 2 lam) of their mass: radius 2 lam (p_lower - 1/2), and the box-constrained radius
    (:func:`ssn_exp.box.box_radius`) as ``radius_box``."""

    extra_columns = ("radius_box",)

    def scale(self, sigma: float) -> float:
        return math.sqrt(3.0) * sigma

    def radius(self, p_lower) -> np.ndarray:
        return uniform_radius(p_lower, self.lam)

    def extra_radii(self, x, p_lower) -> dict[str, np.ndarray]:
        return {"radius_box": box_radius(x, p_lower, self.lam)}

    def check_extra(self, values, radius) -> None:
        box = values["radius_box"]
        if not box >= radius - 1e-12:
            raise ValueError("radius_box is below radius")
        most = largest_box_radius(radius / (2.0 * self.lam) + 0.5, self.lam)
        if not box <= most + 1e-9 * abs(most) + 1e-12:  # NaN and inf too
            raise ValueError(f"radius_box {box!r} is above what the box certificate gives for this p_lower ({most!r})")


class Uniform(_BoxConstrained):
    """x + eps, eps ~ U(-lam, lam)^d i.i.d., no clamping."""

    name = "uniform"
    label = "Uniform"

    def _draw(self, x, generator):
        # x + (2 r - 1) lam, computed in place in the fresh noise tensor (the same floats)
        return _rand(x, generator).mul_(2.0).sub_(1.0).mul_(self.lam).add_(x)


class SSN(_BoxConstrained):
    """Independent splitting noise: s ~ U(0, 2 lam)^d (appendix Theorem 2, eq. 42-43)."""

    name = "ssn"
    label = "SSN"

    def _draw(self, x, generator):
        s = _rand(x, generator).mul_(2.0 * self.lam)
        if self.lam >= 0.5:  # split(x, s), in place in the fresh tensors (the same floats)
            return (x > s).to(s.dtype).add_(s.clamp_(max=1.0)).mul_(0.5)
        return self.split_general(x, s)

    def split(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x_tilde for given split points s (same shape as x)."""
        if self.lam >= 0.5:
            # Equal to the general formula when 2 lam >= 1: ([x > s] + min(s, 1)) / 2.
            return ((x > s) + s.clamp(max=1.0)) * 0.5  # bool + float: s's dtype
        return self.split_general(x, s)

    def split_general(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The general formula, valid for every lam: (min(c, 1) + max(c - 2 lam, 0)) / 2."""
        w = 2.0 * self.lam
        c = w * torch.ceil((x - s) / w) + s
        return (c.clamp(max=1.0) + (c - w).clamp(min=0.0)) * 0.5


class Laplace(SampledNoise):
    """x + eps, eps ~ Laplace(0, lam)^d i.i.d., no clamping (Teng, Lee & Yuan 2020; rs4a's ``Laplace``).

    lam = sigma / sqrt(2), so sigma is the standard deviation per pixel. The certified l1 radius is
    -lam log(2 (1 - p_lower)) (docs/method.md section 14); no box-constrained radius is offered (the derivation of
    :mod:`ssn_exp.box` rests on uniform noise's overlap).
    """

    name = "laplace"
    label = "Laplace"

    def scale(self, sigma: float) -> float:
        return sigma / math.sqrt(2.0)

    def _draw(self, x, generator):
        # lam (E1 - E2) with E = -log1p(-r), r in [0, 1): the difference of two independent Exp(1) variables, every
        # value finite. Each value's pair (E1, E2) is adjacent in one draw, so the stream of uniforms, and with it
        # the noise, does not depend on how certification splits the copies into chunks (certify.noise_batch).
        e = torch.rand((*x.shape, 2), generator=generator, device=x.device, dtype=x.dtype).neg_().log1p_().neg_()
        return (e[..., 0] - e[..., 1]).mul_(self.lam).add_(x)

    def radius(self, p_lower) -> np.ndarray:
        """-lam log(2 (1 - p_lower)); p_lower = 1 (never a Clopper-Pearson bound) is taken as the largest float64
        below 1, a smaller lower bound, so the radius stays finite (lam * 36.04)."""
        p = np.minimum(np.asarray(p_lower, dtype=np.float64), 1.0 - 2.0**-53)
        return -self.lam * np.log(2.0 * (1.0 - p))


class DSSN(EnumeratedNoise):
    """Deterministic SSN on the quantized domain {0, 1/q, ..., 1}^dim.

    ``levels`` (L) = floor(2 lam q) offsets; ``v`` = RandomState(seed).randint(L, size=dim).
    Offset j splits coordinate i at s_i = ((v_i + j) mod L + 0.5) / q.

    Noisy values are computed from integers (the quantized input k and the split index m)
    through a lookup table, so they are bit-identical on every device and batch size.
    ``arithmetic="exact"`` fills the table with the exact values rounded once to the input's dtype;
    ``arithmetic="levine2021"`` with the float32 values the authors' code computes (see
    :func:`levine2021_table`), to reproduce their certificates bit for bit.
    """

    name = "dssn"
    label = "DSSN"

    def __init__(self, sigma: float, q: int, dim: int, seed: int = 0, arithmetic: str = "exact"):
        super().__init__(sigma)  # lam = sqrt(3) sigma, as for SSN
        self.q = _check_int("q", q, 1)
        self.dim = _check_int("dim", dim, 1)
        self.seed = _check_int("seed", seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"seed must be < 2**32 (numpy RandomState), got {seed!r}")
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"unknown DSSN arithmetic {arithmetic!r}; choose one of {list(ARITHMETICS)}")
        self.arithmetic = arithmetic
        levels = math.floor(2.0 * self.lam * self.q)
        if levels < 1:
            raise ValueError(
                f"sigma={self.sigma:g} is too small for q={self.q}: 2*sqrt(3)*sigma*q < 1 gives no split offsets"
            )
        if levels > MAX_LEVELS or (self.q + 1) * 2 * levels > _MAX_TABLE:
            raise ValueError(
                f"sigma={self.sigma:g} needs L = {levels:,} split offsets for q={self.q}; DSSN enumerates at most "
                f"{min(MAX_LEVELS, _MAX_TABLE // (2 * (self.q + 1))):,} here (each certificate costs L forward passes "
                "per image): choose a smaller sigma"
            )
        self.levels = int(levels)
        v = np.random.RandomState(self.seed).randint(self.levels, size=self.dim)
        self.v = torch.from_numpy(v.astype(np.int64))
        if arithmetic == "exact":
            values = exact_table(self.q, self.levels)  # float64, exact
        else:
            values = levine2021_table(self.q, self.levels, self.lam)  # their float32 values, exact in any wider dtype
        # The hot paths index a table doubled along m, row k holding table[k, (m mod L)] for m in [0, 2L):
        # the index of (k, (v_i + j) mod L) is then k * 2L + v_i + j, with no remainder to take.
        self._values2 = np.concatenate([values, values], axis=1).ravel()
        self._tables2: dict = {}
        #: table[k * L + m] = x_tilde for input k/q split at (m + 0.5)/q, as float32 (for inspection and tests).
        self._table = torch.from_numpy(values.astype(np.float32).ravel())
        # quantize() checks |x q - round(x q)| <= 1e-3 in float64. In float32, x q carries an error of at
        # most q 2^-24 (1 + 1e-3); a float32 check with this much less tolerance therefore only accepts
        # inputs the float64 check accepts, with the same k. Anything it flags goes to the float64 check.
        # The fast path also computes table indices k * 2L + v + j in float32, exact below 2^24.
        fast = self.q <= 4096 and self._values2.size + self.levels < 2**24
        self._fast_tol = _GRID_TOL - 2.0**-23 * self.q if fast else None
        self._cache: dict = {}

    def scale(self, sigma: float) -> float:
        return math.sqrt(3.0) * sigma

    @property
    def support(self) -> int:
        """L: certification enumerates all L offsets."""
        return self.levels

    def exact_certificate(self, counts) -> tuple[np.ndarray, np.ndarray]:
        return exact_certificate(counts)

    def misfit(self, q: int, dim: int) -> str | None:
        if (self.q, self.dim) != (q, dim):
            return f"was built for q={self.q}, dim={self.dim}"
        return None

    # -- helpers -------------------------------------------------------------------------
    def _table2(self, dtype: torch.dtype) -> torch.Tensor:
        """The doubled table in ``dtype`` (float64 values rounded once: exact, see :func:`exact_table`)."""
        if dtype not in self._tables2:
            self._tables2[dtype] = torch.from_numpy(self._values2).to(dtype)
        return self._tables2[dtype]

    def _on(self, device: torch.device, dtype: torch.dtype = torch.float32):
        """(v as the index dtype, v as float32, doubled table in ``dtype``) on ``device``, cached."""
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.v.to(device=device, dtype=_INDEX_DTYPE),
                self.v.to(device=device, dtype=torch.float32),
                self._table2(dtype).to(device),
            )
        return self._cache[key]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"DSSN expects a batch of inputs (batch, ...), got shape {tuple(x.shape)}")
        flat = x.flatten(1)  # (batch, C*H*W), also for an empty batch
        if flat.shape[1] != self.dim:
            raise ValueError(f"DSSN was built for dim={self.dim} but the input has {flat.shape[1]} values per example")
        if not flat.is_floating_point():
            raise ValueError(f"DSSN expects floating-point inputs in [0, 1], got dtype {flat.dtype}")
        return flat

    def _quantize_exact(self, flat: torch.Tensor) -> torch.Tensor:
        """The reference check, in float64: integer k (int64) or OffGridError naming the first bad value."""
        scaled = flat.double() * self.q
        k = torch.round(scaled)
        err = (scaled - k).abs()
        bad = (err > _GRID_TOL) | (k < 0) | (k > self.q) | ~torch.isfinite(scaled)
        if bool(bad.any()):
            idx = torch.nonzero(bad)[0].tolist()
            value = float(flat[idx[0], idx[1]])
            raise OffGridError(
                f"DSSN input is off the quantization grid k/{self.q}: example {idx[0]}, coordinate {idx[1]} "
                f"has value {value!r} (DSSN certificates hold only for inputs in {{0, 1/{self.q}, ..., 1}})"
            )
        return k.long()

    def _grid_fast(self, flat: torch.Tensor) -> torch.Tensor | None:
        """k as float32 (batch, dim) if a float32 check accepts every value, else None.

        A handful of ops and one host sync. k is clamped to [0, q] before the error is taken, so an
        out-of-range value shows as a large error; NaN and inf give a NaN or inf error.
        """
        if self._fast_tol is None or flat.numel() == 0:
            return None
        if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return None
        scaled = flat.float() * self.q
        k = torch.round(scaled).clamp_(0, self.q)
        if scaled.sub_(k).abs_().max().item() <= self._fast_tol:
            return k
        return None

    def _base(self, x: torch.Tensor, j: torch.Tensor | None = None) -> torch.Tensor:
        """Index k * 2L + v (+ j, shape (batch, 1)) in the doubled table: (batch, dim), the index dtype.

        Checks the grid like :meth:`quantize` (the same accepted inputs, the same errors).
        """
        flat = self._flat(x)
        v_int, v_float, _ = self._on(x.device)
        k = self._grid_fast(flat)
        if k is not None:  # float32 arithmetic on integers below 2^24: exact
            idx = v_float if j is None else v_float + j
            return idx.add(k, alpha=2 * self.levels).to(_INDEX_DTYPE)
        idx = self._quantize_exact(flat).to(_INDEX_DTYPE).mul_(2 * self.levels).add_(v_int)
        if j is not None:
            idx.add_(j)
        return idx

    def _offsets_from_base(
        self, base: torch.Tensor, start: int, stop: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """x_tilde (in ``dtype``) for offsets j in [start, stop) given :meth:`_base`: (batch, stop - start, dim)."""
        _, _, table2 = self._on(base.device, dtype)
        j = torch.arange(start, stop, device=base.device, dtype=base.dtype)
        idx = base.unsqueeze(1) + j.view(-1, 1)  # (batch, n, dim), all < (q + 1) * 2L
        return table2.index_select(0, idx.view(-1)).view(idx.shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer grid indices k (int64, shape (batch, dim)) of x = k/q; rejects anything else."""
        flat = self._flat(x)
        k = self._grid_fast(flat)
        return self._quantize_exact(flat) if k is None else k.long()

    # -- public API ------------------------------------------------------------------------
    def sample(self, x, generator=None):
        """Training noise: one uniformly random offset j per example, the same v always."""
        self._flat(x)  # shape checks first
        j = torch.randint(self.levels, (x.shape[0], 1), generator=generator, device=x.device)  # in [0, L)
        idx = self._base(x, j)  # k * 2L + v + j: the entry for m = (v + j) mod L
        _, _, table2 = self._on(x.device, x.dtype)
        return table2.index_select(0, idx.view(-1)).view(x.shape)

    def offsets(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """x_tilde for offsets j in [start, stop): shape (batch, stop - start, dim)."""
        stop = self.levels if stop is None else stop
        if not (0 <= start <= stop <= self.levels):
            raise ValueError(f"offset range [{start}, {stop}) outside [0, {self.levels})")
        return self._offsets_from_base(self._base(x), start, stop, x.dtype)

    def noisy(self, x, start, stop, generator=None):
        return self.offsets(x, start, stop)

    def copies(self, x, dtype, generator=None):
        """The offsets in chunks: the grid check and the integer work once for the whole batch (no randomness)."""
        base = self._base(x)

        def draw(i0: int, i1: int, start: int, stop: int) -> torch.Tensor:
            if not 0 <= start <= stop <= self.levels:
                raise ValueError(f"offset range [{start}, {stop}) outside [0, {self.levels})")
            return self._offsets_from_base(base[i0:i1], start, stop, dtype)

        return draw

    def describe(self) -> dict:
        return {
            **super().describe(),
            "q": self.q,
            "levels": self.levels,
            "seed": self.seed,
            "arithmetic": self.arithmetic,
        }

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"DSSN(sigma={self.sigma:g}, q={self.q}, dim={self.dim}, seed={self.seed}, levels={self.levels}, "
            f"arithmetic={self.arithmetic!r})"
        )


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


def exact_table(q: int, levels: int) -> np.ndarray:
    """x_tilde[k, m] (float64, shape (q + 1, L)) for the input k/q split at (m + 0.5)/q, with 2 lam = L/q.

    Computed from integers: with n = ceil((x - s) / (L/q)) = floor((k - m - 1) / L) + 1, c = (2nL + 2m + 1)/(2q)
    and x_tilde = (min(c, 1) + max(c - L/q, 0)) / 2 = t / (4q) for an integer t; the float64 quotient is that
    rational rounded once. Rounding it again to float32 still gives the float32 nearest to t / (4q): a rational
    with denominator 4q lies either exactly on a float32 rounding boundary (then float64 holds it exactly) or at
    least 2^-24 / (4q) (relative) away from one, far more than float64's 2^-53 error.
    """
    k = np.arange(q + 1)[:, None]  # int64
    m = np.arange(levels)[None, :]
    n = np.floor_divide(k - m - 1, levels) + 1
    c2 = 2 * n * levels + 2 * m + 1  # 2q * c, an odd integer
    t = np.minimum(c2, 2 * q) + np.maximum(c2 - 2 * levels, 0)  # 4q * x_tilde
    return t / (4.0 * q)


def levine2021_table(q: int, levels: int, lam: float) -> np.ndarray:
    """x_tilde[k, m] (float32, shape (q + 1, L)) exactly as the authors' code computes it (Levine & Feizi 2021).

    Their ``SplitMethodDerandomized`` takes x = uint8 / 255 in float32 (torchvision ``ToTensor``), the split
    s = (m + 0.5) / 255.0 in float32 and, for lam >= 0.5, ``(float(x > s) + clamp(s, max=1)) / 2``; for
    lam < 0.5 ``ceil(255 (x - s) / L) * L / 255 + s``, clamped and averaged. Every operation below is the same
    float32 torch operation on the same operands (with q in place of their hard-coded 255), so the values are
    theirs bit for bit; the two roundings make about 1 value in 25 differ from :func:`exact_table` by one ulp.
    """
    x = torch.arange(q + 1).float().div(q).view(-1, 1)  # ToTensor: uint8 -> float32, / 255
    s = (torch.arange(levels) + 0.5) / float(q)  # int64 + 0.5: float32, a row
    if lam >= 0.5:
        gt = (x > s).float()
        out = (gt + torch.clamp(s, max=1)) / 2
    else:
        ceil_dist = torch.ceil(float(q) * (x - s) / levels) * levels / float(q) + s
        upper = torch.clamp(ceil_dist, max=1)
        lower = torch.clamp(ceil_dist - levels / float(q), min=0)
        out = (upper + lower) / 2
    return out.numpy()
