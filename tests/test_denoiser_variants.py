"""Denoiser variants are classes built from ``denoiser._target_`` (issue 17 item 5): each YAML builds its class with
every key it has, a variant loads its stages into F o D and writes the run checkpoint atomically (never through a
link), and bad settings are one line. In-process: stage checkpoints are made here, nothing is trained."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from helpers import compose_config as _compose
from ssn_exp.cli.config import ConfigError, build, container
from ssn_exp.exceptions import LinkedRunFileError
from ssn_exp.lightning.denoiser_stages import StageModule
from ssn_exp.lightning.denoisers import Denoiser, DenoiserError, MSEDenoiser, MSERetrain, NoDenoiser, StabilityDenoiser
from ssn_exp.lightning.module import SmoothedTraining, load_checkpoint
from test_trust import HPARAMS

NET = {"_target_": "ssn_exp.models.DnCNN", "in_channels": 1, "depth": 3, "width": 4}
CLASSES = {"none": NoDenoiser, "stability": StabilityDenoiser, "mse": MSEDenoiser, "mse_retrain": MSERetrain}


class Counting(NoDenoiser):
    """A user's variant (not in the package): trains like none, counts its preparations."""

    prepared = 0

    def prepare(self, module, datamodule, **kwargs):
        Counting.prepared += 1
        return module


@pytest.mark.parametrize("option", sorted(CLASSES))
def test_every_denoiser_yaml_builds_its_variant_with_every_key(option):
    cfg = _compose([f"denoiser={option}", "debug=fast"])  # debug=fast sets stage keys for every variant, none too
    variant = build(cfg.denoiser, "denoiser", _recursive_=False)
    assert type(variant) is CLASSES[option] and variant.name == option
    assert variant.trains == (option in ("none", "mse_retrain"))  # the others only certify the F o D they load
    if option == "none":
        assert variant.net is None
    else:
        assert variant.net == container(cfg.denoiser.net) and variant.epochs == 1 and variant.lr == 1e-3
        assert variant.stage_root == Path("outputs/debug/stages")


def test_bad_denoiser_settings_are_one_line_naming_the_key():
    for override, words in [
        ("denoiser.epochs=0", "denoiser.epochs must be an integer >= 1, got 0"),
        ("denoiser.classifier_epochs=1.5", "denoiser.classifier_epochs must be an integer >= 1, got 1.5"),
        ("denoiser.lr=-1", "denoiser.lr must be a positive number, got -1"),
        ("denoiser.name=a/b", "denoiser.name must be a short name"),
        ("denoiser.denoiser_ckpt=5", "denoiser.denoiser_ckpt must be a checkpoint path or null, got 5"),
    ]:
        cfg = _compose(["denoiser=mse", override])
        with pytest.raises(ConfigError) as err:
            build(cfg.denoiser, "denoiser", _recursive_=False)
        assert words in str(err.value) and "mse.yaml" in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_variant_from_outside_the_package_is_built_from_its_target_and_prepares_the_run(tmp_path):
    from ssn_exp.cli.train import build_parts, run_train

    cfg = _compose(["denoiser._target_=test_denoiser_variants.Counting", "debug=fast", "logger=none",
                    "certify.enabled=false", "trainer.limit_train_batches=1", "trainer.limit_val_batches=0"],
                   tmp_path / "run")  # fmt: skip
    _, _, variant, hparams = build_parts(cfg)
    assert isinstance(variant, Counting) and hparams["denoiser"]["_target_"] == "test_denoiser_variants.Counting"
    Counting.prepared = 0
    assert run_train(cfg) is None and Counting.prepared == 1
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    cfg = _compose(["denoiser._target_=builtins.dict"], tmp_path / "other")
    with pytest.raises(ConfigError, match=r"none\.yaml builds dict, not a denoiser variant"):
        build_parts(cfg)


# ----------------------------------------------------------------------------- stages into F o D, the run checkpoint


def _stage(path: Path, kind: str, sigma: float = 0.5, seed: int = 1) -> Path:
    hp = {"kind": kind, "model": HPARAMS["model"], "data": HPARAMS["data"], "seed": seed}
    if kind == "clean":
        hp["optimizer"] = HPARAMS["optimizer"]
    else:
        hp.update(method={**HPARAMS["method"], "sigma": sigma}, denoiser_net=NET, denoiser_lr=1e-3)
    torch.manual_seed(seed)
    module = StageModule(**hp)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def _run_module(variant_name: str):
    den = {"_target_": f"ssn_exp.lightning.denoisers.{CLASSES[variant_name].__name__}", "name": variant_name,
           "net": NET}  # fmt: skip
    torch.manual_seed(0)
    return SmoothedTraining(**{**copy.deepcopy(HPARAMS), "denoiser": den})


class _Data:
    name = "digits"


def test_a_staged_variant_loads_f_and_d_and_writes_the_run_checkpoint_atomically(tmp_path):
    clean, den = _stage(tmp_path / "clean.ckpt", "clean"), _stage(tmp_path / "den.ckpt", "denoiser_mse")
    variant = MSEDenoiser("mse", NET, classifier_ckpt=str(clean), denoiser_ckpt=str(den))
    module = variant.prepare(_run_module("mse"), _Data(), ckpt_dir=tmp_path / "run" / "checkpoints",
                             resume_from=None, make_trainer=None, trust=None)  # fmt: skip
    want_f = torch.load(clean, weights_only=True)["state_dict"]
    want_d = torch.load(den, weights_only=True)["state_dict"]
    for name, value in module.model.classifier.state_dict().items():
        assert torch.equal(value, want_f[f"classifier.{name}"])
    for name, value in module.model.denoiser.state_dict().items():
        assert torch.equal(value, want_d[f"denoiser.{name}"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    again = load_checkpoint(last)  # the run checkpoint is what resume and python -m ssn_exp.certify read
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in again.state_dict().items())
    assert again.identity()["denoiser"] == "mse"
    # resumed: the run checkpoint is loaded, no stage is read (these paths are gone)
    clean.unlink(), den.unlink()
    resumed = variant.prepare(_run_module("mse"), _Data(), ckpt_dir=last.parent, resume_from=str(last),
                              make_trainer=None, trust=None)  # fmt: skip
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_the_run_checkpoint_is_never_written_through_a_link(tmp_path):
    clean, den = _stage(tmp_path / "clean.ckpt", "clean"), _stage(tmp_path / "den.ckpt", "denoiser_mse")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    os.symlink(victim, ckpt_dir / "last.ckpt")
    variant = MSEDenoiser("mse", NET, classifier_ckpt=str(clean), denoiser_ckpt=str(den))
    with pytest.raises(LinkedRunFileError, match="last.ckpt is a symbolic link"):
        variant.prepare(_run_module("mse"), _Data(), ckpt_dir=ckpt_dir, resume_from=None, make_trainer=None, trust=None)
    assert victim.read_text() == "keep" and sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]


def test_stages_that_do_not_fit_the_run_are_refused_in_one_line(tmp_path):
    clean = _stage(tmp_path / "clean.ckpt", "clean")
    other_sigma = _stage(tmp_path / "den.ckpt", "denoiser_mse", sigma=1.0)
    kw = dict(ckpt_dir=tmp_path / "run", resume_from=None, make_trainer=None, trust=None)
    variant = MSEDenoiser("mse", NET, classifier_ckpt=str(clean), denoiser_ckpt=str(other_sigma))
    with pytest.raises(DenoiserError, match=r"den\.ckpt is not a denoiser for dssn sigma=0\.5"):
        variant.prepare(_run_module("mse"), _Data(), **kw)
    den = _stage(tmp_path / "den5.ckpt", "denoiser_mse")
    variant = MSEDenoiser("mse", NET, classifier_ckpt=str(den), denoiser_ckpt=str(den))
    with pytest.raises(DenoiserError, match=r"den5\.ckpt is not a clean-classifier stage checkpoint"):
        variant.prepare(_run_module("mse"), _Data(), **kw)
    assert not (tmp_path / "run").exists()  # nothing written for a refused run


def test_mse_retrain_loads_only_d_and_leaves_the_training_to_the_run(tmp_path):
    den = _stage(tmp_path / "den.ckpt", "denoiser_mse")
    fresh = _run_module("mse_retrain")
    f_before = copy.deepcopy(fresh.model.classifier.state_dict())
    variant = MSERetrain("mse_retrain", NET, denoiser_ckpt=str(den))
    module = variant.prepare(fresh, _Data(), ckpt_dir=tmp_path / "run", resume_from=None, make_trainer=None, trust=None)
    assert all(torch.equal(v, f_before[k]) for k, v in module.model.classifier.state_dict().items())  # F stays fresh
    want_d = torch.load(den, weights_only=True)["state_dict"]
    assert all(torch.equal(v, want_d[f"denoiser.{k}"]) for k, v in module.model.denoiser.state_dict().items())
    assert not (tmp_path / "run").exists()  # the run's own training writes its checkpoints


def test_the_base_class_is_a_variant_without_a_denoiser():
    assert (
        Denoiser().prepare("module", None, ckpt_dir=None, resume_from=None, make_trainer=None, trust=None) == "module"
    )
    with pytest.raises(DenoiserError, match="denoiser.net must be a _target_ config"):
        MSEDenoiser("mse", {"depth": 3})
