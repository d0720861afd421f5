"""Every config group option composes, resolves and builds its component from ``_target_``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import compose_config as _compose
from ssn_exp.cli.config import CONF_DIR

GROUPS = ["data", "model", "method", "training", "denoiser", "trainer", "logger", "callbacks", "certify", "experiment",
          "debug"]  # fmt: skip


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = _compose([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation (hydra's own node included)
    if group in ("training", "denoiser"):
        assert cfg[group].name == option
    if group in ("data", "model", "method", "trainer"):
        assert "_target_" in cfg[group], f"{group}/{option}.yaml must name what it builds"
    if group in ("logger", "callbacks"):  # named entries, so that options combine: logger=[csv,wandb]
        assert all("_target_" in entry for entry in cfg[group].values()), f"{group}/{option}.yaml"
    assert cfg.sigma > 0 and cfg.seed == 0


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), g


def test_the_package_ships_its_configs_and_the_checkout_links_them():
    assert Path(CONF_DIR).is_dir() and (Path(CONF_DIR) / "config.yaml").is_file()
    assert Path(CONF_DIR).resolve() == (Path(__file__).resolve().parents[1] / "src" / "ssn_exp" / "conf")
    top = Path(__file__).resolve().parents[1]
    assert (top / "conf").resolve() == Path(CONF_DIR).resolve()  # conf/ and sweeps/ at the top are links
    assert (top / "sweeps").resolve() == (Path(CONF_DIR) / "sweep").resolve()


def test_defaults_are_the_quick_digits_dssn_run():
    cfg = _compose([])
    ch = cfg.hydra.runtime.choices
    assert (ch.data, ch.model, ch.method, ch.training, ch.trainer, ch.logger) == (
        "digits",
        "digits_cnn",
        "dssn",
        "standard",
        "default",
        "csv",
    )
    assert cfg.method.seed == 0 and cfg.procedure.n == 10000 and cfg.method.arithmetic == "exact"


def test_method_seed_follows_the_run_seed():
    assert _compose(["seed=2"]).method.seed == 2
    assert _compose(["seed=2", "method.seed=0"]).method.seed == 0


def test_paper_experiments_set_table2():
    c = _compose(["experiment=paper_cifar10"])
    assert (c.data.name, c.model._target_, c.training.epochs, c.data.batch_size, c.procedure.n) == (
        "cifar10",
        "ssn_exp.models.WideResNet",
        120,
        64,
        100000,
    )
    assert (c.model.depth, c.model.widen, c.trainer.max_epochs) == (40, 2, 120)
    o = c.optimizer
    assert (o._target_, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("torch.optim.SGD", 0.1, 0.9, True, 1e-4)
    assert c.scheduler._target_.endswith("CosineAnnealingLR") and c.scheduler.T_max == 120
    i = _compose(["experiment=paper_imagenet"])
    assert (i.data.name, i.model._target_, i.training.epochs, i.data.test_every) == (
        "imagenet",
        "torchvision.models.resnet50",
        30,
        100,
    )


def test_run_dir_names_the_run_and_joins_the_tag():
    c = _compose(["method=ssn", "sigma=1.25", "seed=1", "training=stability"])
    assert c.hydra.run.dir.endswith("digits/ssn-stability-none/sigma1.25-seed1")
    assert _compose(["tag=NAME"]).hydra.run.dir.endswith("sigma0.5-seed0-NAME")


def test_certify_config_needs_a_checkpoint():
    c = _compose(["ckpt=/x/y/checkpoints/last.ckpt"], name="certify_ckpt")
    assert c.ckpt.endswith("last.ckpt") and "certify" in c.hydra.run.dir and c.ckpt_format == "auto"


def test_certify_directories_of_two_checkpoints_never_coincide():
    def run_dir(*overrides):
        return _compose(list(overrides), name="certify_ckpt").hydra.run.dir

    a = run_dir("ckpt=outputs/runs/digits/dssn-standard-none/sigma0.5-seed0/checkpoints/last.ckpt")
    b = run_dir("ckpt=outputs/runs/cifar10/dssn-standard-none/sigma0.5-seed0/checkpoints/last.ckpt")
    c = run_dir("ckpt=outputs/debug/digits/dssn-standard-none/sigma0.5-seed0/checkpoints/last.ckpt")
    assert len({a, b, c}) == 3 and "dssn-standard-none-sigma0.5-seed0-last" in a
    assert a == run_dir("ckpt=outputs/runs/digits/dssn-standard-none/sigma0.5-seed0/checkpoints/last.ckpt")
    assert run_dir("ckpt=x/last.ckpt", "tag=n100k").endswith("-n100k")


@pytest.mark.parametrize("data", options("data"))
def test_data_configs_build_data_modules_with_their_facts(data):
    from ssn_exp.lightning.data import ImageData

    cfg = _compose([f"data={data}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageData)
    assert (dm.name, dm.q, dm.num_classes, list(dm.shape)) == (
        data,
        cfg.data.q,
        cfg.data.num_classes,
        list(cfg.data.shape),
    )
    assert len(dm.mean) == len(dm.std) == dm.shape[0]


def test_a_data_config_cannot_misstate_the_facts_of_a_built_in_data_set():
    cfg = _compose(["data.q=255"])
    with pytest.raises(Exception, match=r"data.q=255 does not match DigitsData \(q is 16\)"):
        instantiate(cfg.data)


@pytest.mark.parametrize("model,data", [("digits_cnn", "digits"), ("wrn40_2", "cifar10"), ("resnet50", "imagenet")])
def test_model_configs_build_networks_for_their_data(model, data):
    extra = ["data.image_size=64", "data.resize=64"] if data == "imagenet" else []
    cfg = _compose([f"model={model}", f"data={data}", *extra])
    net = instantiate(cfg.model).eval()
    with torch.no_grad():
        out = net(torch.rand(2, *cfg.data.shape))
    assert out.shape == (2, cfg.data.num_classes)


@pytest.mark.parametrize("method", options("method"))
def test_method_configs_build_the_noise(method):
    from ssn_exp.noises import Noise

    cfg = _compose([f"method={method}", "sigma=0.75"])
    noise = instantiate(cfg.method)
    assert isinstance(noise, Noise) and noise.name == method and noise.sigma == 0.75
    if method == "dssn":
        assert (noise.q, noise.dim, noise.seed, noise.arithmetic) == (16, 64, 0, "exact")
        assert instantiate(_compose(["method.arithmetic=levine2021"]).method).arithmetic == "levine2021"


def test_trainer_logger_and_denoiser_configs_build():
    import pytorch_lightning as pl

    from ssn_exp.cli.common import build_loggers
    from ssn_exp.lightning.loggers import RunCSVLogger
    from ssn_exp.models import DnCNN

    cfg = _compose(["denoiser=mse", "logger=csv"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == cfg.training.epochs
    assert [type(x) for x in build_loggers(cfg)] == [RunCSVLogger]
    assert build_loggers(_compose(["logger=none"])) == []
    assert isinstance(instantiate(cfg.denoiser.net), DnCNN)
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.sigma=2.0", "sigma=0.5"], "method.sigma=2.0 conflicts with sigma=0.5; set sigma=2.0"),
        (["method=uniform", "method.sigma=0.25"], "method.sigma=0.25 conflicts with sigma=0.5; set sigma=0.25"),
        (["method.seed=1"], "method.seed=1 conflicts with seed=0; set seed=1"),
        (["method=laplace", "seed=2", "data.seed=3"], "data.seed=3 conflicts with seed=2; set seed=3"),
        (["method.sigma=0.50", "seed=4", "method.seed=4"], None),  # the same value, written otherwise
        (["method=uniform", "sigma=1.0", "seed=7"], None),  # a noise without a seed
    ],
)
def test_a_run_has_one_sigma_and_one_seed(overrides, message):
    """Issue 23 §6: the run folder is named sigma<sigma>-seed<seed>; a group key set to another value (the noise's
    sigma or seed, the data order's seed) is refused in one line, before anything starts."""
    from ssn_exp.cli.config import ConfigError, check_one_value

    cfg = _compose(overrides)
    if message is None:
        check_one_value(cfg)
    else:
        with pytest.raises(ConfigError) as info:
            check_one_value(cfg)
        assert str(info.value) == message


def test_a_noise_built_for_another_grid_than_the_data_is_refused_before_training():
    """The records name the data set's q (and dim): a noise of another q (method.q=32 on the digits' 16, whose
    values also lie on the finer grid, so that nothing else would notice) is refused when the parts are built."""
    from ssn_exp.cli.config import ConfigError
    from ssn_exp.cli.train import build_parts

    with pytest.raises(ConfigError, match=r"was built for q=32, dim=64, the data set digits has q=16, dim=64"):
        build_parts(_compose(["method.q=32"]))
