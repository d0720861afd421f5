"""Denoiser stages (appendix D; Salman et al. 2020), trained once and reused (layer 2).

- ``clean``: a classifier F trained on clean images (one per data set x model x seed);
- ``denoiser_mse``: a denoiser D trained with ||D(x_tilde) - x||^2 (one per method x sigma);
- ``denoiser_stability``: D trained with CE(F(D(x_tilde)), argmax F(x)), F frozen (one per method x sigma x F).

A stage lives in ``<stage_root>/<kind>/<readable name>-<hash of its settings>/`` with its
``settings.json``; a finished stage has ``done.json`` and is reused by every run that needs the
same settings. A killed stage resumes from its ``last.ckpt``. Parallel jobs needing the same stage
take a file lock: one trains, the others wait and reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch.nn import functional as F

from ssn_exp.exceptions import _first_line, instantiation_message
from ssn_exp.lightning.callbacks import epoch_checkpoint
from ssn_exp.lightning.checkpoint import check_sizes
from ssn_exp.lightning.data import mix_seed
from ssn_exp.lightning.module import build_classifier
from ssn_exp.lightning.results import write_text_atomic
from ssn_exp.models import CheckpointError, read_checkpoint
from ssn_exp.noises import Noise
from ssn_exp.trust import Trust, UntrustedTarget

log = logging.getLogger("ssn_exp")

__all__ = ["StageModule", "stage_dir", "ensure_stage", "load_stage"]

KINDS = ("clean", "denoiser_mse", "denoiser_stability")
_STAGE_HPARAMS = ("kind", "model", "data", "method", "denoiser_net", "optimizer", "denoiser_lr", "seed")


class StageModule(pl.LightningModule):
    """One training stage; the hyper-parameters (plain config dicts) rebuild it from its checkpoint."""

    def __init__(
        self,
        *,
        kind: str,
        model: dict,
        data: dict,
        method: dict | None = None,
        denoiser_net: dict | None = None,
        optimizer: dict | None = None,
        denoiser_lr: float = 1e-3,
        seed: int = 0,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown stage {kind!r}")
        self.save_hyperparameters(logger=False)
        if kind in ("clean", "denoiser_stability"):
            self.classifier = build_classifier(model, data)
        if kind != "clean":
            self.denoiser = instantiate(denoiser_net)
            self.smoothing: Noise = instantiate(method)
        if kind == "denoiser_stability":
            self.classifier.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        kind = self.hparams.kind
        if kind == "clean":
            logits = self.classifier(x)
            loss = F.cross_entropy(logits, y)
            self.log("stage/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        else:
            seed = mix_seed(self.hparams.seed, 7, self.global_rank, self.current_epoch, batch_idx)
            g = torch.Generator(device=self.device).manual_seed(seed)
            noisy = self.smoothing.sample(x, g)
            if kind == "denoiser_mse":
                loss = F.mse_loss(self.denoiser(noisy), x)
            else:
                self.classifier.eval()
                with torch.no_grad():
                    target = self.classifier(x).argmax(1)
                loss = F.cross_entropy(self.classifier(self.denoiser(noisy)), target)
        self.log("stage/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        epochs = max(1, int(self.trainer.max_epochs or 1))
        if hp.kind == "clean":
            opt_cfg = hp.optimizer or {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
            opt = instantiate(opt_cfg)(self.parameters())
        else:  # Salman et al.: Adam, lr 1e-3
            opt = torch.optim.Adam(self.denoiser.parameters(), lr=hp.denoiser_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def stage_dir(root: Path, kind: str, name: str, settings: dict) -> Path:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root) / kind / f"{name}-{digest}"


def load_stage(path: Path, trust: Trust | None = None) -> StageModule:
    """Rebuild a stage from its checkpoint; a stage root is shared between runs, so a stage checkpoint is data like
    any other: its hyper-parameters are checked (structure, and every ``_target_`` against ``trust``, default
    ssn_exp's own targets) before anything is built. Problems raise :class:`CheckpointError` (one line)."""
    from hydra.errors import InstantiationException

    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    tensors = isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    if not isinstance(hp, dict) or hp.get("kind") not in KINDS or not tensors:
        raise CheckpointError(f"{path} is not a denoiser-stage checkpoint of ssn_exp")
    unknown = sorted(str(k) for k in hp if k not in _STAGE_HPARAMS)
    if unknown:
        raise CheckpointError(f"{path} has stage hyper-parameters this ssn_exp does not know ({', '.join(unknown)})")
    for key in ("model", "data") + (("method", "denoiser_net") if hp["kind"] != "clean" else ()):
        if not isinstance(hp.get(key), dict):
            raise CheckpointError(f"{path}: stage hyper-parameter {key} is {type(hp.get(key)).__name__}, not a config")
    try:
        (trust or Trust()).check(hp, f"cannot rebuild the stage of {path}", "hyper_parameters")
    except UntrustedTarget as exc:
        raise CheckpointError(str(exc)) from None
    parts = [("model", hp["model"], "classifier.1.")] if hp["kind"] in ("clean", "denoiser_stability") else []
    check_sizes(
        parts + ([("denoiser_net", hp["denoiser_net"], "denoiser.")] if hp["kind"] != "clean" else []), sd, path
    )
    try:
        module = StageModule(**hp)
        module.load_state_dict(sd)
    except InstantiationException as exc:
        raise CheckpointError(f"cannot rebuild the stage of {path}: {instantiation_message(exc)}") from None
    except (TypeError, ValueError, RuntimeError, KeyError, OverflowError) as exc:
        raise CheckpointError(f"cannot rebuild the stage of {path}: {_first_line(str(exc))}") from None
    return module


def ensure_stage(
    root: Path,
    kind: str,
    name: str,
    hparams: dict,
    datamodule,
    epochs: int,
    make_trainer,
    init: dict | None = None,
    seed: int = 0,
) -> Path:
    """The checkpoint of a finished stage with these settings, training (or resuming) it if needed.

    ``make_trainer(**kwargs)`` builds the Lightning Trainer (the run's trainer config);
    ``init``: state-dict entries loaded into a fresh module before training (e.g. the frozen F).
    """
    settings = {**hparams, "epochs": int(epochs), "seed": int(seed), "init": sorted(init or {})}
    if init:
        settings["init_from"] = init.get("_source", "")
    out = stage_dir(root, kind, name, settings)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # parallel jobs needing the same stage: one trains, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_stage(out, kind, hparams, datamodule, epochs, make_trainer, init, seed, settings)


def _train_stage(out, kind, hparams, datamodule, epochs, make_trainer, init, seed, settings) -> Path:
    ckpt = out / "last.ckpt"
    if (out / "done.json").is_file() and ckpt.is_file():
        log.info("reusing stage %s (%s)", kind, out)
        return ckpt
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "settings.json", json.dumps(settings, indent=2, sort_keys=True) + "\n")
    log.info("training stage %s for %d epochs into %s", kind, epochs, out)
    pl.seed_everything(seed, workers=True, verbose=False)
    module = StageModule(kind=kind, seed=seed, **hparams)
    if init:
        missing = module.load_state_dict({k: v for k, v in init.items() if k != "_source"}, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"stage {kind}: unexpected weights {missing.unexpected_keys[:3]}")
    trainer = make_trainer(
        max_epochs=int(epochs),
        default_root_dir=str(out),
        logger=False,
        limit_val_batches=0,
        check_val_every_n_epoch=1,
        callbacks=[epoch_checkpoint(out)],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt.is_file() else None, weights_only=True)
    if trainer.global_rank == 0:
        write_text_atomic(out / "done.json", json.dumps({"epochs": int(epochs)}) + "\n")
    return ckpt
