"""The noise contract (``ssn_exp.noises``: :class:`Noise`, :class:`SampledNoise`, :class:`EnumeratedNoise`;
docs/extending.md, "A noise"), checked for every noise: ssn_exp's own and the user's of tests/plugins. A new noise is
one entry of ``helpers.all_noises``; what is particular to one noise stays in its own tests (test_smoothing.py,
test_laplace.py, test_box.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import ssn_exp.noises as noises_module
from helpers import NOISES, SAMPLED_NOISES, all_noises
from ssn_exp.noises import (
    RADIUS_GRID,
    EnumeratedNoise,
    InputDomainError,
    Noise,
    RadiusError,
    SampledNoise,
    check_radius_function,
)

Q, DIM = 16, 16
NOISE = all_noises(Q, DIM)


def _images(n: int, shape=(1, 4, 4), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """n images on the grid k/Q (what DSSN certifies; every noise accepts them)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, Q + 1, (n, *shape), generator=g).to(dtype) / Q).to(dtype)


def test_the_suite_covers_every_noise_of_the_package():
    shipped = {
        cls
        for cls in vars(noises_module).values()
        if isinstance(cls, type) and issubclass(cls, Noise) and "name" in cls.__dict__
    }
    assert shipped <= {type(n) for n in NOISE.values()}, "a noise of ssn_exp.noises is missing from all_noises"
    assert {name for name, n in NOISE.items() if isinstance(n, SampledNoise)} == set(SAMPLED_NOISES)


@pytest.mark.parametrize("name", NOISES)
def test_it_is_sampled_or_enumerated_and_describes_itself_in_plain_json(name):
    noise = NOISE[name]
    assert isinstance(noise, SampledNoise) != isinstance(noise, EnumeratedNoise)
    assert isinstance(noise.name, str) and noise.name and isinstance(noise.label, str) and noise.label
    d = noise.describe()
    assert json.loads(json.dumps(d, allow_nan=False)) == d  # written to metrics.json and certify_settings.json
    assert (d["method"], d["sigma"], d["lambda"]) == (noise.name, noise.sigma, noise.lam)
    assert isinstance(noise.lam, float) and math.isfinite(noise.lam) and noise.lam > 0
    assert noise.misfit(Q, DIM) is None


@pytest.mark.parametrize("name", NOISES)
@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), True, "0.5"])
def test_a_bad_sigma_is_refused(name, sigma):
    kw = {"q": Q, "dim": DIM} if name == "dssn" else {}
    with pytest.raises(ValueError, match="sigma"):
        type(NOISE[name])(sigma, **kw)


@pytest.mark.parametrize("shape", [(1, 4, 4), (16,)], ids=["nchw", "flat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NOISES)
def test_sample_keeps_shape_dtype_and_device_and_is_fresh_per_example(name, dtype, shape):
    noise = NOISE[name]
    x = _images(1, shape, dtype=dtype).expand(6, *shape).contiguous()  # the same image six times
    out = noise.sample(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert len({tuple(r.tolist()) for r in out.reshape(6, -1)}) > 1, "every example must get its own noise"
    assert torch.equal(x, _images(1, shape, dtype=dtype).expand(6, *shape))  # the input is left as it was
    assert torch.equal(out, noise.sample(x, torch.Generator().manual_seed(0)))  # the seed alone decides


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NOISES)
def test_copies_have_the_chunk_shape_and_the_asked_dtype(name, dtype):
    noise = NOISE[name]
    x = _images(3, dtype=dtype)
    draw = noise.copies(x, dtype, torch.Generator().manual_seed(0))
    out = draw(1, 3, 2, 7)  # copies 2..6 of examples 1 and 2
    assert out.shape[:2] == (2, 5) and out[0, 0].numel() == DIM and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()
    noisy = noise.noisy(x, 0, 4, torch.Generator().manual_seed(0))
    assert noisy.shape[:2] == (3, 4) and noisy.dtype == dtype


@pytest.mark.parametrize("name", NOISES)
def test_copies_depend_on_the_seed_alone_not_on_the_chunks(name):
    """One generator per example (the driver's): the same seed gives the same copies whether they are drawn at once
    or in chunks (certify.noise_batch), and (sampled noises) another seed other copies."""
    noise = NOISE[name]
    x = _images(1)
    whole = noise.copies(x, torch.float32, torch.Generator().manual_seed(7))(0, 1, 0, 12)
    draw = noise.copies(x, torch.float32, torch.Generator().manual_seed(7))
    chunks = torch.cat([draw(0, 1, 0, 5), draw(0, 1, 5, 6), draw(0, 1, 6, 12)], dim=1)
    assert torch.equal(whole, chunks)
    again = noise.copies(x, torch.float32, torch.Generator().manual_seed(7))(0, 1, 0, 12)
    assert torch.equal(whole, again)
    other = noise.copies(x, torch.float32, torch.Generator().manual_seed(8))(0, 1, 0, 12)
    assert torch.equal(whole, other) == isinstance(noise, EnumeratedNoise)  # enumerated copies are the same copies


@pytest.mark.parametrize("name", NOISES)
def test_an_example_s_copies_do_not_depend_on_the_rest_of_the_batch(name):
    noise = NOISE[name]
    x = _images(3)
    if isinstance(noise, EnumeratedNoise):  # no randomness: the same copies alone and in a batch
        together = noise.copies(x, torch.float32)(0, 3, 0, noise.support)
        alone = noise.copies(x[1:2], torch.float32)(0, 1, 0, noise.support)
        assert torch.equal(together[1:2], alone)
    else:  # the generator alone decides: example 1's copies, drawn alone, come out of its generator
        g = torch.Generator().manual_seed(3)
        alone = noise.copies(x[1:2], torch.float32, g)(0, 1, 0, 9)
        want = noise.noisy(x[1:2], 0, 9, torch.Generator().manual_seed(3))
        assert torch.equal(alone, want)


@pytest.mark.parametrize("value", [float("nan"), 5.0, -0.5, float("inf"), 1.0 + 1e-6])
@pytest.mark.parametrize("name", NOISES)
def test_inputs_outside_the_image_domain_are_refused_naming_the_value(name, value):
    noise = NOISE[name]
    if name == "dssn" and value == 1.0 + 1e-6:
        pytest.skip("on DSSN's grid: 1 within its tolerance")
    x = torch.full((3, 1, 4, 4), 0.25)
    x[2, 0, 1, 0] = value
    # what to do about it, too (DSSN's own message names its grid: test_smoothing.py)
    hint = (
        r"^input out of the image domain \[0, 1\]: example 2, coordinate 4 has value \S+ "
        r"\(noise is added to raw images in \[0, 1\]; normalise inside the model, not in the data\)$"
    )
    for make in (lambda: noise.sample(x), lambda: noise.noisy(x, 0, 4), lambda: noise.copies(x, torch.float32)):
        with pytest.raises(InputDomainError, match=r"example 2, coordinate 4" if name == "dssn" else hint):
            make()
    assert noise.sample(torch.tensor([[0.0, 1.0] * 8])).shape == (1, DIM)  # the closed interval is fine


@pytest.mark.parametrize("name", SAMPLED_NOISES)
def test_a_sampled_noise_s_radius_and_further_radii_follow_the_contract(name):
    noise = NOISE[name]
    noise.check_radius()  # finite, non-decreasing, >= 0 from p = 1/2 on (what a procedure checks first)
    r = np.asarray(noise.radius(RADIUS_GRID.copy()))
    assert r.dtype == np.float64 and r.shape == RADIUS_GRID.shape
    assert np.all(r[RADIUS_GRID < 0.5] <= 0)  # below 1/2 nothing is certified
    assert all(c.startswith("radius_") and c != "radius_" for c in noise.extra_columns)
    x, p = _images(4), np.array([0.3, 0.5, 0.9, 0.999])
    extra = noise.extra_radii(x, p)
    assert set(extra) == set(noise.extra_columns)
    radius = np.asarray(noise.radius(p))
    for j in range(4):  # the further radii it computes pass its own read-back check, a doubled one does not
        values = {c: float(np.asarray(extra[c])[j]) for c in noise.extra_columns}
        noise.check_extra(values, float(radius[j]))
        if values and radius[j] > 0:
            with pytest.raises(ValueError):
                noise.check_extra({c: 2 * v + 1 for c, v in values.items()}, float(radius[j]))


@pytest.mark.parametrize("name", [n for n in NOISES if n not in SAMPLED_NOISES])
def test_an_enumerated_noise_enumerates_its_support_and_certifies_from_counts(name):
    noise = NOISE[name]
    assert isinstance(noise.support, int) and noise.support >= 1 and isinstance(noise.q, int) and noise.q >= 1
    x = _images(2)
    every = noise.noisy(x, 0, noise.support)
    assert every.shape[:2] == (2, noise.support)
    assert torch.equal(every, noise.copies(x, torch.float32)(0, 2, 0, noise.support))
    counts = np.array([[noise.support, 0, 0], [1, noise.support - 1, 0]])
    pred, k = noise.exact_certificate(counts)
    assert pred.tolist() == [0, 1] and np.all(k >= 0) and k[0] >= k[1]


@pytest.mark.parametrize("name", SAMPLED_NOISES)
def test_a_sampled_noise_is_drawn_where_the_input_lives(name):
    """Noise "is made where the input lives" (ssn_exp.noises), checked without a GPU on PyTorch's meta device (shapes
    and dtypes, no values: so on the drawing hook itself, the domain check reads values). At sigma = 0.5 and 0.1 (SSN
    splits differently below lam = 1/2)."""
    x = torch.empty(2, 1, 4, 4, device="meta", dtype=torch.float64)
    for noise in (NOISE[name], type(NOISE[name])(0.1)):
        out = noise._draw(x, None)
        assert out.device == x.device and out.shape == x.shape and out.dtype == x.dtype


def _raises_on_two_lines(p):
    raise ValueError("p must be\n    a float")


@pytest.mark.parametrize(
    "radius,words",
    [
        (lambda p: p - 0.5 - 1e-4, "is negative at some p >= 1/2"),  # at p = 1/2 alone
        (_raises_on_two_lines, "raises ValueError (p must be a float) for an array of probabilities"),  # one line
        (lambda p: np.full(p.shape, "wide"), "raises ValueError (could not convert"),  # text, not numbers
    ],
)
def test_a_radius_function_that_cannot_make_a_certificate_is_refused_in_one_line(radius, words):
    with pytest.raises(RadiusError) as info:
        check_radius_function(radius, "Mine.radius")
    assert str(info.value).startswith("Mine.radius ") and words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "radius",
    [lambda p: np.where(p < 0.5, -1.0, p - 0.5), lambda p: np.floor(8 * p) / 8 - 0.5],
    ids=["flat below one half", "steps"],
)
def test_a_radius_function_with_flat_parts_is_non_decreasing_and_accepted(radius):
    check_radius_function(radius, "Mine.radius")
