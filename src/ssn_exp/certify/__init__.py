"""Certification library (layer 1): model-agnostic, batched, device-agnostic.

- exact DSSN certificates (:func:`exact_certificate`), randomized Clopper-Pearson ones
  (:func:`clopper_pearson_lower`, :func:`randomized_radius`), and the box-constrained radius of uniform
  noise and SSN (:func:`box_radius`);
- :func:`certify_batch` / :class:`SmoothedClassifier` for any ``nn.Module`` on any device;
- metrics: certified accuracy, ACR, the best-over-sigma table.

``python -m ssn_exp.certify ckpt=PATH`` (``__main__``, the Hydra entry point of layer 3) certifies a
saved checkpoint; importing this package pulls in neither Hydra nor Lightning.
"""

from ssn_exp.certify.box import box_radius
from ssn_exp.certify.core import (
    Certificates,
    ModelOutputError,
    NonFiniteLogitsError,
    SmoothedClassifier,
    authors_radius_float32,
    certify_batch,
    clopper_pearson_lower,
    count_predictions,
    exact_certificate,
    input_dtype,
    randomized_radius,
    top_class,
)
from ssn_exp.certify.metrics import (
    PAPER_RADII,
    BestRow,
    average_certified_radius,
    best_over_sigma,
    certified_accuracy,
    certified_count,
)

__all__ = [
    "Certificates",
    "ModelOutputError",
    "NonFiniteLogitsError",
    "SmoothedClassifier",
    "authors_radius_float32",
    "box_radius",
    "certify_batch",
    "clopper_pearson_lower",
    "count_predictions",
    "exact_certificate",
    "input_dtype",
    "randomized_radius",
    "top_class",
    "PAPER_RADII",
    "BestRow",
    "average_certified_radius",
    "best_over_sigma",
    "certified_accuracy",
    "certified_count",
]
