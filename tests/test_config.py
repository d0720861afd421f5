"""Every config group option composes and resolves; the configs build real components."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssn_exp.cli import CONF_DIR

GROUPS = ["data", "model", "method", "training", "denoiser", "trainer", "logger", "certify", "experiment", "debug"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _compose(overrides, name="config"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = _compose([f"{group}={option}"])
    OmegaConf.resolve(cfg)  # no dangling interpolation
    if group in ("data", "model", "method", "training", "denoiser", "logger"):
        assert cfg[group].name == option
    assert cfg.sigma > 0 and cfg.seed == 0


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), g


def test_defaults_are_the_quick_digits_dssn_run():
    cfg = _compose([])
    assert (cfg.data.name, cfg.model.name, cfg.method.name, cfg.training.name) == (
        "digits",
        "digits_cnn",
        "dssn",
        "standard",
    )
    assert cfg.trainer.accelerator == "cpu" and cfg.logger.name == "csv"
    assert cfg.method.seed == 0 and cfg.certify.n == 10000


def test_method_seed_follows_the_run_seed():
    assert _compose(["seed=2"]).method.seed == 2
    assert _compose(["seed=2", "method.seed=0"]).method.seed == 0


def test_paper_experiments_set_table2():
    c = _compose(["experiment=paper_cifar10"])
    assert (c.data.name, c.model.name, c.training.epochs, c.data.batch_size, c.certify.n) == (
        "cifar10",
        "wrn40_2",
        120,
        64,
        100000,
    )
    assert (c.optim.lr, c.optim.momentum, c.optim.nesterov, c.optim.weight_decay) == (0.1, 0.9, True, 1e-4)
    i = _compose(["experiment=paper_imagenet"])
    assert (i.data.name, i.model.name, i.training.epochs, i.data.test_every) == ("imagenet", "resnet50", 30, 100)


def test_run_dir_names_the_run():
    c = _compose(["method=ssn", "sigma=1.25", "seed=1", "training=stability"])
    assert c.hydra.run.dir.endswith("digits/ssn-stability-none/sigma1.25-seed1")


def test_certify_config_needs_a_checkpoint():
    c = _compose(["ckpt=/x/y/checkpoints/last.ckpt"], name="certify_ckpt")
    assert c.ckpt.endswith("last.ckpt") and "certify" in c.hydra.run.dir


def test_configs_build_the_components(tmp_path):
    from ssn_exp.cli import _datamodule
    from ssn_exp.models import build_model

    cfg = _compose([])
    dm = _datamodule(cfg.data)
    assert (dm.name, dm.q, dm.num_classes, dm.shape) == ("digits", 16, 10, (1, 8, 8))
    for name in options("model"):
        m = _compose([f"model={name}"]).model
        opts = OmegaConf.to_container(m.options)
        net = build_model(m.name, num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.2] * 3, **opts)
        assert sum(p.numel() for p in net.parameters()) > 1000
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.2] * 3)
