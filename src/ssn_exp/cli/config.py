"""Config plumbing for the entry points (layer 3): where the configs live, resolvers, validation and
building components from ``_target_`` with one-line errors that name the config file."""

from __future__ import annotations

import math
import numbers
import re
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssn_exp.exceptions import UserError, instantiation_message

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "register_resolvers",
    "config_source",
    "build",
    "check_sigma",
    "check_seed",
    "check_positive_int",
    "check_tag",
    "certify_settings",
    "container",
]

#: The package's configs (``ssn_exp/conf``): found the same way from a checkout and from an installed wheel.
CONF_DIR = str(resources.files("ssn_exp") / "conf")


class ConfigError(UserError, ValueError):
    """A configuration value that makes no sense (reported in one line)."""


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


def register_resolvers() -> None:
    for name, fn in (("path_tag", _path_tag), ("tag_suffix", _tag_suffix), ("numel", _numel)):
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
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        raise ConfigError(f"cannot build {group} from {config_source(group)}: {instantiation_message(exc)}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build {group} from {config_source(group)}: {exc}") from None


def container(node) -> dict:
    """A resolved plain-container copy of a config node (what checkpoints store)."""
    return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)


def check_sigma(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"sigma must be a positive finite number, got {value!r}")
    return float(value)


def check_seed(value, key: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**32:
        raise ConfigError(f"{key} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


def check_positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def certify_settings(cfg: DictConfig, n: int | None = None) -> dict:
    """The certification settings, every value checked (before any training or certification starts)."""
    c = cfg.certify
    n_value = c.n if n is None else n
    settings = {
        "skip": check_positive_int(c.skip, "certify.skip"),
        "max_examples": None if c.max_examples is None else check_positive_int(c.max_examples, "certify.max_examples"),
        "n0": check_positive_int(c.n0, "certify.n0"),
        "n": check_positive_int(n_value, "certify.n"),
        "noise_batch": check_positive_int(c.noise_batch, "certify.noise_batch"),
        "batch_size": check_positive_int(c.batch_size, "certify.batch_size"),
        "seed": check_seed(cfg.seed),
        "autocast": c.get("autocast"),
        "channels_last": bool(c.get("channels_last", False)),
        "compile": bool(c.get("compile", False)),
        "precision": None if cfg.trainer.get("precision") is None else str(cfg.trainer.precision),
    }
    alpha = c.alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ConfigError(f"certify.alpha must lie in (0, 1), got {alpha!r}")
    settings["alpha"] = float(alpha)
    if settings["autocast"] not in (None, "none", "bf16", "fp16"):
        raise ConfigError(f"certify.autocast must be null, bf16 or fp16, got {settings['autocast']!r}")
    radii = list(c.radii)
    if not radii or any(isinstance(r, bool) or not isinstance(r, numbers.Real) or r < 0 for r in radii):
        raise ConfigError(f"certify.radii must be a list of non-negative numbers, got {radii}")
    return settings
