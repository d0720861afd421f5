"""Hydra entry points (layer 3): thin wiring of configs to the Lightning and certification layers.

- ``python -m ssn_exp [overrides]``: train under a smoothing method, then certify the test split.
- ``python -m ssn_exp.certify ckpt=PATH [overrides]``: certify a saved checkpoint without training.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ssn_exp")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


class ConfigError(ValueError):
    """A configuration value that makes no sense (reported in one line)."""


def _path_tag(path) -> str:
    """A directory-name-safe tag for a checkpoint path (resolver ``${path_tag:...}``)."""
    p = Path(str(path))
    parts = [x for x in p.with_suffix("").parts[-4:] if x not in ("/", "checkpoints")]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts)).strip("_-") or "ckpt"


if not OmegaConf.has_resolver("path_tag"):
    OmegaConf.register_new_resolver("path_tag", _path_tag)


# ----------------------------------------------------------------------------- helpers


def _user_errors():
    from ssn_exp.data import DataMissingError
    from ssn_exp.lit import CheckpointMismatch
    from ssn_exp.smoothing import OffGridError

    return (ConfigError, DataMissingError, CheckpointMismatch, OffGridError, FileNotFoundError)


def _guard(fn, cfg: DictConfig):
    """Run fn(cfg); user errors become one clear line (exit 2), or a failed job in --multirun."""
    try:
        return fn(cfg)
    except _user_errors() as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        msg = f"error: {exc}"
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun:  # let Hydra record the failed job and go on with the others
            log.error(msg)
            raise
        print(msg, file=sys.stderr)
        sys.exit(2)


def _explicit_overrides() -> dict[str, str]:
    """The key=value overrides given on the command line (or by the sweeper) for this job."""
    out = {}
    for item in HydraConfig.get().overrides.task:
        key, _, value = item.lstrip("+~").partition("=")
        out[key] = value
    return out


def _datamodule(data_cfg: DictConfig):
    from ssn_exp.data import build_datamodule

    kw = OmegaConf.to_container(data_cfg, resolve=True)
    name = kw.pop("name")
    kw.pop("certify_n", None)
    return build_datamodule(name, **kw)


def _smoothing_check(method: str, sigma, q: int, dim: int, seed):
    from ssn_exp.smoothing import make_smoothing

    try:
        return make_smoothing(method, sigma, q=q, dim=dim, seed=seed)
    except ValueError as exc:
        raise ConfigError(f"{exc} (method={method}, sigma={sigma})") from exc


def _certify_settings(cfg: DictConfig, n: int | None = None) -> dict:
    c = cfg.certify
    if c.noise_batch < 1 or c.batch_size < 1 or c.skip < 1:
        raise ConfigError("certify.noise_batch, certify.batch_size and certify.skip must be >= 1")
    if not 0 < c.alpha < 1:
        raise ConfigError(f"certify.alpha must lie in (0, 1), got {c.alpha}")
    return {
        "skip": int(c.skip),
        "max_examples": None if c.max_examples is None else int(c.max_examples),
        "n0": int(c.n0),
        "n": int(n if n is not None else c.n),
        "alpha": float(c.alpha),
        "noise_batch": int(c.noise_batch),
        "batch_size": int(c.batch_size),
        "seed": int(cfg.seed),
        "autocast": c.get("autocast"),
        "channels_last": bool(c.get("channels_last", False)),
        "compile": bool(c.get("compile", False)),
    }


def _trainer_kwargs(cfg: DictConfig) -> dict:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    return kw


def _logger(cfg: DictConfig, out_dir: Path, job_name: str):
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(out_dir), name="csv", version="")
    if name == "wandb":
        from ssn_exp.tracking import wandb_logger

        return wandb_logger(cfg, out_dir, job_name)
    raise ConfigError(f"unknown logger {name!r}; choose csv, wandb or none")


def _job_name(cfg: DictConfig) -> str:
    return f"{cfg.method.name}-sigma{cfg.sigma}-seed{cfg.seed}"


def _finish_wandb():
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


# ----------------------------------------------------------------------------- denoisers


def _prepare_denoiser(cfg: DictConfig, module, dm, hparams: dict) -> None:
    """Load (training and caching them first if needed) the stages of a denoiser variant into F o D."""
    from ssn_exp.stages import ensure_stage, load_stage

    d = cfg.denoiser
    root = Path(d.stage_root)
    tkw = _trainer_kwargs(cfg)
    base = {k: hparams[k] for k in ("arch", "arch_options", "num_classes", "shape", "mean", "std", "q")}
    optim = {k: hparams[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
    seed = int(cfg.seed)
    clean_ckpt = None
    if d.name in ("stability", "mse"):
        clean_ckpt = d.classifier_ckpt or ensure_stage(
            root,
            "clean",
            f"{dm.name}-{hparams['arch']}-seed{seed}",
            {**base, **optim},
            dm,
            d.classifier_epochs,
            tkw,
            seed=seed,
        )
    kind = "denoiser_stability" if d.name == "stability" else "denoiser_mse"
    den_ckpt = d.denoiser_ckpt
    if not den_ckpt:
        init = None
        if kind == "denoiser_stability":
            clean = load_stage(clean_ckpt).classifier.state_dict()
            init = {**{f"classifier.{k}": v for k, v in clean.items()}, "_source": str(clean_ckpt)}
        noise = {"method": hparams["method"], "sigma": hparams["sigma"], "noise_seed": hparams["noise_seed"]}
        den_ckpt = ensure_stage(
            root,
            kind,
            f"{dm.name}-{noise['method']}-sigma{noise['sigma']:g}-seed{noise['noise_seed']}",
            {**base, **noise, "dncnn": hparams["dncnn"], "denoiser_lr": float(d.lr)},
            dm,
            d.epochs,
            tkw,
            init=init,
            seed=seed,
        )
    den = load_stage(den_ckpt)
    if (
        den.hparams.kind == "clean"
        or den.hparams.method != hparams["method"]
        or float(den.hparams.sigma) != hparams["sigma"]
    ):
        raise ConfigError(
            f"denoiser checkpoint {den_ckpt} is not a denoiser for {hparams['method']} sigma={hparams['sigma']}"
        )
    module.model.denoiser.load_state_dict(den.denoiser.state_dict())
    if clean_ckpt is not None:
        clean = load_stage(clean_ckpt)
        if clean.hparams.kind != "clean":
            raise ConfigError(f"{clean_ckpt} is not a clean-classifier stage checkpoint")
        module.model.classifier.load_state_dict(clean.classifier.state_dict())
    log.info("denoiser %s: D from %s%s", d.name, den_ckpt, f", F from {clean_ckpt}" if clean_ckpt else "")


def _certify_module(cfg: DictConfig, module, dm, out_dir: Path, settings: dict, meta: dict, logger) -> dict:
    """Certify a trained module as a Lightning predict loop (sharded over DDP ranks) and summarize."""
    import pytorch_lightning as pl

    from ssn_exp.certification import CertifyTask, finish_certification, log_metrics

    dataset = dm.certify_set()
    task = CertifyTask(module.model, module.smoothing, dataset, out_dir, dm.num_classes, settings)
    trainer_kw = _trainer_kwargs(cfg)
    for key in ("check_val_every_n_epoch", "limit_train_batches", "limit_val_batches", "log_every_n_steps"):
        trainer_kw.pop(key, None)
    # each rank loads its own shard (no DistributedSampler: it would pad and re-split the shard)
    trainer = pl.Trainer(logger=False, default_root_dir=str(out_dir), use_distributed_sampler=False, **trainer_kw)
    trainer.predict(task, return_predictions=False)
    metrics = finish_certification(
        out_dir, module.smoothing, trainer.world_size, len(dataset), settings, meta, list(cfg.certify.radii)
    )
    if logger:
        log_metrics(logger, metrics, out_dir)
    return metrics


# ----------------------------------------------------------------------------- train


def run_train(cfg: DictConfig) -> dict | None:
    import pytorch_lightning as pl
    import torch

    from ssn_exp.certification import CertifyCallback, format_table
    from ssn_exp.lit import SmoothedTraining, TrainingETA, epoch_checkpoint, load_checkpoint

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.training.epochs < 1:
        raise ConfigError(f"training.epochs must be >= 1, got {cfg.training.epochs}")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = _datamodule(cfg.data)
    _smoothing_check(cfg.method.name, cfg.sigma, dm.q, dm.dim, cfg.method.seed)
    settings = _certify_settings(cfg)
    dm.setup("fit")

    hparams = dict(
        arch=cfg.model.name,
        arch_options=OmegaConf.to_container(cfg.model.options, resolve=True) or {},
        dataset=dm.name,
        num_classes=dm.num_classes,
        shape=list(dm.shape),
        mean=list(dm.mean),
        std=list(dm.std),
        q=dm.q,
        method=cfg.method.name,
        sigma=float(cfg.sigma),
        noise_seed=int(cfg.method.seed),
        training=cfg.training.name,
        stability_weight=float(cfg.training.get("stability_weight", 6.0)),
        lr=float(cfg.optim.lr),
        momentum=float(cfg.optim.momentum),
        nesterov=bool(cfg.optim.nesterov),
        weight_decay=float(cfg.optim.weight_decay),
        denoiser=cfg.denoiser.name,
        dncnn=OmegaConf.to_container(cfg.denoiser.dncnn, resolve=True) if cfg.denoiser.name != "none" else None,
    )
    module = SmoothedTraining(**hparams)
    variant = cfg.denoiser.name

    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = None
    if last.is_file():
        if not cfg.resume:
            raise ConfigError(
                f"{out_dir} already holds a run; pass resume=true to continue it, or tag=NAME for a new one"
            )
        stored = torch.load(last, map_location="cpu", weights_only=True)["hyper_parameters"]
        diff = sorted(k for k in hparams if stored.get(k) != hparams[k])
        if diff:
            raise ConfigError(
                f"{out_dir} holds a run with different settings ({', '.join(diff)}); use tag=NAME or run_root=DIR"
            )
        load_checkpoint(last, expect=module.identity())  # validates the file before Lightning restores it
        ckpt_path = str(last)
        log.info("resuming from %s", last)
    if variant != "none" and ckpt_path is None:
        _prepare_denoiser(cfg, module, dm, hparams)

    job = _job_name(cfg)
    logger = _logger(cfg, out_dir, job)
    meta = {**module.identity(), "n_classes": dm.num_classes}
    if variant in ("stability", "mse"):  # F and D come from their stages: nothing more to train
        if ckpt_path is None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_dir / ".last.ckpt.tmp"
            torch.save(
                {"hyper_parameters": hparams, "state_dict": module.state_dict(), "epoch": 0, "global_step": 0}, tmp
            )
            os.replace(tmp, last)
        else:
            module = load_checkpoint(last, expect=module.identity())
        metrics = None
        if cfg.certify.enabled:
            metrics = _certify_module(cfg, module, dm, out_dir, settings, meta, logger)
            print(format_table(metrics))
            print(f"results: {out_dir}")
        _finish_wandb()
        return metrics
    certify_cb = CertifyCallback(
        out_dir, dm, settings, list(cfg.certify.radii), meta, progress=bool(cfg.certify.progress)
    )
    callbacks = [epoch_checkpoint(ckpt_dir), TrainingETA()]
    if cfg.certify.enabled:
        callbacks.append(certify_cb)
    trainer = pl.Trainer(
        max_epochs=int(cfg.training.epochs),
        default_root_dir=str(out_dir),
        logger=logger,
        callbacks=callbacks,
        **_trainer_kwargs(cfg),
    )
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    finally:
        _finish_wandb()
    metrics = certify_cb.metrics
    if metrics is None and cfg.certify.enabled and (out_dir / "metrics.json").is_file():
        metrics = json.loads((out_dir / "metrics.json").read_text())  # ddp_spawn: written by rank 0's process
    if metrics is not None and trainer.global_rank == 0:
        print(format_table(metrics))
        print(f"results: {out_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train_main(cfg: DictConfig):
    metrics = _guard(run_train, cfg)
    return None if metrics is None else metrics.get("acr")


# ----------------------------------------------------------------------------- certify a checkpoint


def run_certify(cfg: DictConfig) -> dict:
    from ssn_exp.certification import format_table
    from ssn_exp.lit import load_checkpoint

    if cfg.get("ckpt") in (None, "", "???"):
        raise ConfigError("give the checkpoint to certify: python -m ssn_exp.certify ckpt=PATH")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    given = _explicit_overrides()
    expect = {}
    if "method" in given:
        expect["method"] = cfg.method.name
    if "sigma" in given:
        expect["sigma"] = float(cfg.sigma)
    if "method.seed" in given or "seed" in given:
        expect["seed"] = int(cfg.method.seed)
    if "data" in given:
        dm_req = _datamodule(cfg.data)
        expect["dataset"], expect["q"] = dm_req.name, dm_req.q
    if "training" in given:
        expect["training"] = cfg.training.name
    module = load_checkpoint(cfg.ckpt, expect=expect)
    ident = module.identity()
    # The data set of the checkpoint, with any data.* overrides from the command line on top.
    data_cfg = OmegaConf.load(Path(CONF_DIR) / "data" / f"{ident['dataset']}.yaml")
    for key in given:
        if key.startswith("data."):
            OmegaConf.update(data_cfg, key[5:], OmegaConf.select(cfg, key), force_add=True)
    dm = _datamodule(data_cfg)
    settings = _certify_settings(cfg, n=None if "certify.n" in given else int(data_cfg.certify_n))
    logger = _logger(cfg, out_dir, _job_name(cfg))
    meta = {**ident, "n_classes": dm.num_classes, "checkpoint": str(cfg.ckpt)}
    try:
        metrics = _certify_module(cfg, module, dm, out_dir, settings, meta, logger)
    finally:
        _finish_wandb()
    print(format_table(metrics))
    print(f"results: {out_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="certify_ckpt")
def certify_main(cfg: DictConfig):
    metrics = _guard(run_certify, cfg)
    return metrics.get("acr")
