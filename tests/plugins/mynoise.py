"""A noise defined outside ssn_exp (tests/test_user_noise.py, tests/test_noise_contract.py; the recipe:
docs/extending.md): uniform noise of half-width lam = sqrt(3) sigma certified with a deliberately more conservative
radius lam (p_lower - 1/2) (half the valid 2 lam (p_lower - 1/2)), plus ``radius_half``, half of it."""

import math

import numpy as np
import torch

from ssn_exp.noises import SampledNoise


class HalfUniform(SampledNoise):
    name = "mynoise"
    extra_columns = ("radius_half",)

    def scale(self, sigma):
        return math.sqrt(3.0) * sigma

    def _draw(self, x, generator):
        r = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2.0 * r - 1.0) * self.lam

    def radius(self, p_lower):
        return self.lam * (np.asarray(p_lower, dtype=np.float64) - 0.5)

    def extra_radii(self, x, p_lower):
        return {"radius_half": 0.5 * self.radius(p_lower)}

    def check_extra(self, values, radius):
        if not math.isclose(values["radius_half"], 0.5 * radius, rel_tol=1e-12, abs_tol=1e-12):
            raise ValueError("radius_half is not half the radius")
