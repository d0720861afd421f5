"""``python -m ssn_exp [overrides]``: train a base classifier under a smoothing method's noise, then certify it.

Thin wiring (layer 3): every component is built from its config's ``_target_`` (:func:`ssn_exp.cli.config.build`);
training is a Lightning ``fit`` and certification a callback (layer 2) that calls the library (layer 1).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssn_exp.cli.config import (
    CONF_DIR,
    ConfigError,
    build,
    certify_settings,
    check_positive_int,
    check_seed,
    check_sigma,
    check_tag,
    config_source,
    container,
)
from ssn_exp.cli.common import build_noise, build_procedure, certify_model, check_network, finish_wandb, run_trust
from ssn_exp.cli.errors import RunLock, guard, run_entry

log = logging.getLogger("ssn_exp")

__all__ = ["main", "run_train", "build_parts"]

#: Data settings that do not change results: a run may resume with other values.
_DATA_NON_SEMANTIC = ("num_workers", "eval_batch_size", "root", "train_root", "val_root", "download")


def build_parts(cfg: DictConfig):
    """The data module, the noise, the checked network configs and the module's hyper-parameters, from the config."""
    from ssn_exp.lightning.data import ImageData
    from ssn_exp.models import normalized

    dm = build(cfg.data, "data")
    if not isinstance(dm, ImageData):
        raise ConfigError(
            f"{config_source('data')} builds {type(dm).__name__}, not an ssn_exp.lightning.data.ImageData"
        )
    dm.check("fit")  # missing data fails here, before anything is written
    smoothing = build_noise(cfg.method)
    check_network(normalized(build(cfg.model, "model"), dm.mean, dm.std), dm, "model")
    denoiser = container(cfg.denoiser)
    if denoiser.get("name", "none") != "none":
        check_network(build(cfg.denoiser.net, "denoiser"), dm, "denoiser", denoiser=True)
    hparams = dict(
        model=container(cfg.model),
        method=container(cfg.method),
        data=container(cfg.data),
        training=cfg.training.name,
        stability_weight=float(cfg.training.get("stability_weight", 6.0)),
        optimizer=container(cfg.optimizer),
        scheduler=container(cfg.scheduler),
        denoiser=denoiser,
        seed=check_seed(cfg.seed),
    )
    return dm, smoothing, hparams


def _differences(a, b, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts (e.g. ``method.sigma``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _semantic(hp: dict) -> dict:
    hp = dict(hp)
    hp["data"] = {k: v for k, v in dict(hp.get("data") or {}).items() if k not in _DATA_NON_SEMANTIC}
    return hp


def _resume_point(cfg: DictConfig, out_dir: Path, hparams: dict, identity: dict) -> str | None:
    from ssn_exp.lightning.module import checked_hparams, load_checkpoint, read_checkpoint

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


def _make_trainer(cfg: DictConfig):
    from ssn_exp.lightning.progress import progress_callbacks

    def make(**kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *progress_callbacks(cfg.trainer)]
        return build(cfg.trainer, "trainer", **kwargs)

    return make


def _prepare_denoiser(cfg: DictConfig, module, dm, hparams: dict) -> None:
    """Load (training and caching them first if needed) the stages of a denoiser variant into F o D."""
    from ssn_exp.lightning.stages import ensure_stage, load_stage

    d = cfg.denoiser
    root = Path(d.stage_root)
    base = {"model": hparams["model"], "data": _semantic({"data": hparams["data"]})["data"]}
    seed = hparams["seed"]
    make_trainer = _make_trainer(cfg)
    trust = run_trust(cfg)
    model_name = str(hparams["model"].get("_target_", "model")).rsplit(".", 1)[-1]
    clean_ckpt = None
    if d.name in ("stability", "mse"):
        clean_ckpt = d.classifier_ckpt or ensure_stage(
            root,
            "clean",
            f"{dm.name}-{model_name}-seed{seed}",
            {**base, "optimizer": hparams["optimizer"]},
            dm,
            check_positive_int(d.classifier_epochs, "denoiser.classifier_epochs"),
            make_trainer,
            seed=seed,
        )
    kind = "denoiser_stability" if d.name == "stability" else "denoiser_mse"
    den_ckpt = d.denoiser_ckpt
    sm = module.smoothing
    if not den_ckpt:
        init = None
        if kind == "denoiser_stability":
            clean = load_stage(clean_ckpt, trust).classifier.state_dict()
            init = {**{f"classifier.{k}": v for k, v in clean.items()}, "_source": str(clean_ckpt)}
        den_ckpt = ensure_stage(
            root,
            kind,
            f"{dm.name}-{sm.name}-sigma{sm.sigma:g}-seed{seed}",
            {
                **base,
                "method": hparams["method"],
                "denoiser_net": hparams["denoiser"]["net"],
                "denoiser_lr": float(d.lr),
            },
            dm,
            check_positive_int(d.epochs, "denoiser.epochs"),
            make_trainer,
            init=init,
            seed=seed,
        )
    try:
        den = load_stage(den_ckpt, trust)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if den.hparams.kind == "clean" or den.smoothing.name != sm.name or den.smoothing.sigma != sm.sigma:
        raise ConfigError(f"denoiser checkpoint {den_ckpt} is not a denoiser for {sm.name} sigma={sm.sigma:g}")
    module.model.denoiser.load_state_dict(den.denoiser.state_dict())
    if clean_ckpt is not None:
        try:
            clean = load_stage(clean_ckpt, trust)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if clean.hparams.kind != "clean":
            raise ConfigError(f"{clean_ckpt} is not a clean-classifier stage checkpoint")
        module.model.classifier.load_state_dict(clean.classifier.state_dict())
    log.info("denoiser %s: D from %s%s", d.name, den_ckpt, f", F from {clean_ckpt}" if clean_ckpt else "")


def run_train(cfg: DictConfig) -> dict | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    check_sigma(cfg.sigma)  # the cheap checks come before the heavy imports
    seed = check_seed(cfg.seed)
    check_tag(cfg.tag)
    run_trust(cfg)  # a bad trust_targets value is refused before anything starts
    check_positive_int(cfg.training.epochs, "training.epochs")
    if "max_epochs" in cfg.trainer:
        check_positive_int(cfg.trainer.max_epochs, "trainer.max_epochs")
    settings = certify_settings(cfg)

    import pytorch_lightning as pl
    import torch

    from ssn_exp.lightning.callbacks import EpochLog, TrainingETA, epoch_checkpoint
    from ssn_exp.lightning.certification import CertifyCallback
    from ssn_exp.lightning.module import SmoothedTraining, load_checkpoint
    from ssn_exp.lightning.progress import progress_callbacks
    from ssn_exp.lightning.run_files import format_table, refuse_link

    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    with RunLock(out_dir):
        pl.seed_everything(seed, workers=True, verbose=False)
        dm, noise, hparams = build_parts(cfg)
        procedure = build_procedure(cfg, noise)  # a procedure that cannot certify this noise is refused now
        module = SmoothedTraining(**hparams)
        ckpt_path = _resume_point(cfg, out_dir, hparams, module.identity())
        variant = cfg.denoiser.name
        if variant != "none" and ckpt_path is None:
            _prepare_denoiser(cfg, module, dm, hparams)
        logger = build(cfg.logger, "logger")
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        meta = {**module.identity(), "n_classes": dm.num_classes}
        ckpt_dir = out_dir / "checkpoints"
        try:
            if variant in ("stability", "mse"):  # F and D come from their stages: nothing more to train
                last = ckpt_dir / "last.ckpt"
                if ckpt_path is None:
                    ckpt_dir.mkdir(parents=True, exist_ok=True)
                    tmp = ckpt_dir / ".last.ckpt.tmp"
                    tmp.unlink(missing_ok=True)  # a leftover (or a planted link) is replaced, never written through
                    refuse_link(last)
                    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict(), "epoch": 0}, tmp)
                    os.replace(tmp, last)
                else:
                    module = load_checkpoint(last, expect=module.identity(), trust=run_trust(cfg))
                if not cfg.certify.enabled:
                    return None
                metrics = certify_model(cfg, module.model, module.smoothing, procedure, dm, out_dir, settings, meta, logger)
                print(format_table(metrics))
                print(f"results: {out_dir}")
                return metrics
            certify_cb = CertifyCallback(
                out_dir, dm, procedure, settings, list(cfg.certify.radii), meta, progress=bool(cfg.certify.progress)
            )
            callbacks = [EpochLog(), epoch_checkpoint(ckpt_dir), TrainingETA(), *progress_callbacks(cfg.trainer)]
            if cfg.certify.enabled:
                callbacks.append(certify_cb)
            trainer = build(cfg.trainer, "trainer", default_root_dir=str(out_dir), logger=logger, callbacks=callbacks)
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
