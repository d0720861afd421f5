r"""Box-constrained l1 certificate for uniform noise and SSN.

After Voracek & Hein, "Improving l1-Certified Robustness via Randomized Smoothing by Leveraging Box
Constraints", ICML 2023; the derivation below is self-contained.

Setting. Inputs live in the box [0, 1]^d, the noise is uniform U(-lam, lam)^d (lam = sqrt(3) sigma)
or SSN's per-pixel splitting noise with split points s_i ~ U(0, 2 lam) drawn independently per pixel.

Overlap. U(-lam, lam)^d around x and around x + delta share a fraction
    ov(delta) = prod_i max(0, 1 - |delta_i| / (2 lam))
of their mass (TV distance 1 - ov). For SSN, draw the same s for x and x + delta: pixel i gives the
same noisy value unless a split point s_i + 2 lam Z falls between x_i and x_i + delta_i, which has
probability min(1, |delta_i| / (2 lam)); the draws are independent, so the coupling succeeds with
probability at least ov(delta) as well.

Threshold. With p_A >= p_lower and p_B <= 1 - p_A, at x + delta the top class keeps
p_A' >= p_A - (1 - ov) and any other class has p_B' <= p_B + (1 - ov). So the prediction cannot
change while ov(delta) >= t := 3/2 - p_A (at equality only a tie: the usual inclusive limit). One
pixel alone (ov = 1 - |delta_i| / (2 lam)) gives the standard radius rho = 2 lam (p_A - 1/2).

Box. x + delta must stay in [0, 1]^d, so |delta_i| <= m_i := max(x_i, 1 - x_i) (any magnitude in
[0, m_i] is reachable by moving towards the far edge). The certified radius is the smallest l1
budget r for which some a with 0 <= a_i <= m_i, sum a_i = r, has ov(a) <= t.

Greedy is optimal (majorisation). log ov(a) = sum_i psi(a_i), psi(a) = log max(0, 1 - a / (2 lam)),
is a separable sum of a concave (extended-valued) function, hence Schur-concave. Sort m descending,
m_(1) >= m_(2) >= ...; the greedy point g(r) = (m_(1), ..., m_(k), r - S_k, 0, ...), S_k the sum of
the k largest m, majorises every feasible a with the same sum r: any l entries of a sum to at most
min(r, sum of their m_i) <= min(r, S_l), which is the sum of the l largest entries of g(r). So
ov(g(r)) <= ov(a), and the adversary's best move is g(r). ov(g(r)) is continuous and
non-increasing in r (strictly decreasing while positive).

Solving. With P_k = prod_{j<=k} (1 - m_(j) / (2 lam)) (P_0 = 1), on the k-th piece
(S_k <= r <= S_{k+1}) ov(g(r)) = P_k (1 - u / (2 lam)), u = r - S_k. It reaches t at
u = 2 lam (1 - t / P_k); take the first k (from 0) with u <= m_(k+1), and rho_box = S_k + u. If no k
qualifies (P_d > t), every point of the box is certified and we return max(sum_i m_i, rho): sum_i m_i
is the farthest l1 distance inside the box; rho > sum_i m_i (>= d/2) needs d < 2 rho <= 2 lam, and then
the whole box is certified anyway (P_d >= 1 - sum_i m_i / (2 lam) > t), so returning sum_i m_i alone
would only break rho_box >= rho in such low-dimensional cases. k = 0 gives the standard radius, so
rho_box >= rho always, with equality whenever rho <= max_i m_i (and max_i m_i >= 1/2).
For p_lower <= 1/2 the standard radius 2 lam (p_lower - 1/2) <= 0 is returned unchanged.

Non-positive factors. For P_k > 0, u <= m_(k+1) is equivalent to P_{k+1} = P_k (1 - m_(k+1)/(2 lam))
<= t. If no k' < k qualified, P_k > t >= 1/2 > 0; and if the factor of m_(k+1) is <= 0 (m_(k+1) >= 2 lam)
then P_{k+1} <= 0 < t, so the first qualifying k always comes at or before the first non-positive
factor. (In fact, since m is sorted, a non-positive factor means m_(1) >= 2 lam > rho, so k = 0.)
The code clips the factors to [0, 1] (P then is non-increasing), so k = #{j in 1..d : P_j > t},
no division by a P_k <= 0 can happen, and u is clipped to m_(k+1) against rounding.

Not for DSSN: DSSN shares one offset across all pixels, the per-pixel events are not independent and
the coupling probability is not the product ov(delta), so this certificate does not apply to it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["box_radius", "largest_box_radius"]


def _as_float64(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(a).__name__}") from e


def box_radius(x, p_lower, lam) -> np.ndarray:
    """Certified l1 radius of uniform/SSN smoothing for inputs constrained to [0, 1]^d.

    ``x``: (batch, ...) tensor or array with values in [0, 1] (flattened per example);
    ``p_lower``: (batch,) lower bounds of the top-class probability; ``lam``: noise half-width.
    Returns float64 (batch,): rho_box = S_k + 2 lam (1 - t / P_k) for the first qualifying k
    (see the module docstring), max(sum_i m_i, rho) if the whole box is certified, and the standard
    2 lam (p_lower - 1/2) when p_lower <= 1/2 (or when that is <= max_i m_i).
    """
    xs = _as_float64(x, "x")
    if xs.ndim < 1:
        raise ValueError(f"x must have shape (batch, ...), got a scalar of shape {xs.shape}")
    p = _as_float64(p_lower, "p_lower")
    if p.ndim != 1:
        raise ValueError(f"p_lower must have shape (batch,), got {p.shape}")
    batch = xs.shape[0]
    if p.shape[0] != batch:
        raise ValueError(f"p_lower has {p.shape[0]} entries but x has a batch of {batch}")
    if isinstance(lam, bool):
        raise ValueError(f"lam must be a positive finite number, got {lam!r}")
    try:
        lam_f = float(lam)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lam must be a positive finite number, got {lam!r}") from e
    if not (math.isfinite(lam_f) and lam_f > 0):
        raise ValueError(f"lam must be a positive finite number, got {lam!r}")
    if not np.all(np.isfinite(xs)):
        raise ValueError("x must be finite (found NaN or inf)")
    if xs.size and (xs.min() < 0.0 or xs.max() > 1.0):
        raise ValueError(f"x must lie in [0, 1], found values in [{xs.min()}, {xs.max()}]")
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also rejects NaN
        raise ValueError("p_lower must lie in [0, 1] (found values outside or NaN)")
    if batch == 0:
        return np.zeros(0)

    d = xs[0].size  # values per example (batch >= 1 here)
    xs = xs.reshape(batch, d)
    w = 2.0 * lam_f
    q = p - 0.5  # exact for p in [1/4, 1]
    standard = w * q  # 2 lam (p - 1/2), the same floats as randomized_radius
    if d == 0:  # no pixel to move: everything is certified; never report less than the standard radius
        return standard

    t = (1.0 - q)[:, None]  # 3/2 - p
    rows = np.arange(batch)
    with np.errstate(all="ignore"):
        m = -np.sort(-np.maximum(xs, 1.0 - xs))  # room per pixel, descending along each row
        factors = np.maximum(1.0 - m / w, 0.0)  # <= 1: m >= 0
        prods = np.cumprod(factors, axis=1)  # P_1 .. P_d, non-increasing
        k = np.count_nonzero(prods > t, axis=1)  # first k with P_{k+1} <= t; d if none
        p_k = np.concatenate([np.ones((batch, 1)), prods], axis=1)[rows, k]
        sums = np.cumsum(m, axis=1)
        s_k = np.concatenate([np.zeros((batch, 1)), sums], axis=1)[rows, k]
        m_next = m[rows, np.minimum(k, d - 1)]
        # u = 2 lam (1 - t / P_k) = 2 lam ((P_k - 1) + q) / P_k; k = 0 (P_0 = 1) gives 2 lam (p - 1/2) bit for bit,
        # so p_lower <= 1/2 (t >= 1, k = 0, u <= 0) returns the standard radius. For p_lower > 1/2, q and t = 1 - q
        # are exact and P_k > t, so (P_k - 1) + q > 0: u >= 0 without a clip; u <= m_(k+1) only up to rounding.
        u = np.minimum(w * ((p_k - 1.0) + q) / p_k, m_next)
        # Whole box certified: any value >= sum_i m_i says so; keep rho_box >= rho (tiny boxes, d = 1).
        return np.where(k < d, s_k + u, np.maximum(sums[:, -1], standard))


def largest_box_radius(p_lower: float, lam: float) -> float:
    """A bound on :func:`box_radius` of ``p_lower`` over every input of every size (bounds a radius read back);
    within 3/2 of the largest (inputs of 1/2 in enough pixels).

    With c(a) = -log(1 - a / (2 lam)), convex with c(0) = 0, c(a) / a grows, so a pixel of room m_i >= 1/2 costs
    c(m_i) >= 2 m_i c(1/2). The greedy point g(r) fills rooms summing to at least r - 1 (the partial room is <= 1),
    so -log ov(g(r)) >= 2 c(1/2) (r - 1) and ov(g(r)) <= t once r >= D / 2 + 1, D = log t / log(1 - 1 / (4 lam)).
    So rho_box <= max(rho, D / 2 + 1) (also where the whole box is certified: sum_i m_i < D / 2 + 1 then). For
    p_lower <= 1/2, or 2 lam <= 1/2 (one pixel of room 1/2 moves all the mass), it is the standard radius rho.
    """
    q = float(p_lower) - 0.5
    rho = 2.0 * lam * q
    f = 1.0 - 1.0 / (4.0 * lam)
    if not q > 0 or f <= 0:
        return rho
    d = math.log(1.0 - q) / math.log(f)
    return max(rho, d / 2.0 + 1.0)
