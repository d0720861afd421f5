"""The LightningModule (layer 2): a base classifier trained under a smoothing method's noise.

Everything needed to rebuild the model and its noise is saved as hyper-parameters inside every
checkpoint: the resolved ``model`` and ``method`` configs (``_target_`` dicts), the data set's config
and facts, the training (its name and its objective's ``_target_`` config, :mod:`ssn_exp.lightning.objectives`),
the optimizer and scheduler configs, the denoiser variant's config (:mod:`ssn_exp.lightning.denoisers`) and the
seed. See :func:`load_checkpoint` (``weights_only=True``); checkpoints of the layout before (``training`` a name,
``stability_weight`` a number, a denoiser config without ``_target_``) are read as what they meant
(:func:`ssn_exp.lightning.checkpoint.current_layout`, with the checks of a checkpoint).

Reproducibility: the training noise, the global torch RNG (dropout) and the validation noise are
seeded from (seed, rank, epoch, batch), and the data order and augmentation from
(seed, epoch, example) (:mod:`ssn_exp.lightning.data`): a run resumed from an epoch checkpoint ends
exactly where an uninterrupted run ends.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from ssn_exp.exceptions import _first_line, instantiation_message
from ssn_exp.lightning.checkpoint import (
    CheckpointMismatch,
    check_normalization,
    check_sizes,
    checked_hparams,
    current_layout,
    short_repr,
)
from ssn_exp.lightning.data import mix_seed
from ssn_exp.lightning.objectives import Objective, checked_step
from ssn_exp.models import CheckpointError, Denoised, normalized, read_checkpoint
from ssn_exp.noises import Noise
from ssn_exp.trust import Trust

__all__ = ["SmoothedTraining", "load_checkpoint", "build_classifier", "semantic_data"]

_STREAM_NOISE, _STREAM_GLOBAL, _STREAM_VAL = 1, 2, 3
#: The training of a module built without one: cross-entropy on one noisy sample (conf/training/standard.yaml).
STANDARD = {"name": "standard", "objective": {"_target_": "ssn_exp.lightning.objectives.Standard"}}
NO_DENOISER = {"_target_": "ssn_exp.lightning.denoisers.NoDenoiser", "name": "none"}
#: Data settings that do not change results: a run may resume with other values, and stages are shared across them.
DATA_NON_SEMANTIC = ("num_workers", "eval_batch_size", "root", "train_root", "val_root", "download")


def build_classifier(model: dict, data: dict, denoiser_net: dict | None = None) -> nn.Module:
    """``Normalize(data mean, std)`` + the network of the ``model`` config (+ a denoiser in front: F o D)."""
    net = normalized(instantiate(model), data["mean"], data["std"])
    if denoiser_net is not None:
        net = Denoised(instantiate(denoiser_net), net)
    return net


def semantic_data(data: dict) -> dict:
    """A data config without the settings that do not change results (:data:`DATA_NON_SEMANTIC`)."""
    return {k: v for k, v in dict(data or {}).items() if k not in DATA_NON_SEMANTIC}


class SmoothedTraining(pl.LightningModule):
    """Train the ``model`` config's network on noisy samples of the ``method`` config's noise.

    ``training``: ``{"name": ..., "objective": <_target_ config>}``; the objective
    (:class:`ssn_exp.lightning.objectives.Objective`, e.g. ``Standard`` or ``Stability``) gives each training step's
    loss. ``denoiser``: the denoiser variant's config (:mod:`ssn_exp.lightning.denoisers`); with a ``net`` the model is
    F o D. ``data`` is the resolved data config (its facts ``name, q, num_classes, shape, mean, std``). The layout
    before (``training="stability", stability_weight=6.0``) is accepted too (:func:`current_layout`).
    """

    def __init__(
        self,
        *,
        model: dict,
        method: dict,
        data: dict,
        training: dict | str | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        denoiser: dict | None = None,
        seed: int = 0,
        stability_weight: float | None = None,
    ):
        super().__init__()
        old = {"training": training or STANDARD, "denoiser": denoiser or NO_DENOISER}
        if stability_weight is not None:
            old["stability_weight"] = stability_weight
        hp = current_layout(old)
        training, denoiser = hp["training"], hp["denoiser"]
        if not isinstance(training, dict) or not isinstance(training.get("objective"), dict):
            raise ValueError(f"training must be a config with a name and an objective, got {short_repr(training)}")
        hparams = dict(model=model, method=method, data=data, training=training, optimizer=optimizer,
                       scheduler=scheduler, denoiser=denoiser, seed=seed)  # fmt: skip
        self.save_hyperparameters(hparams, logger=False)
        self.model = build_classifier(model, data, denoiser.get("net") or None)
        self.smoothing: Noise = instantiate(method)
        if not isinstance(self.smoothing, Noise):
            raise TypeError(
                f"the method config builds {type(self.smoothing).__name__}, not an ssn_exp noise (ssn_exp.noises.Noise)"
            )
        self.objective: Objective = instantiate(training["objective"])
        if not isinstance(self.objective, Objective):
            raise TypeError(
                f"the training objective config builds {type(self.objective).__name__}, not a training objective "
                "(ssn_exp.lightning.objectives.Objective)"
            )
        self._generators: dict = {}

    # -- randomness ----------------------------------------------------------------------
    def _generator(self, stream: int, *parts: int) -> torch.Generator:
        key = (stream, str(self.device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=self.device)
        return self._generators[key].manual_seed(mix_seed(self.hparams.seed, stream, self.global_rank, *parts))

    def on_train_batch_start(self, batch, batch_idx):
        torch.manual_seed(mix_seed(self.hparams.seed, _STREAM_GLOBAL, self.global_rank, self.current_epoch, batch_idx))

    # -- training ------------------------------------------------------------------------
    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        g = self._generator(_STREAM_NOISE, self.current_epoch, batch_idx)
        out = self.objective.loss(self, self.smoothing, x, y, g)
        loss, logits, logs = checked_step(self.objective, out, len(y))
        for key, value in logs.items():
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, sync_dist=True, logger=False)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, logger=False)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/acc_noisy", acc, on_step=False, on_epoch=True, sync_dist=True, logger=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(self.smoothing.sample(x, self._generator(_STREAM_VAL, self.current_epoch, batch_idx)))
        self.log("val/loss_noisy", F.cross_entropy(logits, y), sync_dist=True, logger=False)
        self.log("val/acc_noisy", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True, logger=False)

    def configure_optimizers(self):
        hp = self.hparams
        opt_cfg = hp.optimizer or {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
        opt = instantiate(opt_cfg)(self.parameters())
        if not hp.scheduler:
            return opt
        sched = instantiate(hp.scheduler)(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # -- identity ------------------------------------------------------------------------
    def identity(self) -> dict:
        hp, sm = self.hparams, self.smoothing
        return {
            "method": sm.name,
            "sigma": float(sm.sigma),
            "q": int(hp.data["q"]),
            "seed": int(sm.describe().get("seed", hp.seed)),  # DSSN: the seed of its fixed vector v
            "dataset": hp.data["name"],
            "training": hp.training["name"],
            "denoiser": hp.denoiser["name"],
            "model": hp.model.get("_target_", "?"),
        }


def load_checkpoint(path: str | Path, expect: dict | None = None, trust: Trust | None = None) -> SmoothedTraining:
    """Rebuild a trained module from an ssn_exp checkpoint (``weights_only=True``), in eval mode.

    ``expect``: identity fields (method, sigma, q, seed, dataset, ...) the caller requires; any
    disagreement raises :class:`CheckpointMismatch` naming the fields. ``trust``: the callables its configs may
    name beyond ssn_exp's own (:class:`ssn_exp.trust.Trust`, e.g. ``Trust.from_config(cfg)``); nothing is built
    before every ``_target_`` in it is checked (:func:`checked_hparams`). Every other problem (unreadable file,
    pickled objects, not an ssn_exp checkpoint, a missing or ill-typed hyper-parameter, an untrusted or unknown
    target, weights that do not fit) raises :class:`CheckpointError` with a one-line message.
    """
    from hydra.errors import InstantiationException

    ckpt = read_checkpoint(path)
    hp = checked_hparams(ckpt, path, trust)
    den_net = hp["denoiser"].get("net")
    parts = [("model", hp["model"], "model.1." if den_net is None else "model.classifier.1.")]
    if den_net is not None:
        parts.append(("denoiser.net", den_net, "model.denoiser."))
    check_sizes(parts, ckpt["state_dict"], path)
    try:
        module = SmoothedTraining(**hp)
    except InstantiationException as exc:
        raise CheckpointError(f"cannot rebuild the model of {path}: {instantiation_message(exc)}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"cannot rebuild the model of {path}: {_first_line(str(exc))}") from None
    if expect:
        have = module.identity()
        diff = []
        for key, want in expect.items():
            if want is None or key not in have:
                continue
            got = have[key]
            same = abs(float(got) - float(want)) < 1e-9 if isinstance(got, float) else str(got) == str(want)
            if not same:
                diff.append(f"{key}: checkpoint has {got!r}, requested {want!r}")
        if diff:
            raise CheckpointMismatch(f"checkpoint {path} does not match the request ({'; '.join(diff)})")
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), _first_line(str(exc)))
        raise CheckpointError(f"the weights in {path} do not fit its model: {detail}") from None
    check_normalization(module, path)
    return module.eval()
