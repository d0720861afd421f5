"""``python -m ssn_exp.certify ckpt=PATH [overrides]``: certify a checkpoint without training (layer 3).

Two checkpoint formats (``ckpt_format``, recognised by default):

- ``ssn_exp``: written by ``python -m ssn_exp``; the model, noise and data set are rebuilt from the configs
  stored inside. Naming method / sigma / seed / data / training on the command line asks the checkpoint to
  match them, and a mismatch is refused.
- ``levine2021``: the authors' released CIFAR-10 WideResNet-40-2 checkpoints (a plain state dict,
  :func:`ssn_exp.models.load_levine2021`). They hold weights only: method and sigma come from the command
  line or from the authors' folder name ``cifar_{uniform,split,split_derandomized}_{sigma}[_stabilized]``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ssn_exp.cli.common import (
    build_loggers,
    build_noise,
    build_procedure,
    certify_model,
    finish_wandb,
    refuse_other_certificates,
    run_trust,
)
from ssn_exp.cli.config import (
    CONF_DIR,
    ConfigError,
    apply_deprecated,
    build,
    check_certify_config,
    check_seed,
    check_sigma,
    config_source,
    container,
    given_overrides,
)
from ssn_exp.cli.errors import guard, run_entry
from ssn_exp.cli.run_dir import RunLock

log = logging.getLogger("ssn_exp")

__all__ = ["main", "run_certify", "levine2021_folder", "FORMATS"]

FORMATS = ("auto", "ssn_exp", "levine2021")
#: The authors' folder names: cifar_{uniform,split,split_derandomized}_{sigma}[_stabilized]
_LEVINE_FOLDER = re.compile(r"cifar_(uniform|split|split_derandomized)_([0-9]*\.?[0-9]+)(_stabilized)?")
_LEVINE_METHODS = {"uniform": "uniform", "split": "ssn", "split_derandomized": "dssn"}


def levine2021_folder(path) -> dict | None:
    """method, sigma and training read from the authors' folder name, or None if it does not follow it."""
    m = _LEVINE_FOLDER.fullmatch(Path(path).parent.name)
    if m is None:
        return None
    return {
        "method": _LEVINE_METHODS[m.group(1)],
        "sigma": float(m.group(2)),
        "training": "stability" if m.group(3) else "standard",
    }


def _detect(path: Path, requested: str) -> str:
    from ssn_exp.models import CheckpointError, read_checkpoint

    if requested not in FORMATS:
        raise ConfigError(f"ckpt_format must be one of {list(FORMATS)}, got {requested!r}")
    if requested != "auto":
        return requested
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "hyper_parameters" in ckpt and "state_dict" in ckpt:
        return "ssn_exp"
    if isinstance(ckpt, dict) and "norm.module.mu" in ckpt:
        return "levine2021"
    raise CheckpointError(
        f"{path} is neither an ssn_exp checkpoint nor one of the authors' released checkpoints (levine2021)"
    )


def _method_class_name(cfg: DictConfig) -> str:
    from hydra.utils import get_class

    try:
        return get_class(cfg.method._target_).name
    except Exception:  # noqa: BLE001 - reported as the option name
        return HydraConfig.get().runtime.choices.get("method", "?")


def _data_module(data_cfg: DictConfig, where: str):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from ssn_exp.exceptions import instantiation_message

    try:
        return instantiate(data_cfg)
    except InstantiationException as exc:
        raise ConfigError(f"cannot build the data set from {where}: {instantiation_message(exc)}") from None


def _check_data_fits(dm, module, path: Path) -> None:
    """The data set to certify on must be the one the checkpoint's model and noise were built for: its facts against
    the stored ones, the noise's grid and dimension, and the model's output on a blank image of its shape. These
    come from the weights and the noise, not only from the stored data config, so an edited one is refused."""
    import torch

    from ssn_exp.certify.core import check_logits

    stored, sm = module.hparams.data, module.smoothing
    for key in ("q", "num_classes", "shape"):
        if getattr(dm, key) != (tuple(stored[key]) if key == "shape" else stored[key]):
            raise ConfigError(
                f"the data set {dm.name} has {key}={getattr(dm, key)}, the checkpoint's model expects {stored[key]}"
            )
    why = sm.misfit(q=dm.q, dim=dm.dim)
    if why is not None:
        raise ConfigError(f"the noise of {path} {why}, the data set {dm.name} has q={dm.q}, dim={dm.dim}")
    with torch.no_grad():
        try:
            out = module.model.eval()(torch.full((1, *dm.shape), 0.5))
        except Exception as exc:  # noqa: BLE001 - any failure of the stored network on this data set's images
            raise ConfigError(
                f"the model of {path} does not accept {dm.name} images of shape {list(dm.shape)}: "
                f"{' '.join(str(exc).split()) or type(exc).__name__}"
            ) from None
    check_logits(out, 1, dm.num_classes, who=f"the model of {path}")


def _from_ssn_exp(cfg: DictConfig, path: Path, given: dict):
    from ssn_exp.lightning.data import ImageData
    from ssn_exp.lightning.module import load_checkpoint
    from ssn_exp.trust import UntrustedTarget

    expect = {}
    if "method" in given:
        expect["method"] = _method_class_name(cfg)
    if "sigma" in given:
        expect["sigma"] = check_sigma(cfg.sigma)
    if "method.seed" in given or "seed" in given:
        expect["seed"] = check_seed(cfg.method.get("seed", cfg.seed))
    if "data" in given:
        expect["dataset"], expect["q"] = cfg.data.name, cfg.data.q
    if "training" in given:
        expect["training"] = cfg.training.name
    ignored = sorted(k for k in given if k.startswith("method.") and k != "method.seed")
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)}: the noise of an ssn_exp checkpoint is the one it was trained with (stored in it); "
            "only method=, sigma= and seed= may be given, to check that it matches"
        )
    trust = run_trust(cfg)
    module = load_checkpoint(path, expect=expect, trust=trust)
    ident = module.identity()
    # The checkpoint's data set (or the one named on the command line), with data.* overrides on top.
    data_cfg = (
        OmegaConf.create(dict(module.hparams.data)) if "data" not in given else OmegaConf.create(container(cfg.data))
    )
    for key in given:
        if key.startswith("data."):
            OmegaConf.update(data_cfg, key[5:], OmegaConf.select(cfg, key), force_add=True)
    where = f"the data config stored in {path}" if "data" not in given else config_source("data")
    try:  # checked again with the data.* overrides applied (nothing from the file is built unchecked)
        trust.check(container(data_cfg), f"cannot build the data set from {where}", "data")
    except UntrustedTarget as exc:
        raise ConfigError(str(exc)) from None
    dm = _data_module(data_cfg, where)
    if not isinstance(dm, ImageData):
        raise ConfigError(f"{where} builds {type(dm).__name__}, not an ssn_exp.lightning.data.ImageData")
    dm.check("test")
    _check_data_fits(dm, module, path)
    meta = {**ident, "n_classes": dm.num_classes, "checkpoint": str(path), "ckpt_format": "ssn_exp"}
    meta["run_seed"] = int(module.hparams.seed)  # seeds the randomized certification noise, as in the run itself
    return module.model, module.smoothing, dm, meta


def _from_levine2021(cfg: DictConfig, path: Path, given: dict):
    from ssn_exp.models import load_levine2021

    if cfg.data.name != "cifar10":
        raise ConfigError(
            f"the authors' checkpoints are CIFAR-10 WideResNet-40-2 models: certify them with data=cifar10 "
            f"(and data.root=DIR), not data={cfg.data.name}"
        )
    folder = levine2021_folder(path)
    method = HydraConfig.get().runtime.choices.get("method") if "method" in given else None
    sigma = check_sigma(cfg.sigma) if "sigma" in given else None
    if folder is not None:
        if method is not None and method != folder["method"]:
            raise ConfigError(f"{path} is a {folder['method']} model (its folder says so), not method={method}")
        if sigma is not None and abs(sigma - folder["sigma"]) > 1e-9:
            raise ConfigError(
                f"{path} was trained at sigma={folder['sigma']:g} (its folder says so), not sigma={sigma:g}"
            )
        method, sigma = folder["method"], folder["sigma"]
    if method is None or sigma is None:
        raise ConfigError(
            f"give method= and sigma= for {path}: its folder name does not follow the authors' pattern "
            "cifar_{uniform,split,split_derandomized}_{sigma}[_stabilized]"
        )
    with open_dict(cfg):
        cfg.sigma = sigma
        if HydraConfig.get().runtime.choices.get("method") != method:
            node = OmegaConf.load(Path(CONF_DIR) / "method" / f"{method}.yaml")
            node.pop("defaults", None)  # (its procedure: the noise's own, see build_procedure)
            cfg.method = node
    smoothing = build_noise(cfg.method)
    try:
        model = load_levine2021(path, "cifar10")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    dm = build(cfg.data, "data")
    dm.check("test")
    training = folder["training"] if folder else cfg.training.name
    meta = {
        "method": smoothing.name,
        "sigma": smoothing.sigma,
        "q": dm.q,
        "seed": int(smoothing.describe().get("seed", cfg.seed)),
        "dataset": dm.name,
        "training": training,
        "denoiser": "none",
        "model": "levine2021 WideResNet-40-2",
        "n_classes": dm.num_classes,
        "checkpoint": str(path),
        "ckpt_format": "levine2021",
    }
    return model, smoothing, dm, meta


def run_certify(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise ConfigError("give the checkpoint to certify: python -m ssn_exp.certify ckpt=PATH")
    path = Path(str(cfg.ckpt))
    if not path.is_file():  # before torch is imported: a mistyped path is answered at once
        what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise ConfigError(f"checkpoint {path} {what}: give ckpt=PATH to a .ckpt (or the authors' .pth) file")
    from ssn_exp.lightning.results import format_table, model_fingerprint

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    given = given_overrides()
    apply_deprecated(cfg, given)  # certify.n=... (before issue 25) is procedure.n=...
    check_seed(cfg.seed)
    fmt = _detect(path, str(cfg.ckpt_format))
    settings = check_certify_config(cfg)  # every certify.* value checked before anything is loaded
    build_procedure(cfg)  # and every procedure.* value
    with RunLock(out_dir, settings.lock_name):
        if fmt == "levine2021":
            model, smoothing, dm, meta = _from_levine2021(cfg, path, given)
        else:
            model, smoothing, dm, meta = _from_ssn_exp(cfg, path, given)
        with open_dict(cfg):  # procedure.n defaults to the checkpoint's data set's sample count
            cfg.data.certify_n = dm.certify_n
        procedure = build_procedure(cfg, smoothing)  # procedure=auto (default): the checkpoint noise's own
        run_seed = meta.pop("run_seed", None)
        if run_seed is not None and "seed" not in given:  # the same certification noise as the run's own
            settings = dataclasses.replace(settings, seed=run_seed)
        refuse_other_certificates(out_dir, model_fingerprint(model), smoothing, procedure, settings)  # before writing
        logger = build_loggers(cfg)
        for one in logger:
            one.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "checkpoint_identity": meta})
        try:
            metrics = certify_model(cfg, model, smoothing, procedure, dm, out_dir, settings, meta, logger)
        finally:
            finish_wandb()
    if metrics is None:  # a job shard whose certification waits for the other shards (it said so)
        return {}
    print(format_table(metrics))
    print(f"results: {out_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="certify_ckpt")
def _app(cfg: DictConfig):
    metrics = guard(run_certify, cfg)
    return metrics.get("acr")


def main() -> None:
    """``python -m ssn_exp.certify`` / ``ssn-exp-certify``."""
    run_entry(_app, during="certification")


if __name__ == "__main__":
    main()
