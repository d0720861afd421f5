"""Config plumbing for the entry points (layer 3): where the configs live, resolvers, validation and
building components from ``_target_`` with one-line errors that name the config file."""

from __future__ import annotations

import math
import numbers
import re
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssn_exp.exceptions import (  # (the value checks live there: every layer checks with them)
    ConfigError,
    check_bool,
    check_positive_int,
    check_seed,
    describe,
    instantiation_message,
)

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "register_resolvers",
    "config_source",
    "build",
    "check_sigma",
    "check_seed",
    "check_positive_int",
    "check_bool",
    "check_tag",
    "check_one_value",
    "check_certify_config",
    "given_overrides",
    "apply_deprecated",
    "container",
]

#: The package's configs (``ssn_exp/conf``): found the same way from a checkout and from an installed wheel.
CONF_DIR = str(resources.files("ssn_exp") / "conf")


def _path_tag(path) -> str:
    """A directory name for a checkpoint path (resolver ``${path_tag:...}``): its last parts, readable, and a short
    hash of the absolute path, so that two checkpoints never share a folder and the same one always finds its own."""
    import hashlib

    p = Path(str(path))
    parts = [x for x in p.with_suffix("").parts[-4:] if x not in ("/", "checkpoints")]
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts)).strip("_-") or "ckpt"
    digest = hashlib.sha1(str(p.expanduser().absolute()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def check_tag(tag) -> str:
    tag = "" if tag is None else str(tag)
    if tag and not re.fullmatch(r"[A-Za-z0-9_.=+-]+", tag):
        raise ConfigError(f"tag={tag!r} may only contain letters, digits and _ . = + -")
    return tag


def _tag_suffix(tag) -> str:
    """``${tag_suffix:${tag}}``: '' for no tag, else '-TAG' (the run directory's last part: sigma0.5-seed0-TAG)."""
    tag = check_tag(tag)
    return f"-{tag}" if tag else ""


def _numel(shape) -> int:
    """``${numel:${data.shape}}``: the number of values per example (C * H * W)."""
    return int(math.prod(int(s) for s in shape))


def _slurm_gpus(accelerator, devices, num_nodes) -> int:
    """``${slurm_gpus:${trainer.accelerator},${trainer.devices},...}`` (hydra/launcher=slurm): the GPUs a job asks
    for per node, the trainer's device count (0 on CPU and with accelerator=auto), so that the user states it once.
    One job is one Slurm task on one node whose ddp_spawn starts the processes (conf/trainer/ddp.yaml); several nodes are refused."""
    if num_nodes != 1:
        raise ConfigError(
            f"hydra/launcher=slurm runs a job on one node; trainer.num_nodes={num_nodes} is not supported "
            "(docs/scaling.md)"
        )
    if str(accelerator) in ("cpu", "auto"):  # auto (trainer=default) asks for none: trainer=gpu asks for one
        return 0
    if isinstance(devices, (list, ListConfig)):
        return len(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(
            f"hydra/launcher=slurm asks Slurm for trainer.devices GPUs per job: give it as a number "
            f"(e.g. trainer.devices=4), not {devices!r}"
        )
    return devices


def register_resolvers() -> None:
    resolvers = (("path_tag", _path_tag), ("tag_suffix", _tag_suffix), ("numel", _numel), ("slurm_gpus", _slurm_gpus))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def config_source(group: str) -> str:
    """The config file a group's option came from (e.g. ``.../conf/model/digits_cnn.yaml``), for error messages."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        option = hc.runtime.choices.get(group)
        sources = list(hc.runtime.config_sources)
    except (ValueError, AttributeError):
        return f"the {group} config"
    if option is None:
        return f"the {group} config"
    for src in reversed(sources):
        if src.schema == "file":
            path = Path(src.path) / group / f"{option}.yaml"
            if path.is_file():
                try:
                    return str(path.relative_to(Path.cwd()))
                except ValueError:
                    return str(path)
    return f"{group}/{option}.yaml"


def build(node: DictConfig, group: str, **kwargs):
    """``hydra.utils.instantiate(node)``; a failure becomes a :class:`ConfigError` naming the config file."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{config_source(group)} has no _target_: it must name the class or function that builds it")
    if "default_root_dir" in kwargs:
        refuse_hpc_checkpoints(Path(kwargs["default_root_dir"]))
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        raise ConfigError(f"cannot build {group} from {config_source(group)}: {instantiation_message(exc)}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build {group} from {config_source(group)}: {describe(exc)}") from None
    except OmegaConfBaseException as exc:  # a value it reads is ??? (or an interpolation of one) or cannot resolve
        from ssn_exp.cli.messages import one_line

        raise ConfigError(f"cannot build {group} from {config_source(group)}: {one_line(exc)}") from None


def refuse_hpc_checkpoints(root: Path) -> None:
    """Lightning's ``fit``/``predict`` with no checkpoint, inside a Slurm job, loads ``hpc_ckpt_<n>.ckpt`` from the
    trainer's root folder before anything of ours sees it (the Slurm environment is detected whatever plugin the
    trainer names). Runs of this project never write such a file (only submitit requeues), so one there was put
    there by hand: refused everywhere, so a run does the same on a laptop and on a cluster."""
    found = sorted(p.name for p in root.glob("hpc_ckpt_*.ckpt")) if root.is_dir() else []
    if found:
        raise ConfigError(
            f"{root / found[0]}: ssn_exp does not write Lightning's hpc_ckpt files (Lightning would load it unchecked "
            "inside a Slurm job); remove it, or certify it explicitly with python -m ssn_exp.certify ckpt=PATH"
        )


def container(node) -> dict:
    """A resolved plain-container copy of a config node (what checkpoints store)."""
    return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)


def check_sigma(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"sigma must be a positive finite number, got {value!r}")
    return float(value)


#: The run-level values a training run's folder is named by (``sigma<sigma>-seed<seed>``), and the keys of the groups
#: that the configs set from them (``sigma: ${sigma}``): the run's records (metrics.json, the checkpoint) say what
#: these keys built, so each must hold the run's one value.
ONE_VALUE = {"sigma": ("method.sigma",), "seed": ("method.seed", "data.seed")}


def check_one_value(cfg: DictConfig) -> None:
    """One value of sigma and of seed per run: a key of :data:`ONE_VALUE` set to another value than the run's (an
    override such as ``method.sigma=2.0``, or a YAML of the user's) is refused, else the run folder would be named
    by one value and hold a run made with the other."""
    for source, keys in ONE_VALUE.items():
        want = _value(cfg, source, "")
        for key in keys:
            group, _, leaf = key.partition(".")
            node = cfg.get(group)
            if not isinstance(node, DictConfig) or leaf not in node:
                continue
            got = _value(node, leaf, f"{group}.")
            same = isinstance(got, numbers.Real) and isinstance(want, numbers.Real) and float(got) == float(want)
            if not same and got != want:
                raise ConfigError(f"{key}={got} conflicts with {source}={want}; set {source}={got}")


def _value(node, key: str, prefix: str):
    """``node[key]``; a missing key, a missing value (???) or a broken interpolation becomes a one-line ConfigError."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return node[key]
    except OmegaConfBaseException as exc:
        text = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
        raise ConfigError(f"{prefix}{key}: {text}") from None


def _shape(value) -> tuple[int, ...] | None:
    """A (C, H, W) shape of positive integers, or None (the data module reports a bad shape itself)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        shape = tuple(value)
    except (TypeError, OmegaConfBaseException):  # (a broken ${...} item: reported by the data module)
        return None
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
        return None
    return tuple(int(s) for s in shape)


def given_overrides() -> set[str]:
    """The keys given on the command line (or by the sweeper) for this job: ``procedure.n`` of ``procedure.n=500``."""
    from hydra.core.hydra_config import HydraConfig

    return {item.lstrip("+~").partition("=")[0] for item in HydraConfig.get().overrides.task}


#: The certify.* spellings of the procedure's own settings before issue 25, kept for one release.
DEPRECATED_CERTIFY = ("n0", "n", "alpha")
_warned: set[str] = set()


def apply_deprecated(cfg: DictConfig, given) -> None:
    """Apply an old spelling ``certify.n0`` / ``n`` / ``alpha`` (set, not null) to ``procedure.*``, with one warning line
    naming the new one; unless that key is also in ``given`` (the keys given explicitly) as ``procedure.*``, which wins,
    or the procedure takes no such setting (procedure=exact): then it is ignored, and the warning says so."""
    import sys

    c, proc = cfg.get("certify"), cfg.get("procedure")
    for key in DEPRECATED_CERTIFY:
        if not isinstance(c, DictConfig) or key not in c or (value := _value(c, key, "certify.")) is None:
            continue
        text = f"certify.{key} is deprecated; use procedure.{key}={value}"
        if f"procedure.{key}" in given:
            text = f"certify.{key} is deprecated and ignored: procedure.{key}={_value(proc, key, 'procedure.')} wins"
        elif isinstance(proc, DictConfig) and key in proc:
            proc[key] = value
        else:
            text += f" (ignored here: this procedure takes no {key})"
        c[key] = None  # applied once
        if text not in _warned:
            _warned.add(text)
            print(f"warning: {text}", file=sys.stderr, flush=True)


def check_certify_config(cfg: DictConfig, shape=None):
    """The certification settings (:class:`~ssn_exp.lightning.certify_run.CertifyRun`: ``certify.*``, the run's seed and
    ``trainer.precision``), every value checked before any training or certification starts.

    ``shape``: the inputs' (C, H, W) (default ``data.shape``): a ``certify.noise_batch`` whose noisy batch cannot
    fit in this host's physical memory is refused now rather than after training (the certification checks the
    memory free on its device again before it starts).
    """
    import dataclasses

    from ssn_exp.lightning.certify_run import CertifyRun
    from ssn_exp.lightning.memory import check_noise_batch, host_memory

    c = _value(cfg, "certify", "")
    if not isinstance(c, DictConfig):
        raise ConfigError(f"certify must be a config group (certify=default), got {c!r}")
    if "enabled" in c:
        check_bool(_value(c, "enabled", "certify."), "certify.enabled")
    values = {f.name: _value(c, f.name, "certify.") for f in dataclasses.fields(CertifyRun) if f.name in c}
    if isinstance(values.get("radii"), ListConfig):  # each item read on its own: a missing or broken ${...} is named
        values["radii"] = [_value(values["radii"], i, "certify.radii.") for i in range(len(values["radii"]))]
    trainer = _value(cfg, "trainer", "") if "trainer" in cfg else None
    if isinstance(trainer, DictConfig) and "precision" in trainer:
        values["precision"] = _value(trainer, "precision", "trainer.")
    settings = CertifyRun(**{**values, "seed": _value(cfg, "seed", "")})
    if shape is None and "data" in cfg and isinstance(cfg.data, DictConfig) and "shape" in cfg.data:
        shape = _value(cfg.data, "shape", "data.")
    shape = _shape(shape)
    if shape is not None:
        check_noise_batch(settings.noise_batch, shape, host_memory(available=False), "this host's memory")
    return settings
