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
from ssn_exp.noises import Noise
from ssn_exp.trust import Trust, UntrustedTarget

__all__ = [
    "SmoothedTraining",
    "load_checkpoint",
    "checked_hparams",
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
        self.smoothing: Noise = instantiate(method)
        if not isinstance(self.smoothing, Noise):
            raise TypeError(f"the method config builds {type(self.smoothing).__name__}, not an ssn_exp noise (ssn_exp.noises.Noise)")
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


_HPARAMS = ("model", "method", "data", "training", "stability_weight", "optimizer", "scheduler", "denoiser", "seed")
#: A larger image than any data set of ours (3 x 2048 x 2048 is 12.6M values): refused before DSSN allocates v.
_MAX_NUMEL = 2**24


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value, low: int, high: int | None = None) -> bool:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    return ok and (high is None or value < high)


def _is_real(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_data_facts(data: dict, where: str) -> None:
    """The data set's facts in a stored data config (what the model and the noise were built for)."""
    bad = None
    shape = data.get("shape")
    if not isinstance(data.get("name"), str) or not data["name"]:
        bad = "name", "a non-empty string"
    elif not _is_int(data.get("q"), 1, 2**31):
        bad = "q", "an integer >= 1"
    elif not _is_int(data.get("num_classes"), 2, 2**31):
        bad = "num_classes", "an integer >= 2"
    elif not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(s, 1, 2**31) for s in shape):
        bad = "shape", "[C, H, W] (three integers >= 1)"
    elif shape[0] * shape[1] * shape[2] > _MAX_NUMEL:
        bad = "shape", f"at most {_MAX_NUMEL:,} values per image"
    else:
        for key in ("mean", "std"):
            v = data.get(key)
            if not isinstance(v, list) or len(v) != shape[0] or not all(_is_real(x) for x in v):
                bad = key, f"a list of {shape[0]} finite numbers (one per channel)"
                break
        else:
            if min(data["std"]) <= 0:
                bad = "std", "positive"
    if bad is not None:
        key, want = bad
        raise CheckpointError(f"{where}: hyper_parameters.data.{key} is {_short(data.get(key))}, it must be {want}")


def checked_hparams(ckpt, path, trust: Trust | None = None) -> dict:
    """The hyper-parameters of an ssn_exp checkpoint read by :func:`read_checkpoint`, checked before anything is
    built from them: their structure and types (a :class:`CheckpointError` naming the key and the real cause)
    and every ``_target_`` at any depth (:class:`ssn_exp.trust.Trust`; default: ssn_exp's own targets only)."""
    import torch

    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an ssn_exp checkpoint (no hyper-parameters / state_dict)")
    hp, sd = ckpt["hyper_parameters"], ckpt["state_dict"]
    if not isinstance(hp, dict):
        raise CheckpointError(f"{path} is not an ssn_exp checkpoint: its hyper_parameters is a {type(hp).__name__}")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path} is not an ssn_exp checkpoint: its state_dict is not a dict of named tensors")
    older = f"{path} was written by an older ssn_exp"
    for key in ("model", "method"):
        if not isinstance(hp.get(key), dict) or "_target_" not in hp[key]:
            got = "none" if key not in hp else f"a {type(hp[key]).__name__}"
            raise CheckpointError(
                f"{older} (its {key} config is {got}, not a _target_ config); retrain it with this version"
            )
    unknown = sorted(str(k) for k in hp if k not in _HPARAMS)
    if unknown:
        raise CheckpointError(f"{path} has hyper-parameters this ssn_exp does not know ({', '.join(unknown)})")
    missing = [k for k in _HPARAMS if k not in hp]
    if missing:
        hint = " (it would silently use seed 0)" if "seed" in missing else ""
        raise CheckpointError(
            f"{older}: it lacks hyper-parameter(s) {', '.join(missing)}{hint}; retrain it with this version"
        )
    where = str(path)
    if not isinstance(hp["data"], dict):
        raise CheckpointError(f"{where}: hyper_parameters.data is {_short(hp['data'])}, it must be a data config")
    _check_data_facts(hp["data"], where)
    checks = (
        ("training", hp["training"] in TRAININGS, f"one of {list(TRAININGS)}"),
        ("stability_weight", _is_real(hp["stability_weight"]), "a finite number"),
        ("seed", _is_int(hp["seed"], 0, 2**32), "an integer in [0, 2**32)"),
        ("optimizer", hp["optimizer"] is None or isinstance(hp["optimizer"], dict), "null or a _target_ config"),
        ("scheduler", hp["scheduler"] is None or isinstance(hp["scheduler"], dict), "null or a _target_ config"),
        ("denoiser", isinstance(hp["denoiser"], dict) and hp["denoiser"].get("name") in DENOISERS,
         f"a denoiser config named one of {list(DENOISERS)}"),
    )  # fmt: skip
    for key, ok, want in checks:
        if not ok:
            raise CheckpointError(f"{where}: hyper_parameters.{key} is {_short(hp[key])}, it must be {want}")
    den = hp["denoiser"]
    if den["name"] != "none" and (not isinstance(den.get("net"), dict) or "_target_" not in den["net"]):
        raise CheckpointError(f"{where}: hyper_parameters.denoiser.net must be a _target_ config (the denoiser)")
    # the noise was built for the data set: a stored data config edited apart from it is refused
    data, method = hp["data"], hp["method"]
    numel = data["shape"][0] * data["shape"][1] * data["shape"][2]
    for key, want in (("q", data["q"]), ("dim", numel)):
        if key in method and method[key] != want:
            raise CheckpointError(
                f"{where}: hyper_parameters.method.{key}={_short(method[key])} does not fit the stored data set "
                f"({data['name']}: {key} {want}); the checkpoint was edited"
            )
    try:
        (trust or Trust()).check(hp, f"cannot rebuild the model of {path}", "hyper_parameters")
    except UntrustedTarget as exc:
        raise CheckpointError(str(exc)) from None
    return dict(hp)


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
    _check_sizes(hp, ckpt["state_dict"], path)
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
    _check_normalization(module, path)
    return module.eval()


def _check_sizes(hp: dict, state_dict: dict, path) -> None:
    """Build the networks of the stored configs on the meta device (no memory) and compare their weights' shapes with
    the file's: a config that asks for a network larger than the weights it comes with is refused before anything is
    allocated (the file's size bounds what loading it costs)."""
    den = hp["denoiser"]
    parts = [("model", hp["model"], "model.1." if den["name"] == "none" else "model.classifier.1.")]
    if den["name"] != "none":
        parts.append(("denoiser.net", den["net"], "model.denoiser."))
    for key, cfg, prefix in parts:
        try:
            with torch.device("meta"):
                net = instantiate(cfg)
        except Exception:  # noqa: BLE001 - built for real next, where its error is reported
            continue
        if not isinstance(net, nn.Module):
            continue
        for name, want in net.state_dict().items():
            have = state_dict.get(prefix + name)
            if have is None or tuple(have.shape) != tuple(want.shape):
                found = "nothing" if have is None else list(have.shape)
                raise CheckpointError(
                    f"the weights in {path} do not fit its model: size mismatch for {prefix + name}: the file has "
                    f"{found}, the {key} config builds {list(want.shape)}"
                )


def _check_normalization(module: SmoothedTraining, path) -> None:
    """The stored data config's mean / std must be the normalisation the weights were trained with (the first layer's
    buffers, saved with the weights): a data config edited apart from the weights is refused."""
    net = module.model.classifier if isinstance(module.model, Denoised) else module.model
    norm, data = net[0], module.hparams.data
    for key in ("mean", "std"):
        stored = torch.tensor(data[key], dtype=torch.float32)
        trained = getattr(norm, key).reshape(-1)
        if trained.shape != stored.shape or not torch.allclose(trained, stored, rtol=1e-6, atol=1e-7):
            raise CheckpointError(
                f"{path}: hyper_parameters.data.{key} {list(data[key])} is not the normalisation its weights were "
                f"trained with ({[round(float(v), 6) for v in trained]}); the checkpoint was edited"
            )
