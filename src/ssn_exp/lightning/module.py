"""The LightningModule (layer 2): a base classifier trained under a smoothing method's noise.

Everything needed to rebuild the model and its noise is saved as hyper-parameters inside every
checkpoint: the resolved ``model`` and ``method`` configs (``_target_`` dicts), the data set's config
and facts, the training (its name and its objective's ``_target_`` config, :mod:`ssn_exp.lightning.objectives`),
the optimizer and scheduler configs, the denoiser variant's config (:mod:`ssn_exp.lightning.denoisers`) and the
seed. See :func:`load_checkpoint` (``weights_only=True``); checkpoints of the layout before (``training`` a name,
``stability_weight`` a number, a denoiser config without ``_target_``) are read as what they meant
(:func:`current_layout`).

Reproducibility: the training noise, the global torch RNG (dropout) and the validation noise are
seeded from (seed, rank, epoch, batch), and the data order and augmentation from
(seed, epoch, example) (:mod:`ssn_exp.lightning.data`): a run resumed from an epoch checkpoint ends
exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from ssn_exp.exceptions import _first_line, instantiation_message
from ssn_exp.lightning.data import mix_seed
from ssn_exp.lightning.objectives import Objective, checked_step, stability_loss
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
    "check_sizes",
    "current_layout",
    "semantic_data",
    "stability_loss",
]

_STREAM_NOISE, _STREAM_GLOBAL, _STREAM_VAL = 1, 2, 3
#: The training of a module built without one: cross-entropy on one noisy sample (conf/training/standard.yaml).
STANDARD = {"name": "standard", "objective": {"_target_": "ssn_exp.lightning.objectives.Standard"}}
NO_DENOISER = {"_target_": "ssn_exp.lightning.denoisers.NoDenoiser", "name": "none"}
#: Data settings that do not change results: a run may resume with other values, and stages are shared across them.
DATA_NON_SEMANTIC = ("num_workers", "eval_batch_size", "root", "train_root", "val_root", "download")
#: A training or denoiser name: it names the run folder and the report's columns.
_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not belong to the requested method / sigma / seed / data."""


def build_classifier(model: dict, data: dict, denoiser_net: dict | None = None) -> nn.Module:
    """``Normalize(data mean, std)`` + the network of the ``model`` config (+ a denoiser in front: F o D)."""
    net = normalized(instantiate(model), data["mean"], data["std"])
    if denoiser_net is not None:
        net = Denoised(instantiate(denoiser_net), net)
    return net


def semantic_data(data: dict) -> dict:
    """A data config without the settings that do not change results (:data:`DATA_NON_SEMANTIC`)."""
    return {k: v for k, v in dict(data or {}).items() if k not in DATA_NON_SEMANTIC}


# -- the layout before issue 17, read as what it meant ---------------------------------------------------------------
#: ``training`` was one of these names, now a {name, objective} config: (its objective, whether ``stability_weight``
#: was its weight).
_LEGACY_OBJECTIVES = {
    "standard": ("ssn_exp.lightning.objectives.Standard", False),
    "stability": ("ssn_exp.lightning.objectives.Stability", True),
}
#: ``denoiser`` was a config named one of these, without ``_target_``; all but ``none`` held a ``net``.
_LEGACY_DENOISERS = {
    "none": ("ssn_exp.lightning.denoisers.NoDenoiser", False),
    "stability": ("ssn_exp.lightning.denoisers.StabilityDenoiser", True),
    "mse": ("ssn_exp.lightning.denoisers.MSEDenoiser", True),
    "mse_retrain": ("ssn_exp.lightning.denoisers.MSERetrain", True),
}


def current_layout(hp: dict, where: str = "the module") -> dict:
    """The hyper-parameters ``hp`` in today's layout: a checkpoint written before training objectives and denoiser
    variants were built from ``_target_`` (``training`` a name plus ``stability_weight``; a ``denoiser`` config without
    ``_target_``) becomes the configs of ``conf/training`` and ``conf/denoiser`` that it meant; today's layout is
    returned as it is. The only place that knows the old names. Raises :class:`CheckpointError` naming the key."""
    hp = dict(hp)
    training = hp.get("training")
    if isinstance(training, str):
        if training not in _LEGACY_OBJECTIVES:
            raise CheckpointError(
                f"{where}: hyper_parameters.training is {_short(training)}, it must be a training config "
                f"(name, objective) or, in a checkpoint of an older ssn_exp, one of {list(_LEGACY_OBJECTIVES)}"
            )
        weight = hp.pop("stability_weight", 6.0)
        if not _is_real(weight):
            raise CheckpointError(
                f"{where}: hyper_parameters.stability_weight is {_short(weight)}, it must be a finite number"
            )
        target, weighted = _LEGACY_OBJECTIVES[training]
        objective = {"_target_": target, "weight": float(weight)} if weighted else {"_target_": target}
        hp["training"] = {"name": training, "objective": objective}
    den = hp.get("denoiser")
    if isinstance(den, dict) and "_target_" not in den:
        name = den.get("name")
        target, has_net = _LEGACY_DENOISERS.get(name, (None, False)) if isinstance(name, str) else (None, False)
        if target is None:
            raise CheckpointError(
                f"{where}: hyper_parameters.denoiser is {_short(den)}, it must be a denoiser variant's config "
                f"(_target_, name) or, in a checkpoint of an older ssn_exp, one named one of {list(_LEGACY_DENOISERS)}"
            )
        if has_net and (not isinstance(den.get("net"), dict) or "_target_" not in den["net"]):
            raise CheckpointError(f"{where}: hyper_parameters.denoiser.net must be a _target_ config (the denoiser)")
        hp["denoiser"] = {"_target_": target, **den}
    return hp


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
            raise ValueError(f"training must be a config with a name and an objective, got {_short(training)}")
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


_HPARAMS = ("model", "method", "data", "training", "optimizer", "scheduler", "denoiser", "seed")
#: hyper-parameters of the layout before issue 17 (read by :func:`current_layout`)
_LEGACY_HPARAMS = ("stability_weight",)
#: A larger image than any data set of ours (3 x 2048 x 2048 is 12.6M values): refused before DSSN allocates v.
_MAX_NUMEL = 2**24


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value, low: int, high: int | None = None) -> bool:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    return ok and (high is None or value < high)


def _is_name(value) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def _is_target(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("_target_"), str)


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
    unknown = sorted(str(k) for k in hp if k not in _HPARAMS + _LEGACY_HPARAMS)
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
    if "stability_weight" in hp and not isinstance(hp["training"], str):
        raise CheckpointError(f"{path} has hyper-parameters this ssn_exp does not know (stability_weight)")
    hp = current_layout(hp, where)
    training, den = hp["training"], hp["denoiser"]
    checks = (
        ("training", isinstance(training, dict) and set(training) == {"name", "objective"}
         and _is_name(training["name"]) and _is_target(training["objective"]),
         "a training config: a name (letters, digits, _ . + -) and an objective (a _target_ config)"),
        ("seed", _is_int(hp["seed"], 0, 2**32), "an integer in [0, 2**32)"),
        ("optimizer", hp["optimizer"] is None or isinstance(hp["optimizer"], dict), "null or a _target_ config"),
        ("scheduler", hp["scheduler"] is None or isinstance(hp["scheduler"], dict), "null or a _target_ config"),
        ("denoiser", isinstance(den, dict) and _is_target(den) and _is_name(den.get("name")),
         "a denoiser variant's config: a _target_ and a name (letters, digits, _ . + -)"),
    )  # fmt: skip
    for key, ok, want in checks:
        if not ok:
            raise CheckpointError(f"{where}: hyper_parameters.{key} is {_short(hp[key])}, it must be {want}")
    if den.get("net") is not None and not _is_target(den["net"]):
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
    _check_normalization(module, path)
    return module.eval()


class _Budget:
    """While active, every module, parameter and buffer created is counted (torch's global registration hooks); past
    the budget the build is stopped (:class:`OverflowError` from the hook). The budget comes from the file: the number
    of tensors it stores for the network, so checking a file costs at most a multiple of its size (on the meta device
    a tensor's size costs nothing; the number of modules and tensors does)."""

    def __init__(self, tensors: int):
        self.limits = (2 * tensors + 64, 16 * tensors + 1024)
        self.counts = [0, 0]
        self.exceeded = False

    def _add(self, i: int) -> None:
        self.counts[i] += 1
        if self.counts[i] > self.limits[i]:
            self.exceeded = True
            raise OverflowError("the network is larger than the weights stored for it")

    def _tensor(self, module, name, tensor):
        self._add(0)

    def _module(self, module, name, submodule):
        self._add(1)

    def __enter__(self):
        from torch.nn.modules import module as m

        self._handles = [
            m.register_module_parameter_registration_hook(self._tensor),
            m.register_module_buffer_registration_hook(self._tensor),
            m.register_module_module_registration_hook(self._module),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def check_sizes(parts, state_dict: dict, path) -> None:
    """Build the networks of the stored configs (``parts``: (key, config, state-dict prefix of its weights)) on the meta device (no memory) and compare their weights' shapes with
    the file's: a config that asks for a network larger than the weights it comes with is refused before anything is
    allocated, and its build is stopped once it outgrows them (:class:`_Budget`: a WideResNet of depth 10^6 in a
    584 KB file), so the file's size bounds what checking and loading it costs."""
    for key, cfg, prefix in parts:
        stored = [t for name, t in state_dict.items() if name.startswith(prefix)]
        budget = _Budget(len(stored))
        try:
            with torch.device("meta"), budget:
                net = instantiate(cfg)
        except Exception:  # noqa: BLE001 - built for real next, where its error is reported
            if budget.exceeded:
                raise CheckpointError(
                    f"the weights in {path} do not fit its model: the {key} config builds a network of more modules "
                    f"and tensors than the {len(stored)} tensors stored for it"
                ) from None
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
