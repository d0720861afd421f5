"""Deprecated: the noises live in :mod:`ssn_exp.noises` (``Smoothing`` is now ``ssn_exp.noises.Noise``).

``from ssn_exp.smoothing import DSSN, SSN, Uniform`` keeps working for this release, with a ``DeprecationWarning``
naming the new place of each name.
"""

import importlib
import warnings

_RENAMED = {"Smoothing": "Noise"}


def __getattr__(name: str):
    noises = importlib.import_module("ssn_exp.noises")
    new = _RENAMED.get(name, name)
    if new.startswith("__") or not hasattr(noises, new):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"ssn_exp.smoothing.{name} moved to ssn_exp.noises.{new}; import it from there "
        "(ssn_exp.smoothing will be removed in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(noises, new)


def __dir__():
    return sorted([*importlib.import_module("ssn_exp.noises").__all__, *_RENAMED])
