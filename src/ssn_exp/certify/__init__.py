"""Certification library (layer 1): model-agnostic, batched, device-agnostic.

``python -m ssn_exp.certify ckpt=PATH`` (the Hydra entry point in ``__main__``) certifies a
saved checkpoint; importing this package pulls in neither Hydra nor Lightning.
"""

from ssn_exp.certify.core import (
    Certificates,
    SmoothedClassifier,
    authors_radius_float32,
    certify_batch,
    clopper_pearson_lower,
    count_predictions,
    exact_certificate,
    randomized_radius,
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
    "SmoothedClassifier",
    "authors_radius_float32",
    "certify_batch",
    "clopper_pearson_lower",
    "count_predictions",
    "exact_certificate",
    "randomized_radius",
    "PAPER_RADII",
    "BestRow",
    "average_certified_radius",
    "best_over_sigma",
    "certified_accuracy",
    "certified_count",
]
