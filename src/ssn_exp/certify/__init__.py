"""Certification library (layer 1): model-agnostic, batched, device-agnostic.

- exact DSSN certificates (:func:`exact_certificate`), randomized Clopper-Pearson ones
  (:func:`clopper_pearson_lower`, :func:`randomized_radius`), and the box-constrained radius of uniform
  noise and SSN (:func:`box_radius`);
- :func:`certify_batch` / :class:`SmoothedClassifier` for any ``nn.Module`` on any device;
- metrics: certified accuracy, ACR, the best-over-sigma table.

``python -m ssn_exp.certify ckpt=PATH`` (``__main__``, the Hydra entry point of layer 3) certifies a
saved checkpoint; importing this package pulls in neither Hydra nor Lightning.
"""

import importlib

#: Where each public name lives; imported on first use, so that ``python -m ssn_exp.certify`` can check its
#: arguments (a missing checkpoint, say) before torch and scipy are imported (PEP 562 module ``__getattr__``).
_WHERE = {
    "box_radius": "ssn_exp.box",
    "SmoothedClassifier": "ssn_exp.certify.procedures",
    "certify_batch": "ssn_exp.certify.procedures",
    **dict.fromkeys(
        [
            "Certificates",
            "ModelOutputError",
            "NonFiniteLogitsError",
            "authors_radius_float32",
            "clopper_pearson_lower",
            "count_predictions",
            "exact_certificate",
            "input_dtype",
            "randomized_radius",
            "top_class",
        ],
        "ssn_exp.certify.core",
    ),
    **dict.fromkeys(
        [
            "PAPER_RADII",
            "BestRow",
            "average_certified_radius",
            "best_over_sigma",
            "certified_accuracy",
            "certified_count",
        ],
        "ssn_exp.certify.metrics",
    ),
}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])


__all__ = list(_WHERE)
