"""Smoothing noise for l1 certification (SPEC.md sections 1-2).

Plain torch + numpy: no Lightning, no Hydra, no I/O. Every method works on any
device (noise is made where the input lives) and on NCHW or flat inputs.

- :class:`Uniform` -- additive uniform noise x + U(-lam, lam)^d (Yang et al. 2020).
- :class:`SSN`     -- independent splitting noise, s ~ U(0, 2 lam)^d (Levine & Feizi 2021).
- :class:`DSSN`    -- deterministic SSN: L = floor(2 lam q) split offsets sharing one fixed
  vector v; certification enumerates all L of them.

sigma is the standard deviation of the matched uniform noise; lam = sqrt(3) * sigma.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import numpy as np
import torch

__all__ = ["Smoothing", "Uniform", "SSN", "DSSN", "METHODS", "make_smoothing", "OffGridError"]


class OffGridError(ValueError):
    """An input that DSSN cannot certify: not on the k/q quantization grid."""


#: DSSN accepts x when |x q - k| <= _GRID_TOL for an integer k in [0, q].
_GRID_TOL = 1e-3


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


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype)


class Smoothing:
    """Common interface. ``sample(x)`` gives training-time noise: fresh per example."""

    name: ClassVar[str]
    #: True for DSSN (exact certificate), False for the sampled methods.
    deterministic: ClassVar[bool] = False

    def __init__(self, sigma: float):
        self.sigma = _check_sigma(sigma)
        self.lam = math.sqrt(3.0) * self.sigma

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, x: torch.Tensor, start: int, stop: int, generator: torch.Generator | None = None):
        """``stop - start`` noisy copies of each example of x: shape (batch, stop - start, *x.shape[1:]).

        For the sampled methods every copy is a fresh draw; DSSN overrides this with
        its deterministic offsets (flattened to ``dim``).
        """
        b, n = x.shape[0], stop - start
        rep = x.unsqueeze(1).expand(b, n, *x.shape[1:])
        return self.sample(rep, generator)

    def describe(self) -> dict:
        return {"method": self.name, "sigma": self.sigma, "lambda": self.lam}

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}(sigma={self.sigma:g})"


class Uniform(Smoothing):
    """x + eps, eps ~ U(-lam, lam)^d i.i.d., no clamping."""

    name = "uniform"

    def sample(self, x, generator=None):
        # x + (2 r - 1) lam, computed in place in the fresh noise tensor (the same floats)
        return _rand(x, generator).mul_(2.0).sub_(1.0).mul_(self.lam).add_(x)


class SSN(Smoothing):
    """Independent splitting noise: s ~ U(0, 2 lam)^d (appendix Theorem 2, eq. 42-43)."""

    name = "ssn"

    def sample(self, x, generator=None):
        s = _rand(x, generator).mul_(2.0 * self.lam)
        if self.lam >= 0.5:  # split(x, s), in place in the fresh tensors (the same floats)
            return (x > s).to(s.dtype).add_(s.clamp_(max=1.0)).mul_(0.5)
        return self.split_general(x, s)

    def split(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x_tilde for given split points s (same shape as x)."""
        if self.lam >= 0.5:
            # Equal to the general formula when 2 lam >= 1: ([x > s] + min(s, 1)) / 2.
            return ((x > s).to(s.dtype) + s.clamp(max=1.0)) * 0.5
        return self.split_general(x, s)

    def split_general(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The general formula, valid for every lam: (min(c, 1) + max(c - 2 lam, 0)) / 2."""
        w = 2.0 * self.lam
        c = w * torch.ceil((x - s) / w) + s
        return (c.clamp(max=1.0) + (c - w).clamp(min=0.0)) * 0.5


class DSSN(Smoothing):
    """Deterministic SSN on the quantized domain {0, 1/q, ..., 1}^dim.

    ``levels`` (L) = floor(2 lam q) offsets; ``v`` = RandomState(seed).randint(L, size=dim).
    Offset j splits coordinate i at s_i = ((v_i + j) mod L + 0.5) / q.

    Noisy values are computed from integers (the quantized input k and the split index m)
    through an exact lookup table, so they are bit-identical on every device and batch size.
    """

    name = "dssn"
    deterministic = True

    def __init__(self, sigma: float, q: int, dim: int, seed: int = 0):
        super().__init__(sigma)
        self.q = _check_int("q", q, 1)
        self.dim = _check_int("dim", dim, 1)
        self.seed = _check_int("seed", seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"seed must be < 2**32 (numpy RandomState), got {seed!r}")
        self.levels = int(math.floor(2.0 * self.lam * self.q))
        if self.levels < 1:
            raise ValueError(
                f"sigma={self.sigma:g} is too small for q={self.q}: 2*sqrt(3)*sigma*q < 1 gives no split offsets"
            )
        v = np.random.RandomState(self.seed).randint(self.levels, size=self.dim)
        self.v = torch.from_numpy(v.astype(np.int64))
        # table[k, m] = x_tilde for input k/q split at (m + 0.5)/q, exact in float64 then rounded once.
        k = np.arange(self.q + 1, dtype=np.int64)[:, None]
        m = np.arange(self.levels, dtype=np.int64)[None, :]
        L, q = self.levels, self.q
        n = np.floor_divide(k - m - 1, L) + 1  # = ceil((x - s) / (L/q)) exactly
        c2 = 2 * n * L + 2 * m + 1  # 2q * c, an odd integer
        t = np.minimum(c2, 2 * q) + np.maximum(c2 - 2 * L, 0)  # 4q * x_tilde
        table = (t / (4.0 * q)).astype(np.float32)
        self._table = torch.from_numpy(table.reshape(-1))
        # The hot paths index a table doubled along m, row k holding table[k, (m mod L)] for m in [0, 2L):
        # the index of (k, (v_i + j) mod L) is then k * 2L + v_i + j, with no remainder to take.
        self._table2 = torch.from_numpy(np.concatenate([table, table], axis=1).reshape(-1))
        self._index_dtype = torch.int32 if self._table2.numel() + self.levels < 2**31 else torch.int64
        # quantize() checks |x q - round(x q)| <= 1e-3 in float64. In float32, x q carries an error of at
        # most q 2^-24 (1 + 1e-3); a float32 check with this much less tolerance therefore only accepts
        # inputs the float64 check accepts, with the same k. Anything it flags goes to the float64 check.
        # The fast path also computes table indices k * 2L + v + j in float32, exact below 2^24.
        fast = self.q <= 4096 and self._table2.numel() + self.levels < 2**24
        self._fast_tol = _GRID_TOL - 2.0**-23 * self.q if fast else None
        self._cache: dict = {}

    # -- helpers -------------------------------------------------------------------------
    def _on(self, device: torch.device):
        """(v as the index dtype, v as float32, doubled table) on ``device``, cached."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (
                self.v.to(device=device, dtype=self._index_dtype),
                self.v.to(device=device, dtype=torch.float32),
                self._table2.to(device),
            )
        return self._cache[key]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"DSSN expects a batch of inputs (batch, ...), got shape {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
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
            return idx.add(k, alpha=2 * self.levels).to(self._index_dtype)
        idx = self._quantize_exact(flat).to(self._index_dtype).mul_(2 * self.levels).add_(v_int)
        if j is not None:
            idx.add_(j)
        return idx

    def _offsets_from_base(self, base: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x_tilde for offsets j in [start, stop) given :meth:`_base`: shape (batch, stop - start, dim)."""
        _, _, table2 = self._on(base.device)
        j = torch.arange(start, stop, device=base.device, dtype=base.dtype)
        idx = base.unsqueeze(1) + j.view(1, -1, 1)  # (batch, n, dim), all < (q + 1) * 2L
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
        j = torch.randint(0, self.levels, (x.shape[0], 1), generator=generator, device=x.device)
        idx = self._base(x, j)  # k * 2L + v + j: the entry for m = (v + j) mod L
        _, _, table2 = self._on(x.device)
        return table2.index_select(0, idx.view(-1)).view(x.shape).to(x.dtype)

    def offsets(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """x_tilde for offsets j in [start, stop): shape (batch, stop - start, dim)."""
        stop = self.levels if stop is None else stop
        if not (0 <= start <= stop <= self.levels):
            raise ValueError(f"offset range [{start}, {stop}) outside [0, {self.levels})")
        return self._offsets_from_base(self._base(x), start, stop)

    def noisy(self, x, start, stop, generator=None):
        return self.offsets(x, start, stop)

    def describe(self) -> dict:
        return {**super().describe(), "q": self.q, "levels": self.levels, "seed": self.seed}

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"DSSN(sigma={self.sigma:g}, q={self.q}, dim={self.dim}, seed={self.seed}, levels={self.levels})"


METHODS = {"uniform": Uniform, "ssn": SSN, "dssn": DSSN}


def make_smoothing(
    method: str, sigma: float, *, q: int | None = None, dim: int | None = None, seed: int = 0
) -> Smoothing:
    """Build a method by name; unknown names fail loudly."""
    if method not in METHODS:
        raise ValueError(f"unknown smoothing method {method!r}; choose one of {sorted(METHODS)}")
    if method == "dssn":
        if q is None or dim is None:
            raise ValueError("dssn needs the quantization q and the input dimension dim")
        return DSSN(sigma, q=q, dim=dim, seed=seed)
    return METHODS[method](sigma)
