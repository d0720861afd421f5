"""``python -m ssn_exp [overrides]``: train a base classifier under a smoothing method's noise, then certify it.

Thin wiring (layer 3): every component is built from its config's ``_target_`` (:func:`ssn_exp.cli.config.build`);
training is a Lightning ``fit`` and certification a callback (layer 2) that calls the library (layer 1).
"""

from __future__ import annotations

import json
import logging
import os
import sys
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
from ssn_exp.cli.errors import RunLock, guard, run_entry

log = logging.getLogger("ssn_exp")

__all__ = ["main", "run_train", "build_parts", "check_network", "certify_module", "finish_wandb", "run_trust"]

#: Data settings that do not change results: a run may resume with other values.
_DATA_NON_SEMANTIC = ("num_workers", "eval_batch_size", "root", "train_root", "val_root", "download")


def finish_wandb():
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def check_network(net, dm, group: str, denoiser: bool = False) -> None:
    """Run ``net`` on two blank images of the data set's shape, then on two random ones, together and one at a time.

    It must return (2, num_classes) finite floating-point logits (a denoiser: images of the same shape), leave its
    input as it was (the user's model inside the ``normalized`` wrapper included), and give each example the same
    output whatever else is in the batch (certification batches noisy copies of several examples together).
    Else a :class:`ConfigError` naming the config file.
    """
    import torch

    from ssn_exp.models import Normalize

    where = f"the {group} from {config_source(group)}"
    shape = (2, *dm.shape)
    inner = net[1] if isinstance(net, torch.nn.Sequential) and len(net) == 2 and isinstance(net[0], Normalize) else None
    changed: list[bool] = []
    seen: dict = {}

    def before(module, args):
        seen["input"] = args[0].clone() if args and isinstance(args[0], torch.Tensor) else None

    def after(module, args, output):
        before_call = seen.pop("input", None)
        if before_call is not None and not torch.equal(before_call, args[0]):
            changed.append(True)

    hooks = [] if inner is None else [inner.register_forward_pre_hook(before), inner.register_forward_hook(after)]

    def run(x):
        try:
            with torch.no_grad():
                return net(x)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's network is a config problem
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"{where} does not accept {dm.name} images of shape {list(dm.shape)}: {text}") from None

    was_training = net.training
    net.eval()
    try:
        x = torch.full(shape, 0.5)
        out = run(x)
        want = shape if denoiser else (2, dm.num_classes)
        what = "images of the same shape" if denoiser else f"(N, num_classes={dm.num_classes}) logits"
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"{where} returns {got} for {list(shape)} inputs; it must return {what}")
        if not out.is_floating_point():
            raise ConfigError(
                f"{where} returns {str(out.dtype).replace('torch.', '')} values; it must return floating-point "
                f"{'images' if denoiser else 'logits'} (e.g. float32)"
            )
        if not bool(torch.isfinite(out).all()):
            raise ConfigError(f"{where} returns NaN or infinite values")
        if changed or not bool((x == 0.5).all()):
            raise ConfigError(
                f"{where} modifies its input in place; it must leave the input tensor as it is "
                "(work on a copy: x = x.clone(), or no in-place operation on x)"
            )
        g = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=g)
        x_before = x.clone()
        together, alone = run(x), torch.cat([run(x[:1]), run(x[1:])])
        if changed or not torch.equal(x, x_before):
            raise ConfigError(
                f"{where} modifies its input in place; it must leave the input tensor as it is "
                "(work on a copy: x = x.clone(), or no in-place operation on x)"
            )
        # NaN where the model gives NaN must agree too; certification refuses non-finite logits per example anyway
        scale = float(torch.nan_to_num(together.double(), nan=0.0, posinf=0.0, neginf=0.0).abs().max())
        if together.shape != alone.shape or not torch.allclose(
            together.double(), alone.double(), rtol=1e-3, atol=1e-4 * (1.0 + scale), equal_nan=True
        ):
            raise ConfigError(
                f"{where} gives an example a different output alone than in a batch (or random outputs); "
                "certification needs a deterministic output per example in eval mode (e.g. no batch statistics)"
            )
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)


def build_parts(cfg: DictConfig):
    """The data module, the checked network configs and the module's hyper-parameters, from the config."""
    from ssn_exp.lightning.data import ImageData
    from ssn_exp.models import normalized
    from ssn_exp.smoothing import Smoothing

    dm = build(cfg.data, "data")
    if not isinstance(dm, ImageData):
        raise ConfigError(
            f"{config_source('data')} builds {type(dm).__name__}, not an ssn_exp.lightning.data.ImageData"
        )
    dm.check("fit")  # missing data fails here, before anything is written
    smoothing = build(cfg.method, "method")
    if not isinstance(smoothing, Smoothing):
        raise ConfigError(f"{config_source('method')} builds {type(smoothing).__name__}, not a smoothing noise")
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


def run_trust(cfg: DictConfig):
    """What configs read from files may build in this run: ssn_exp's own targets, those of this run's composed
    config (the user's choice) and the modules in ``trust_targets`` (:class:`ssn_exp.trust.Trust`)."""
    from ssn_exp.trust import Trust, UntrustedTarget

    try:
        return Trust.from_config(cfg)
    except UntrustedTarget as exc:
        raise ConfigError(str(exc)) from None


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


def certify_module(cfg: DictConfig, model, smoothing, dm, out_dir: Path, settings: dict, meta: dict, logger) -> dict:
    """Certify ``model`` as a Lightning predict loop (sharded over DDP ranks) and summarize."""
    from ssn_exp.lightning.certification import CertifyTask, finish_certification, log_metrics
    from ssn_exp.lightning.progress import progress_callbacks

    dataset = dm.certify_set()
    task = CertifyTask(model, smoothing, dataset, out_dir, dm.num_classes, settings)
    # each rank loads its own shard (no DistributedSampler: it would pad and re-split the shard)
    trainer = build(
        cfg.trainer,
        "trainer",
        logger=False,
        default_root_dir=str(out_dir),
        use_distributed_sampler=False,
        callbacks=progress_callbacks(cfg.trainer),
    )
    trainer.predict(task, return_predictions=False)
    metrics = finish_certification(
        out_dir, smoothing, trainer.world_size, len(dataset), settings, meta, list(cfg.certify.radii)
    )
    if logger:
        log_metrics(logger, metrics, out_dir)
    return metrics


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
        dm, _, hparams = build_parts(cfg)
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
                metrics = certify_module(cfg, module.model, module.smoothing, dm, out_dir, settings, meta, logger)
                print(format_table(metrics))
                print(f"results: {out_dir}")
                return metrics
            certify_cb = CertifyCallback(
                out_dir, dm, settings, list(cfg.certify.radii), meta, progress=bool(cfg.certify.progress)
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
