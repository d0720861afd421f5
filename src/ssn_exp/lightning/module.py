"""The LightningModule (layer 2): a base classifier trained under a smoothing method's noise.

Everything needed to rebuild the model and its noise is saved as hyper-parameters inside every
checkpoint: the resolved ``model`` and ``method`` configs (``_target_`` dicts), the data set's config
and facts, the training objective, the optimizer and scheduler configs, the denoiser and the seed.
See :func:`load_checkpoint` (``weights_only=True``).

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
from ssn_exp.lightning.data import mix_seed
from ssn_exp.models import CheckpointError, Denoised, normalized, read_checkpoint
from ssn_exp.smoothing import Smoothing

__all__ = [
    "SmoothedTraining",
    "load_checkpoint",
    "read_checkpoint",
    "CheckpointError",
    "CheckpointMismatch",
    "build_classifier",
    "TRAININGS",
    "DENOISERS",
    "stability_loss",
]

TRAININGS = ("standard", "stability")
DENOISERS = ("none", "stability", "mse", "mse_retrain")
_STREAM_NOISE, _STREAM_GLOBAL, _STREAM_VAL = 1, 2, 3


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not belong to the requested method / sigma / seed / data."""


def build_classifier(model: dict, data: dict, denoiser_net: dict | None = None) -> nn.Module:
    """``Normalize(data mean, std)`` + the network of the ``model`` config (+ a denoiser in front: F o D)."""
    net = normalized(instantiate(model), data["mean"], data["std"])
    if denoiser_net is not None:
        net = Denoised(instantiate(denoiser_net), net)
    return net


def stability_loss(logits: torch.Tensor, logits2: torch.Tensor, y: torch.Tensor, weight: float):
    """Stability training: CE(f(x1), y) + weight * KL(softmax f(x1) || softmax f(x2)); returns (loss, kl).

    KL(P || Q) with P = softmax f(x1) (the sample the cross-entropy sees) and Q = softmax f(x2), averaged
    over the batch: ``F.kl_div(log Q, log P, log_target=True)``.
    """
    kl = F.kl_div(F.log_softmax(logits2, 1), F.log_softmax(logits, 1), reduction="batchmean", log_target=True)
    return F.cross_entropy(logits, y) + weight * kl, kl


class SmoothedTraining(pl.LightningModule):
    """Train the ``model`` config's network on noisy samples of the ``method`` config's noise.

    - ``training="standard"``: cross-entropy on one noisy sample per example;
    - ``training="stability"``: :func:`stability_loss` on two independent noisy samples.
    ``data`` is the resolved data config (its facts ``name, q, num_classes, shape, mean, std``).
    """

    def __init__(
        self,
        *,
        model: dict,
        method: dict,
        data: dict,
        training: str = "standard",
        stability_weight: float = 6.0,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        denoiser: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if training not in TRAININGS:
            raise ValueError(f"unknown training {training!r}; choose one of {list(TRAININGS)}")
        denoiser = denoiser or {"name": "none"}
        if denoiser.get("name") not in DENOISERS:
            raise ValueError(f"unknown denoiser {denoiser.get('name')!r}; choose one of {list(DENOISERS)}")
        self.save_hyperparameters(logger=False)
        self.model = build_classifier(model, data, denoiser.get("net") if denoiser["name"] != "none" else None)
        self.smoothing: Smoothing = instantiate(method)
        if not isinstance(self.smoothing, Smoothing):
            raise TypeError(f"the method config builds {type(self.smoothing).__name__}, not an ssn_exp Smoothing")
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
        if self.hparams.training == "standard":
            logits = self(self.smoothing.sample(x, g))
            loss = F.cross_entropy(logits, y)
        else:
            logits, logits2 = self(self.smoothing.sample(torch.cat([x, x]), g)).chunk(2)
            loss, kl = stability_loss(logits, logits2, y, self.hparams.stability_weight)
            self.log("train/kl", kl, on_step=False, on_epoch=True, sync_dist=True, logger=False)
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
            "seed": int(getattr(sm, "seed", hp.seed)),
            "dataset": hp.data["name"],
            "training": hp.training,
            "denoiser": hp.denoiser["name"],
            "model": hp.model.get("_target_", "?"),
        }


def load_checkpoint(path: str | Path, expect: dict | None = None) -> SmoothedTraining:
    """Rebuild a trained module from an ssn_exp checkpoint (``weights_only=True``), in eval mode.

    ``expect``: identity fields (method, sigma, q, seed, dataset, ...) the caller requires; any
    disagreement raises :class:`CheckpointMismatch` naming the fields. Every other problem (unreadable
    file, pickled objects, not an ssn_exp checkpoint, an unknown model target, weights that do not fit)
    raises :class:`CheckpointError` with a one-line message.
    """
    from hydra.errors import InstantiationException

    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an ssn_exp checkpoint (no hyper-parameters / state_dict)")
    hp = dict(ckpt["hyper_parameters"])
    if "model" not in hp or "method" not in hp or not isinstance(hp.get("model"), dict):
        raise CheckpointError(
            f"{path} was written by an older ssn_exp (no model config inside); retrain it with this version"
        )
    try:
        module = SmoothedTraining(**hp)
    except InstantiationException as exc:
        raise CheckpointError(f"cannot rebuild the model of {path}: {instantiation_message(exc)}") from None
    except (TypeError, ValueError) as exc:
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
    return module.eval()
