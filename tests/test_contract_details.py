"""Details of the noise and procedure contracts and the console table that the contract suites leave open (found by
mutation testing, `make mutation`): defaults, boundaries, dtypes and the exact texts a user reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssn_exp.certify.core import clopper_pearson_lower
from ssn_exp.certify.procedures import Exact, FixedSample, NoiseDefault, ProcedureError, check_radii
from ssn_exp.exceptions import OptionError
from ssn_exp.lightning.results import format_table
from ssn_exp.noises import DSSN, SSN, Laplace, Noise, Uniform, levine2021_table


def test_a_noise_is_labelled_by_its_name_unless_it_says_otherwise():
    class Plain(Uniform):
        name = "plain"

    class Labelled(Uniform):
        name = "labelled"
        label = "Labelled noise"

    class Unnamed(Plain):
        pass

    assert Plain.label == "plain" and Labelled.label == "Labelled noise" and Unnamed.label == "plain"
    assert issubclass(Plain, Noise)


def test_the_noise_default_is_the_fixed_protocol_with_the_paper_s_settings_or_the_given_ones():
    own = NoiseDefault().for_noise(Uniform(0.5)).describe()
    assert {k: own[k] for k in ("n0", "n", "alpha")} == {"n0": 64, "n": 100_000, "alpha": 0.001}
    given = NoiseDefault(n0=7, n=99, alpha=0.01).for_noise(SSN(0.5)).describe()
    assert {k: given[k] for k in ("n0", "n", "alpha")} == {"n0": 7, "n": 99, "alpha": 0.01}
    assert NoiseDefault(n0=7, n=99, alpha=0.01).for_noise(DSSN(0.5, q=16, dim=4)).name == "exact"


def _fixed_row(fixed: FixedSample, noise, votes: list[int], prediction: int):
    counts = np.array(votes)
    p = float(clopper_pearson_lower(int(counts[prediction]), fixed.n, fixed.alpha))
    radius = float(noise.radius(np.array([p]))[0])
    return {"p_lower": repr(p), "radius_box": repr(radius)}, counts, prediction, radius, p


def test_a_fixed_row_is_recomputed_exactly_from_its_counts():
    fixed, noise = FixedSample(n0=4, n=100, alpha=0.01), Uniform(0.5)
    values, counts, pred, radius, p = _fixed_row(fixed, noise, [90, 10], 0)
    fixed.check_row(values, counts, pred, radius, noise)
    for bad in (p + 2e-12, p - 2e-12):  # the bound is recomputed, not compared loosely
        with pytest.raises(ValueError):
            r = float(noise.radius(np.array([bad]))[0])
            fixed.check_row({"p_lower": repr(bad), "radius_box": repr(r)}, counts, pred, r, noise)
    with pytest.raises(ValueError):  # the radius follows from p_lower (relative tolerance 1e-9)
        fixed.check_row(values, counts, pred, radius * (1 + 1e-7), noise)
    top = _fixed_row(fixed, noise, [100, 0], 0)  # all votes: p_lower < 1 still
    fixed.check_row(*top[:4], noise)
    assert top[4] < 1.0
    with pytest.raises(ValueError):
        r = float(noise.radius(np.array([1.0]))[0])
        fixed.check_row({"p_lower": "1.0", "radius_box": repr(r)}, top[1], 0, r, noise)


def test_extra_radii_a_noise_does_not_give_are_named():
    class Odd(Uniform):
        name = "odd"
        extra_columns = ("radius_a", "radius_b", "radius_c")

        def extra_radii(self, x, p_lower):
            return {"radius_a": p_lower}

    x = torch.full((1, 1, 2, 2), 0.5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"^Odd\.extra_radii gives no radius_b, radius_c$"):
        FixedSample(n0=4, n=8).certify(model, x, Odd(0.5), 3, generator=[torch.Generator().manual_seed(0)])


def test_radii_are_float64_whatever_the_noise_computes_in():
    p = np.array([0.9, 0.99], dtype=np.float32)
    r = Laplace(0.5).radius(p)
    assert r.dtype == np.float64
    np.testing.assert_array_equal(r, Laplace(0.5).radius(p.astype(np.float64)))

    class Single(Uniform):  # a noise of a user's that computes its radius in float32
        name = "single"

        def radius(self, p_lower):
            return super().radius(p_lower).astype(np.float32)

    x = torch.full((2, 1, 2, 2), 0.5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    cert = FixedSample(n0=4, n=8).certify(model, x, Single(0.5), 3, generator=torch.Generator().manual_seed(0))
    assert cert.radius.dtype == np.float64  # a certificate's radius is float64 (Certificates.radius)


@pytest.mark.parametrize("lam", [0.5, 0.75])
def test_ssn_at_and_above_lambda_one_half_splits_into_two_levels(lam):
    """At lambda >= 1/2 the split is (1[x > s] + min(s, 1)) / 2 (the authors' form): values in {s/2, (1 + s)/2}."""
    noise = SSN(1.0)
    noise.lam = lam  # (exactly; from sigma it would be a rounded sigma * sqrt(3))
    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 * lam
    out = noise.split(x, s)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ((x > s).double() + s.clamp(max=1.0)) * 0.5, rtol=0, atol=0)


def test_dssn_copies_take_any_range_inside_the_offsets():
    noise = DSSN(0.5, q=16, dim=4)
    x = torch.full((1, 1, 2, 2), 8 / 16)
    draw = noise.copies(x, torch.float32)
    assert draw(0, 1, 3, 3).shape[:2] == (1, 0)  # an empty range is a range
    assert draw(0, 1, 0, noise.levels).shape[1] == noise.levels
    for start, stop in ((-1, 2), (2, 1), (0, noise.levels + 1)):
        with pytest.raises(ValueError, match=rf"offset range \[{start}, {stop}\) outside \[0, {noise.levels}\)"):
            draw(0, 1, start, stop)


def test_dssn_quantizes_like_the_authors_table_at_lambda_one_half():
    """At lambda = 1/2 exactly the authors' table takes its lambda >= 1/2 branch (1[x > s] + min(s, 1)) / 2."""
    q, levels = 16, 16
    table = levine2021_table(q, levels, 0.5)
    x = np.arange(q + 1, dtype=np.float32)[:, None] / np.float32(q)
    s = (np.arange(levels)[None, :] + 0.5) / np.float32(q)
    np.testing.assert_array_equal(table, (((x > s).astype(np.float32) + np.minimum(s, 1)) / 2).astype(np.float32))
    assert table.dtype == np.float32 and table.shape == (q + 1, levels)


METRICS = {
    "method": "ssn",
    "sigma": 0.5,
    "dataset": "digits",
    "training": "standard",
    "clean_accuracy": 0.95,
    "acr": 0.51234,
    "n_examples": 360,
    "seconds_per_example": 0.1894,
    "certified_accuracy": {"0": 0.9, "0.25": 0.8, "0.5": 0.0, "0.75": 0.0},
}


def test_the_console_table_stops_at_the_first_all_zero_radius():
    assert format_table(METRICS).splitlines() == [
        "ssn sigma=0.5 on digits (standard training): clean 95.0%, ACR 0.512, n=360, 189.4 ms/example",
        "| radius | 0 | 0.25 | 0.5 |",
        "|---|---|---|---|",
        "| certified accuracy (%) | 90.0 | 80.0 | 0.0 |",
    ]
    nonzero = {**METRICS, "certified_accuracy": {"0": 0.9, "0.25": 0.8}}
    assert format_table(nonzero).splitlines()[1] == "| radius | 0 | 0.25 |"


def test_the_console_table_adds_further_radii_and_the_abstentions():
    metrics = {
        **METRICS,
        "certified_accuracy_box": {"0": 0.9, "0.25": 0.7, "0.5": 0.1, "0.75": 0.0},
        "acr_box": 0.4,
        "certified_accuracy_tight": {"0": 0.9, "0.25": 0.75, "0.5": 0.2, "0.75": 0.0},
        "acr_tight": 0.45,
        "abstain_rate": 0.05,
    }
    assert format_table(metrics).splitlines() == [
        "ssn sigma=0.5 on digits (standard training): clean 95.0%, ACR 0.512 (box 0.400) (tight 0.450), n=360, "
        "189.4 ms/example",
        "| radius | 0 | 0.25 | 0.5 | 0.75 |",
        "|---|---|---|---|---|",
        "| certified accuracy (%) | 90.0 | 80.0 | 0.0 | 0.0 |",
        "| box (%) | 90.0 | 70.0 | 10.0 | 0.0 |",
        "| tight (%) | 90.0 | 75.0 | 20.0 | 0.0 |",
        "clean = the majority vote of the noisy copies; the smoothed classifier abstains on 5.0% of the examples "
        "(p_lower < 1/2), which no radius counts as certified",
    ]
    assert "abstains" not in format_table({**metrics, "abstain_rate": 0.0})
    assert "abstains on 100.0%" in format_table({**metrics, "abstain_rate": 1.0})


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))


def test_fixed_with_a_generator_per_example():
    from ssn_exp.certify.core import NonFiniteLogitsError

    fixed, x = FixedSample(n0=4, n=8), torch.full((2, 1, 2, 2), 0.5)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match=r"^3 generators for 2 examples$"):
        fixed.certify(_linear(), x, Uniform(0.5), 3, generator=gens)
    seen = []
    cert = fixed.certify(_linear(), x, Uniform(0.5), 3, generator=gens[:2], progress=seen.append)
    assert len(cert.prediction) == 2 and sum(seen) == 2 * (4 + 8)  # every forward pass reported
    empty = fixed.certify(_linear(), x[:0], Uniform(0.5), 3, generator=[])
    assert len(empty.prediction) == 0 and empty.method == "uniform"

    class NaNAfterFirst(torch.nn.Module):
        def forward(self, z):
            out = torch.zeros(z.shape[0], 3)
            return out + (float("nan") if z.flatten(1)[:, 0].mean() > 0.45 else 0.0)

    with pytest.raises(NonFiniteLogitsError, match="NaN") as info:
        fixed.certify(NaNAfterFirst(), torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone(),
                      Uniform(0.01), 3, generator=gens[:2])  # fmt: skip
    assert info.value.positions == [1]


def test_the_default_stream_hands_each_batch_s_settings_to_certify_and_numbers_the_stream():
    from ssn_exp.certify.core import NonFiniteLogitsError

    seen = []

    class Recording(FixedSample):
        name = "recording"

        def certify(self, model, x, noise, num_classes, **kw):
            seen.append({k: kw[k] for k in ("noise_batch", "labels", "progress")})
            if x.shape[0] == 1 and x.mean() > 0.9:
                raise NonFiniteLogitsError("the model gives NaN", positions=[0])
            return super().certify(model, x, noise, num_classes, **kw)

    def gens(k):
        return [torch.Generator().manual_seed(i) for i in range(k)]

    x = torch.full((3, 1, 2, 2), 0.5)
    batches = [(x[:2], gens(2), [0, 1]), (x[2:], gens(1), [2])]
    progress = []
    out = list(Recording(n0=2, n=4).certify_batches(_linear(), iter(batches), Uniform(0.5), 3, noise_batch=7,
                                                     progress=progress.append))  # fmt: skip
    assert [positions for positions, _ in out] == [[0, 1], [2]] and sum(progress) == 3 * (2 + 4)
    assert [(s["noise_batch"], s["labels"]) for s in seen] == [(7, [0, 1]), (7, [2])]
    bad = [(x[:2], gens(2), None), (torch.ones(1, 1, 2, 2), gens(1), None)]
    with pytest.raises(NonFiniteLogitsError, match="^the model gives NaN$") as info:
        list(Recording(n0=2, n=4).certify_batches(_linear(), iter(bad), Uniform(0.5), 3))
    assert info.value.positions == [2]  # its position in the stream


def test_clopper_pearson_matches_scipy_from_one_vote_and_checks_half_alpha():
    from scipy.stats import beta

    from ssn_exp.certify.core import MIN_LEVEL

    n_a = np.arange(0, 11)
    want = np.where(n_a == 0, 0.0, beta.ppf(0.025, np.maximum(n_a, 1), 10 - np.maximum(n_a, 1) + 1))
    np.testing.assert_allclose(clopper_pearson_lower(n_a, 10, 0.05), want, rtol=1e-12, atol=0)
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    with pytest.raises(ValueError, match="alpha"):  # alpha itself normal, alpha / 2 not: refused
        clopper_pearson_lower(5, 10, MIN_LEVEL * 1.5)
    assert 0 < clopper_pearson_lower(5, 10, 0.9) < 0.5  # (a large alpha is fine: alpha / 2 is what is spent)


def test_the_library_default_procedure_is_the_paper_s():
    from ssn_exp.certify.procedures import default_procedure

    d = default_procedure(SSN(0.5)).describe()
    assert {k: d[k] for k in ("n0", "n", "alpha")} == {"n0": 64, "n": 100_000, "alpha": 0.001}
    assert FixedSample().describe() == {"n0": 64, "n": 100_000, "alpha": 0.001}  # and procedure=fixed's own
    assert default_procedure(DSSN(0.5, q=16, dim=4)).name == "exact"


@pytest.mark.parametrize("select", ["top", "label"])
def test_sequential_certificates_carry_every_field(select):
    from ssn_exp.certify.procedures_sequential import Sequential

    proc = Sequential(n0=8, n=256, alpha=0.01, radii=[0.25], first_batch=16, max_batch=64, select=select)
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    cert = proc.certify(_linear(), x, Uniform(0.5), 3, generator=gens, labels=[0, 1, 2])
    samples = cert.values["samples"]
    assert cert.method == "uniform" and cert.forward_passes == int(samples.max())
    assert cert.prediction.dtype == np.int64 and cert.radius.dtype == np.float64
    assert cert.values["p_lower"].dtype == np.float64 and set(cert.values) >= {"p_lower", "samples", "radius_box"}
    np.testing.assert_array_equal(cert.counts.sum(axis=1), samples - (8 if select == "top" else 0))
    if select == "top":
        np.testing.assert_array_equal(cert.counts_n0.sum(axis=1), [8, 8, 8])
    else:
        assert cert.counts_n0 is None
        certified = cert.radius >= 0
        np.testing.assert_array_equal(cert.prediction[certified], np.array([0, 1, 2])[certified])
        assert not certified.all()  # where the label is not certified: the majority of the test's votes
        np.testing.assert_array_equal(cert.prediction[~certified], cert.counts[~certified].argmax(axis=1))
    empty = proc.certify(_linear(), x[:0], Uniform(0.5), 3, generator=[], labels=[])
    assert empty.forward_passes == 0 and len(empty.prediction) == 0


def test_fixed_sample_counts_are_bounded_and_its_level_is_its_own_error():
    from ssn_exp.certify.core import MIN_LEVEL
    from ssn_exp.certify.procedures import MAX_SAMPLES, ProcedureError

    for key in ("n0", "n"):
        with pytest.raises(ProcedureError, match=rf"^procedure\.{key} must be an integer in \[1, {MAX_SAMPLES}\]"):
            FixedSample(**{key: MAX_SAMPLES + 1})
    with pytest.raises(ProcedureError, match="procedure.alpha") as info:
        FixedSample(alpha=MIN_LEVEL * 1.5)  # alpha / 2, what the two-sided bound spends, would be subnormal
    assert type(info.value) is ProcedureError
    assert FixedSample(n0=MAX_SAMPLES, n=MAX_SAMPLES, alpha=0.9).n == MAX_SAMPLES


def test_the_sequential_stream_checks_labels_and_names_nan_examples():
    from ssn_exp.certify.core import NonFiniteLogitsError
    from ssn_exp.certify.procedures_sequential import Sequential

    proc = Sequential(n0=8, n=256, alpha=0.01, radii=[0.25], first_batch=16, max_batch=64, select="label")
    x = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"^labels must be integers in \[0, 3\), got {bad!r} for example 1$"):
            proc.certify(_linear(), x, Uniform(0.5), 3, generator=gens, labels=[0, bad])
    proc.certify(_linear(), x, Uniform(0.5), 3, generator=gens, labels=[0, 2])  # the largest label is fine
    with pytest.raises(ValueError, match=r"^3 labels for 2 examples$"):
        proc.certify(_linear(), x, Uniform(0.5), 3, generator=gens, labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"^procedure\.select=label tests each example's label, and no labels were"):
        proc.certify(_linear(), x, Uniform(0.5), 3, generator=gens)

    class NaN(torch.nn.Module):
        def forward(self, z):
            return torch.full((z.shape[0], 3), float("nan"))

    with pytest.raises(NonFiniteLogitsError) as info:
        proc.certify(NaN(), x, Uniform(0.5), 3, generator=gens, labels=[0, 1])
    assert str(info.value).startswith("the model returned NaN or infinite logits for example 0: no certificate")


@pytest.mark.parametrize("lam", [0.3, 0.5, 0.9])
def test_each_sampled_noise_is_its_documented_function_of_the_uniform_stream(lam):
    """The same seed gives the same noise in every version (what makes certificates reproducible): uniform
    x + (2 r - 1) lam, SSN the split at s = 2 lam r, Laplace lam (E1 - E2) from adjacent pairs of uniforms."""
    x = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(5))

    def stream(shape):
        return torch.rand(shape, generator=torch.Generator().manual_seed(9))

    def draw(noise):
        return noise._draw(x, torch.Generator().manual_seed(9))

    for cls in (Uniform, SSN, Laplace):
        noise = cls(1.0)
        noise.lam = lam
        if cls is Uniform:
            want = x + (2 * stream(x.shape) - 1) * lam
        elif cls is SSN:
            want = noise.split(x, stream(x.shape) * 2 * lam)
        else:
            e = -torch.log1p(-stream((*x.shape, 2)))
            want = (e[..., 0] - e[..., 1]) * lam + x
        torch.testing.assert_close(draw(noise), want, rtol=0, atol=0)  # bit for bit


def test_sequential_with_one_generator_for_the_whole_batch():
    from ssn_exp.certify.procedures_sequential import Sequential

    proc = Sequential(n0=8, n=256, alpha=0.01, radii=[0.25], first_batch=16, max_batch=64)
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(3))

    def run(generator):
        return proc.certify(_linear(), x, Uniform(0.5), 3, generator=generator)

    a, b = run(torch.Generator().manual_seed(1)), run(torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.counts.sum(axis=1), a.values["samples"] - 8)
    assert a.counts_n0.sum() == 3 * 8 and len(run(None).prediction) == 3
    with pytest.raises(ValueError, match=r"^2 generators for 3 examples$"):
        run([torch.Generator(), torch.Generator()])


def test_radii_are_a_list_of_non_negative_finite_numbers_and_never_booleans():
    assert check_radii((0.5, 1), "certify.radii") == [0.5, 1.0]
    with pytest.raises(OptionError) as info:
        check_radii("0.5", "certify.radii")
    assert str(info.value) == "certify.radii must be a list, e.g. certify.radii=[0.5]; got '0.5'"
    for bad in ([True], [0.5, False], [-0.5], [float("nan")], ["0.5"]):
        with pytest.raises(ProcedureError) as info:
            check_radii(bad, "certify.radii")
        assert str(info.value) == f"certify.radii must be a list of non-negative finite numbers, got {bad!r}"
    with pytest.raises(ProcedureError):
        check_radii([], "certify.radii", allow_empty=False)


def test_a_procedure_given_a_noise_it_cannot_certify_says_which_to_choose():
    choose = (
        "choose another procedure (procedure=exact for an enumerated noise such as dssn, procedure=fixed for a "
        "sampled one)"
    )
    with pytest.raises(ProcedureError) as info:
        Exact().check(Uniform(0.5))
    assert str(info.value) == (
        f"procedure=exact cannot certify uniform noise: it enumerates every noisy copy, and this noise is sampled; {choose}"
    )
    with pytest.raises(ProcedureError) as info:
        FixedSample().check(DSSN(0.5, q=16, dim=4))
    assert str(info.value).startswith("procedure=fixed cannot certify dssn noise: it samples the noise")
    assert str(info.value).endswith(choose)
