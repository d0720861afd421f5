"""Names that moved keep working for a release, with a DeprecationWarning that names the new place (issue 17)."""

from __future__ import annotations

import importlib
import warnings

import pytest


@pytest.mark.parametrize(
    "old, new",
    [
        ("DSSN", "DSSN"),
        ("SSN", "SSN"),
        ("Uniform", "Uniform"),
        ("Smoothing", "Noise"),
        ("check_unit_box", "check_unit_box"),
        ("OffGridError", "OffGridError"),
    ],
)
def test_the_old_module_ssn_exp_smoothing_still_imports_with_a_warning_naming_the_new_one(old, new):
    import ssn_exp.noises as noises

    smoothing = importlib.import_module("ssn_exp.smoothing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(smoothing, old)
    assert value is getattr(noises, new)
    [w] = caught
    assert w.category is DeprecationWarning and f"ssn_exp.noises.{new}" in str(w.message)
    assert w.filename == __file__  # the warning points at the caller's line


def test_from_import_of_the_old_names_works_as_the_readme_showed():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from ssn_exp.smoothing import DSSN, SSN, Uniform  # noqa: F401 - the old spelling
    assert len(caught) == 3 and all(issubclass(w.category, DeprecationWarning) for w in caught)
    from ssn_exp import noises

    assert (DSSN, SSN, Uniform) == (noises.DSSN, noises.SSN, noises.Uniform)


def test_an_unknown_name_of_the_old_module_is_an_attribute_error():
    smoothing = importlib.import_module("ssn_exp.smoothing")
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        smoothing.Nope  # noqa: B018
    assert "DSSN" in dir(smoothing) and "Smoothing" in dir(smoothing)


def test_an_old_checkpoint_target_resolves_to_the_same_trusted_class(monkeypatch):
    """Checkpoints written before the move store ``ssn_exp.smoothing.DSSN``: the trust check accepts it, as the very
    class ``ssn_exp.noises.DSSN`` names, also where nothing imported the old module yet (a fresh process)."""
    import sys

    from ssn_exp.trust import Trust

    monkeypatch.delitem(sys.modules, "ssn_exp.smoothing", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        Trust().check({"_target_": "ssn_exp.smoothing.DSSN", "sigma": 0.5}, "x")


def test_the_certificate_fields_of_the_readme_still_read():
    import torch

    from ssn_exp.certify import certify_batch
    from ssn_exp.noises import DSSN, Uniform

    class Zeros(torch.nn.Module):
        def forward(self, z):
            return torch.zeros(z.shape[0], 3)

    x = torch.full((2, 1, 2, 2), 0.5)
    cert = certify_batch(Zeros(), x, Uniform(0.5), 3, n0=4, n=16)
    assert cert.p_lower.shape == cert.radius.shape == cert.radius_box.shape == (2,) and cert.k is None
    cert = certify_batch(Zeros(), x, DSSN(0.5, q=2, dim=4), 3)
    assert cert.k.tolist() == [1, 1] and cert.q == 2 and cert.p_lower is None and cert.radius_box is None


def test_a_checkpoint_written_before_the_move_loads_with_its_noise(tmp_path):
    import copy

    from ssn_exp.lightning.module import load_checkpoint
    from ssn_exp.noises import DSSN
    from test_trust import HPARAMS, save_checkpoint

    hp = copy.deepcopy(HPARAMS)
    hp["method"]["_target_"] = "ssn_exp.smoothing.DSSN"  # what checkpoints stored before ssn_exp.noises
    module = load_checkpoint(save_checkpoint(tmp_path / "old.ckpt", hp))
    assert type(module.smoothing) is DSSN and module.smoothing.levels == 27
