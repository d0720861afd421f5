"""Reading, checking and translating the checkpoints of :class:`ssn_exp.lightning.module.SmoothedTraining` (layer 2).

A checkpoint is data: before anything is built from it, :func:`checked_hparams` checks its hyper-parameters (structure,
types, the data set's facts, every ``_target_`` against :class:`ssn_exp.trust.Trust`) and :func:`check_sizes` builds
its networks on the meta device against the weights it stores; checkpoints of the layout before (``training`` a name,
``stability_weight`` a number, a denoiser config without ``_target_``) are read as what they meant
(:func:`current_layout`). :func:`ssn_exp.lightning.module.load_checkpoint` rebuilds the module from them.
"""

from __future__ import annotations

import math
import re

import torch
from hydra.utils import instantiate
from torch import nn

from ssn_exp.models import CheckpointError, Denoised
from ssn_exp.trust import Trust, UntrustedTarget

__all__ = [
    "CheckpointMismatch",
    "checked_hparams",
    "check_normalization",
    "check_sizes",
    "current_layout",
    "short_repr",
]

#: A training or denoiser name: it names the run folder and the report's columns.
_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not belong to the requested method / sigma / seed / data."""


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
                f"{where}: hyper_parameters.training is {short_repr(training)}, it must be a training config "
                f"(name, objective) or, in a checkpoint of an older ssn_exp, one of {list(_LEGACY_OBJECTIVES)}"
            )
        weight = hp.pop("stability_weight", 6.0)
        if not _is_real(weight):
            raise CheckpointError(
                f"{where}: hyper_parameters.stability_weight is {short_repr(weight)}, it must be a finite number"
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
                f"{where}: hyper_parameters.denoiser is {short_repr(den)}, it must be a denoiser variant's config "
                f"(_target_, name) or, in a checkpoint of an older ssn_exp, one named one of {list(_LEGACY_DENOISERS)}"
            )
        if has_net and (not isinstance(den.get("net"), dict) or "_target_" not in den["net"]):
            raise CheckpointError(f"{where}: hyper_parameters.denoiser.net must be a _target_ config (the denoiser)")
        hp["denoiser"] = {"_target_": target, **den}
    return hp


_HPARAMS = ("model", "method", "data", "training", "optimizer", "scheduler", "denoiser", "seed")
#: hyper-parameters of the layout before issue 17 (read by :func:`current_layout`)
_LEGACY_HPARAMS = ("stability_weight",)
#: A larger image than any data set of ours (3 x 2048 x 2048 is 12.6M values): refused before DSSN allocates v.
_MAX_NUMEL = 2**24


def short_repr(value) -> str:
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
        raise CheckpointError(f"{where}: hyper_parameters.data.{key} is {short_repr(data.get(key))}, it must be {want}")


def checked_hparams(ckpt, path, trust: Trust | None = None) -> dict:
    """The hyper-parameters of an ssn_exp checkpoint read by :func:`read_checkpoint`, checked before anything is
    built from them: their structure and types (a :class:`CheckpointError` naming the key and the real cause)
    and every ``_target_`` at any depth (:class:`ssn_exp.trust.Trust`; default: ssn_exp's own targets only)."""
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
        raise CheckpointError(f"{where}: hyper_parameters.data is {short_repr(hp['data'])}, it must be a data config")
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
            raise CheckpointError(f"{where}: hyper_parameters.{key} is {short_repr(hp[key])}, it must be {want}")
    if den.get("net") is not None and not _is_target(den["net"]):
        raise CheckpointError(f"{where}: hyper_parameters.denoiser.net must be a _target_ config (the denoiser)")
    # the noise was built for the data set: a stored data config edited apart from it is refused
    data, method = hp["data"], hp["method"]
    numel = data["shape"][0] * data["shape"][1] * data["shape"][2]
    for key, want in (("q", data["q"]), ("dim", numel)):
        if key in method and method[key] != want:
            raise CheckpointError(
                f"{where}: hyper_parameters.method.{key}={short_repr(method[key])} does not fit the stored data set "
                f"({data['name']}: {key} {want}); the checkpoint was edited"
            )
    try:
        (trust or Trust()).check(hp, f"cannot rebuild the model of {path}", "hyper_parameters")
    except UntrustedTarget as exc:
        raise CheckpointError(str(exc)) from None
    return dict(hp)


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


def check_normalization(module, path) -> None:
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
