"""Which code a file may make ssn_exp call: the ``_target_`` allow-list (no torch, no Hydra; importing it is free).

A checkpoint's hyper-parameters are the configs it was trained with, and Hydra's ``instantiate`` calls whatever
a ``_target_`` names: whoever wrote the file would choose the function (``pathlib.Path.write_text``,
``numpy.load(allow_pickle=True)``, ``torch.hub.load``, ``os.system``, ...). So before anything read from a file
is instantiated, :meth:`Trust.check` walks it (every nested dict and list, ``_args_`` and ``_partial_`` nodes
included) and requires every ``_target_`` to resolve to an allowed callable:

- the classes and functions that ssn_exp's own configs build (models, noises, denoisers, optimizers, schedulers,
  data modules: every ``_target_`` under ``ssn_exp/conf`` except the trainer, logger and Hydra groups);
- those of the user's composed config of this run (a model config on the command line is the user's own choice);
- any callable defined in a module the user names in ``trust_targets`` (e.g. ``trust_targets=[mypkg.models]``).

Targets are compared as resolved objects (identity), not as strings, so an alias such as
``ssn_exp.models.torch.hub.load`` is refused. Resolving a name imports no module that a file alone names: a module is
looked up only if it is already imported, or is named by a trusted target itself (a module on the path of one of
ssn_exp's own targets or of the user's config's, e.g. ``torch.optim`` for ``torch.optim.SGD``), or is a
``trust_targets`` module or inside one. Any other module of an installed package (``torch.utils.model_dump.__main__``,
whose import runs a command-line tool) is refused before it is imported. Strings holding ``${`` interpolations are refused too (the stored configs are
resolved; an interpolation would be evaluated by ``instantiate`` after this check).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from ssn_exp.exceptions import UserError

__all__ = ["Trust", "UntrustedTarget", "own_targets", "targets_in"]

#: Config groups whose targets are not trusted from files: they build a run's machinery, not its model.
_UNTRUSTED_GROUPS = ("hydra", "trainer", "logger", "callbacks", "local")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
#: Deeper nesting than any config of ours: refused rather than risking a RecursionError in Hydra / OmegaConf.
MAX_DEPTH = 64


class UntrustedTarget(UserError, ValueError):
    """A ``_target_`` read from a file that ssn_exp refuses to call (or a config that could smuggle one)."""


def _walk(tree, path: str, depth: int = 0):
    """(dotted key, value) of every node of a nested dict / list, parents first; refuses too deep nesting."""
    if depth > MAX_DEPTH:
        raise UntrustedTarget(f"{path} is nested deeper than {MAX_DEPTH} levels")
    yield path, tree
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return
    for key, value in items:
        yield from _walk(value, f"{path}.{key}" if path else str(key), depth + 1)


def targets_in(tree) -> list[tuple[str, object]]:
    """(dotted key, value) of every ``_target_`` in a nested dict / list."""
    return [(path, value) for path, value in _walk(tree, "") if path.rpartition(".")[2] == "_target_"]


@lru_cache(maxsize=1)
def own_targets() -> frozenset[str]:
    """Every ``_target_`` in ssn_exp's own configs (``ssn_exp/conf/**/*.yaml``) except the trainer, logger, hydra
    groups (read as plain YAML: nothing is imported)."""
    import yaml

    conf = Path(__file__).resolve().parent / "conf"
    found = set()
    for path in sorted(conf.rglob("*.yaml")):
        if path.relative_to(conf).parts[0] in _UNTRUSTED_GROUPS:
            continue
        data = yaml.safe_load(path.read_text())
        for key, value in targets_in(data):
            if isinstance(value, str) and key.split(".")[0] not in _UNTRUSTED_GROUPS:
                found.add(value)
    return frozenset(found)


#: ssn_exp's modules kept for the targets that older checkpoints store (``ssn_exp.smoothing.DSSN``): importable too.
_MOVED = frozenset({"ssn_exp.smoothing"})
#: Libraries that are nobody's own model code: a target in them is never suggested for ``trust_targets``.
_LIBRARIES = frozenset({"torch", "torchvision", "numpy", "scipy", "hydra", "omegaconf", "pytorch_lightning",
                        "lightning", "lightning_fabric", "ssn_exp", "wandb", "yaml", "pandas", "matplotlib"})  # fmt: skip


def _hint(module: str) -> str:
    """How to trust ``module``, only where it may be the user's own code: never a standard-library or system module
    (``posix`` for ``os.system``) or one of the libraries ssn_exp runs on, whose other callables a file may not name."""
    root = module.partition(".")[0]
    if root in sys.stdlib_module_names or root in sys.builtin_module_names or root in _LIBRARIES:
        return ""
    return f"; if it is your own code, trust it with trust_targets=[{module}] or name it in your own config"


def _prefixes(name: str) -> list[str]:
    """``a``, ``a.b``, ``a.b.c`` for ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class Trust:
    """The callables that configs read from files may name (see the module's docstring).

    ``targets``: extra allowed target names (the user's own config); ``modules``: ``trust_targets`` entries, module
    names (or dotted names of callables) whose callables the user trusts.
    """

    def __init__(self, targets: Iterable[str] = (), modules: Iterable[str] = ()):
        self.modules = tuple(self._checked_modules(modules))
        self.targets = frozenset(own_targets() | {t for t in targets if isinstance(t, str) and _DOTTED.fullmatch(t)})
        #: modules that may be imported to resolve a name: those on the path of a trusted target, and the trust_targets
        #: modules with what is inside them (never a sibling module of a package that a file names)
        self.importable = frozenset(p for t in self.targets | set(self.modules) | _MOVED for p in _prefixes(t))
        self._resolved: dict[str, object] = {}

    @staticmethod
    def _checked_modules(modules) -> list[str]:
        if isinstance(modules, str) or modules is None:
            modules = [] if modules is None else [modules]
        out = []
        for m in modules:
            if not isinstance(m, str) or not _DOTTED.fullmatch(m):
                raise UntrustedTarget(
                    f"trust_targets must list module names such as [mypkg.models], got {m!r} in {list(modules)!r}"
                )
            out.append(m)
        return out

    @classmethod
    def from_config(cls, cfg) -> Trust:
        """The trust of a run: its composed config's targets (trainer, logger and hydra excepted) and its
        ``trust_targets`` (a list of module names; a plain dict / DictConfig)."""
        plain = cfg
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                try:
                    plain = OmegaConf.to_container(cfg, resolve=True)
                except Exception:  # noqa: BLE001 - an interpolation that fails elsewhere too: take the raw values
                    plain = OmegaConf.to_container(cfg)  # unresolved
        except ImportError:  # pragma: no cover - omegaconf ships with hydra
            pass
        plain = {k: v for k, v in dict(plain or {}).items() if k not in _UNTRUSTED_GROUPS}
        modules = plain.pop("trust_targets", None) or []
        return cls((v for _, v in targets_in(plain)), modules)

    # -- resolution ----------------------------------------------------------------------
    def _may_import(self, name: str) -> bool:
        return name in self.importable or any(_matches(name, m) for m in self.modules)

    def _module(self, name: str):
        """The module ``name`` if it is imported or named by what is trusted (then imported), else None."""
        module = sys.modules.get(name)
        if module is not None or not self._may_import(name):
            return module
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an absent or broken module: the name does not resolve
            return None

    def resolve(self, name: str):
        """The object a dotted ``_target_`` names, looked up like Hydra does (attribute, else submodule), without
        importing modules outside the trusted packages; raises :class:`LookupError` with the reason."""
        if name in self._resolved:
            return self._resolved[name]
        parts = name.split(".")
        obj = self._module(parts[0])
        if obj is None:
            why = "is not installed" if self._may_import(parts[0]) else "is not imported and not trusted"
            raise LookupError(f"module {parts[0]!r} {why}")
        for i, part in enumerate(parts[1:], start=2):
            if not isinstance(obj, (types.ModuleType, type)):
                raise LookupError(f"{'.'.join(parts[: i - 1])} is not a module or class")
            if isinstance(obj, types.ModuleType):
                try:
                    inspect.getattr_static(obj, part)
                    sub = getattr(obj, part)
                except AttributeError:
                    sub = self._moved(obj, part) or self._module(".".join(parts[:i]))
            else:
                try:
                    sub = getattr(obj, part)
                except AttributeError:
                    sub = None
            if sub is None:
                raise LookupError(f"{'.'.join(parts[:i])} does not exist or is not trusted")
            obj = sub
        self._resolved[name] = obj
        return obj

    @staticmethod
    def _moved(module: types.ModuleType, part: str):
        """A name an ssn_exp module keeps through a module ``__getattr__`` after it moved (``ssn_exp.smoothing.DSSN``
        in checkpoints written before ``ssn_exp.noises``): only ssn_exp's own deprecation shims are asked."""
        if module.__name__.split(".")[0] != "ssn_exp" or "__getattr__" not in vars(module):
            return None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return getattr(module, part)
            except AttributeError:
                return None

    def _allowed(self, name: str, obj) -> bool:
        if not callable(obj) or isinstance(obj, types.ModuleType):
            return False
        if name in self.targets:
            return True
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if isinstance(module, str):  # in a trusted module, or itself named by trust_targets (mypkg.models.Net)
            if any(_matches(f"{module}.{qualname}", m) for m in self.modules):
                return True
        short = getattr(obj, "__name__", None)
        for allowed in self.targets:  # an alias of an allowed callable (same object under another name)
            if allowed.rpartition(".")[2] == short:
                try:
                    if self.resolve(allowed) is obj:
                        return True
                except LookupError:
                    continue
        return False

    # -- the check ------------------------------------------------------------------------
    def check(self, tree, where: str, prefix: str = "") -> None:
        """Refuse ``tree`` (a config read from ``where``) unless every ``_target_`` in it is allowed; the message
        is one line naming the key, the target and how to trust it. Nothing is instantiated."""
        for key, value in _walk(tree, prefix):
            if isinstance(value, str) and "${" in value:
                raise UntrustedTarget(
                    f"{where}: {key} holds an interpolation ({value[:60]!r}); stored configs are resolved, so the "
                    "file was edited: refusing to evaluate it"
                )
            if key.rpartition(".")[2] != "_target_":
                continue
            if not isinstance(value, str) or not _DOTTED.fullmatch(value):
                raise UntrustedTarget(f"{where}: {key} must be a dotted name such as mypkg.Net, got {value!r:.80}")
            try:
                obj = self.resolve(value)
            except LookupError as exc:
                raise UntrustedTarget(
                    f"{where}: {key}={value!r} cannot be resolved ({exc}); ssn_exp imports no module a file "
                    f"names{_hint(value.rsplit('.', 1)[0])}"
                ) from None
            if not self._allowed(value, obj):
                named = value.rsplit(".", 1)[0]
                module = getattr(obj, "__module__", None)
                module = named if not isinstance(module, str) or _matches(module, named) else module
                raise UntrustedTarget(
                    f"{where}: {key}={value!r} is not a class or function ssn_exp builds from a file (only its own "
                    f"models, noises, data sets, denoisers, optimizers and schedulers are){_hint(module)}"
                )
