"""``python -m ssn_exp [overrides]``: train a base classifier under a smoothing method's noise, then certify it.

Thin wiring (layer 3): every component is built from its config's ``_target_`` (:func:`ssn_exp.cli.config.build`):
the data, the noise, the certificate procedure, the training objective (in the module) and the denoiser variant,
which loads its stages (:meth:`ssn_exp.lightning.denoisers.Denoiser.prepare`). Training is a Lightning ``fit`` with
the certification callback; a variant that does not train is certified by the same driver without it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssn_exp.cli.common import (
    build_loggers,
    build_noise,
    build_procedure,
    certify_model,
    check_network,
    finish_wandb,
    refuse_other_certificates,
    run_trust,
    user_callbacks,
)
from ssn_exp.cli.config import (
    CONF_DIR,
    ConfigError,
    apply_deprecated,
    build,
    check_certify_config,
    check_one_value,
    check_positive_int,
    check_seed,
    check_sigma,
    check_tag,
    config_source,
    container,
    given_overrides,
)
from ssn_exp.cli.errors import guard, run_entry
from ssn_exp.cli.run_dir import RunLock

log = logging.getLogger("ssn_exp")

__all__ = ["main", "run_train", "build_parts"]

_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


def _check_name(value, key: str) -> str:
    """training.name / denoiser.name name the run folder and the report's columns: a short plain name."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{key} must be a short name (letters, digits, _ . + -), got {value!r}")
    return value


def build_parts(cfg: DictConfig):
    """The data module, the noise, the denoiser variant and the module's hyper-parameters, from the config (the
    networks, the training objective and the denoiser variant checked on the way)."""
    from ssn_exp.lightning.data import ImageData
    from ssn_exp.lightning.denoisers import Denoiser
    from ssn_exp.lightning.objectives import Objective
    from ssn_exp.models import normalized

    dm = build(cfg.data, "data")
    if not isinstance(dm, ImageData):
        raise ConfigError(
            f"{config_source('data')} builds {type(dm).__name__}, not an ssn_exp.lightning.data.ImageData"
        )
    dm.check("fit")  # missing data fails here, before anything is written
    smoothing = build_noise(cfg.method)
    why = smoothing.misfit(q=dm.q, dim=dm.dim)  # (a method.q or method.dim of its own: the records say the data's)
    if why is not None:
        raise ConfigError(
            f"the noise of {config_source('method')} {why}, the data set {dm.name} has q={dm.q}, dim={dm.dim}: "
            "leave method.q and method.dim to the data set"
        )
    check_network(normalized(build(cfg.model, "model"), dm.mean, dm.std), dm, "model")
    if "objective" not in cfg.training:
        raise ConfigError(
            f"{config_source('training')} has no objective: add `objective: {{_target_: "
            "ssn_exp.lightning.objectives.Standard}` (or Stability, or your own Objective)"
        )
    objective = build(cfg.training.objective, "training")
    if not isinstance(objective, Objective):
        raise ConfigError(
            f"{config_source('training')} builds {type(objective).__name__} as its objective, not a training "
            "objective (ssn_exp.lightning.objectives.Objective)"
        )
    variant = build(cfg.denoiser, "denoiser", _recursive_=False)  # its net is built by the module, not here
    if not isinstance(variant, Denoiser):
        raise ConfigError(
            f"{config_source('denoiser')} builds {type(variant).__name__}, not a denoiser variant "
            "(ssn_exp.lightning.denoisers.Denoiser)"
        )
    if variant.net is not None:
        check_network(build(cfg.denoiser.net, "denoiser"), dm, "denoiser", denoiser=True)
    hparams = dict(
        model=container(cfg.model),
        method=container(cfg.method),
        data=container(cfg.data),
        training={"name": cfg.training.name, "objective": container(cfg.training.objective)},
        optimizer=container(cfg.optimizer),
        scheduler=container(cfg.scheduler),
        denoiser=container(cfg.denoiser),
        seed=check_seed(cfg.seed),
    )
    return dm, smoothing, variant, hparams


def _differences(a, b, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts (e.g. ``method.sigma``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _semantic(hp: dict) -> dict:
    """What must agree for a run to resume: the hyper-parameters in today's layout, without non-semantic data keys."""
    from ssn_exp.lightning.checkpoint import current_layout
    from ssn_exp.lightning.module import semantic_data

    hp = current_layout(hp)
    return {**hp, "data": semantic_data(hp.get("data"))}


def _resume_point(cfg: DictConfig, out_dir: Path, hparams: dict, identity: dict) -> str | None:
    from ssn_exp.lightning.checkpoint import checked_hparams
    from ssn_exp.lightning.module import load_checkpoint
    from ssn_exp.models import read_checkpoint

    last = out_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    if not cfg.resume:
        raise ConfigError(f"{out_dir} already holds a run; pass resume=true to continue it, or tag=NAME for a new one")
    trust = run_trust(cfg)
    stored = checked_hparams(read_checkpoint(last), last, trust)  # a run folder is data: checked like any checkpoint
    diff = _differences(_semantic(stored), _semantic(hparams))
    if diff:
        raise ConfigError(
            f"{out_dir} holds a run with different settings ({', '.join(diff)}); use tag=NAME or run_root=DIR"
        )
    load_checkpoint(last, expect=identity, trust=trust)  # validates the whole file before Lightning restores it
    log.info("resuming from %s", last)
    return str(last)


def _weights_to_certify(cfg: DictConfig, out_dir: Path, ckpt_path: str | None) -> str | None:
    """The fingerprint of the weights a training run will certify, where it is known before training (so that
    certificates of other weights are refused before anything is written): its checkpoint's when training is done,
    a note when the run is about to train further (which changes them). None (compared after training) for a run
    that trains from scratch or a folder without certificates (the checkpoint is then not read again)."""
    from ssn_exp.lightning.module import load_checkpoint
    from ssn_exp.lightning.results import model_fingerprint
    from ssn_exp.models import read_checkpoint

    if ckpt_path is None or not any(out_dir.glob("certificates*.csv")):
        return None
    epoch, max_epochs = read_checkpoint(ckpt_path).get("epoch"), cfg.trainer.get("max_epochs")
    if isinstance(epoch, int) and isinstance(max_epochs, int) and epoch + 1 < max_epochs:
        return f"those of more training (epoch {epoch + 1} -> {max_epochs})"
    return model_fingerprint(load_checkpoint(ckpt_path, trust=run_trust(cfg)).model)  # (checked by _resume_point)


def _trained(cfg: DictConfig, ckpt_path: str | None, out_dir: Path, identity: dict):
    """The module of a finished training run in ``out_dir`` (job shards certify it side by side; none trains)."""
    from ssn_exp.lightning.module import load_checkpoint
    from ssn_exp.models import read_checkpoint

    epochs = int(cfg.trainer.get("max_epochs", cfg.training.epochs))
    done = 0 if ckpt_path is None else int(read_checkpoint(ckpt_path).get("epoch", -1)) + 1
    if done < epochs or not cfg.certify.enabled:
        raise ConfigError(
            f"certify.shard jobs certify a trained model, and {out_dir} holds {done} of {epochs} epochs: train it "
            "first (the same command with certify.enabled=false and without certify.shard/num_shards), then run the "
            "shards"
            if cfg.certify.enabled
            else "certify.shard/num_shards with certify.enabled=false: nothing to certify"
        )
    return load_checkpoint(ckpt_path, expect=identity, trust=run_trust(cfg))


def _make_trainer(cfg: DictConfig):
    from ssn_exp.lightning.callbacks import QuietRanks
    from ssn_exp.lightning.progress import progress_callbacks

    def make(**kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *progress_callbacks(cfg.trainer), QuietRanks()]
        return build(cfg.trainer, "trainer", **kwargs)

    return make


def run_train(cfg: DictConfig) -> dict | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    apply_deprecated(cfg, given_overrides())  # certify.n=... (before issue 25) is procedure.n=...
    check_sigma(cfg.sigma)  # the cheap checks come before the heavy imports
    seed = check_seed(cfg.seed)
    check_one_value(cfg)  # the run folder's sigma and seed are the ones the run uses
    check_tag(cfg.tag)
    run_trust(cfg)  # a bad trust_targets value is refused before anything starts
    check_positive_int(cfg.training.epochs, "training.epochs")
    _check_name(cfg.training.name, "training.name")
    _check_name(cfg.denoiser.name, "denoiser.name")
    if "max_epochs" in cfg.trainer:
        check_positive_int(cfg.trainer.max_epochs, "trainer.max_epochs")
    settings = check_certify_config(cfg)
    build_procedure(cfg)  # its settings checked now (built for the noise below)

    import pytorch_lightning as pl

    from ssn_exp.lightning.callbacks import EpochLog, QuietRanks, TrainingETA, epoch_checkpoint
    from ssn_exp.lightning.certification import CertifyCallback
    from ssn_exp.lightning.module import SmoothedTraining
    from ssn_exp.lightning.progress import progress_callbacks
    from ssn_exp.lightning.results import format_table, model_fingerprint

    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    with RunLock(out_dir, settings.lock_name):
        pl.seed_everything(seed, workers=True, verbose=False)
        dm, noise, variant, hparams = build_parts(cfg)
        procedure = build_procedure(cfg, noise)  # a procedure that cannot certify this noise is refused now
        module = SmoothedTraining(**hparams)
        ckpt_path = _resume_point(cfg, out_dir, hparams, module.identity())
        if settings.num_shards > 1:  # one job of a certification split over jobs: of the trained model
            module = _trained(cfg, ckpt_path, out_dir, module.identity())
            meta = {**module.identity(), "n_classes": dm.num_classes}
            metrics = certify_model(cfg, module.model, module.smoothing, procedure, dm, out_dir, settings, meta, None)
            if metrics is not None:
                print(format_table(metrics))
                print(f"results: {out_dir}")
            return metrics
        ckpt_dir = out_dir / "checkpoints"
        module = variant.prepare(
            module, dm, ckpt_dir=ckpt_dir, resume_from=ckpt_path, make_trainer=_make_trainer(cfg), trust=run_trust(cfg)
        )
        if cfg.certify.enabled:  # every refusal comes before the first write: a refused rerun changes nothing
            weights = (
                _weights_to_certify(cfg, out_dir, ckpt_path) if variant.trains else model_fingerprint(module.model)
            )
            refuse_other_certificates(out_dir, weights, module.smoothing, procedure, settings)
        extra = user_callbacks(cfg, out_dir) if variant.trains else []  # (refused now, before anything is logged)
        logger = build_loggers(cfg)
        for one in logger:
            one.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        meta = {**module.identity(), "n_classes": dm.num_classes}
        try:
            if not variant.trains:  # the variant loaded the whole model: certify it as it is
                if not cfg.certify.enabled:
                    return None
                metrics = certify_model(
                    cfg, module.model, module.smoothing, procedure, dm, out_dir, settings, meta, logger
                )
                print(format_table(metrics))
                print(f"results: {out_dir}")
                return metrics
            certify_cb = CertifyCallback(out_dir, dm, procedure, settings, meta)
            callbacks = [
                EpochLog(),
                epoch_checkpoint(ckpt_dir),
                TrainingETA(),
                *progress_callbacks(cfg.trainer),
                QuietRanks(),
            ]
            callbacks += extra  # the user's own (conf/callbacks), after the run's
            if cfg.certify.enabled:
                callbacks.append(certify_cb)
            trainer = build(
                cfg.trainer, "trainer", default_root_dir=str(out_dir), logger=logger or False, callbacks=callbacks
            )
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)  # no pickles on resume either
        finally:
            finish_wandb()
        metrics = certify_cb.metrics
        if metrics is None and cfg.certify.enabled and (out_dir / "metrics.json").is_file():
            metrics = json.loads((out_dir / "metrics.json").read_text())  # ddp_spawn: written by rank 0's process
        if metrics is not None and trainer.global_rank == 0:
            print(format_table(metrics))
            print(f"results: {out_dir}")
        return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig):
    metrics = guard(run_train, cfg)
    return None if metrics is None else metrics.get("acr")


def main() -> None:
    """``python -m ssn_exp`` / ``ssn-exp``."""
    run_entry(_app)


if __name__ == "__main__":
    main()
