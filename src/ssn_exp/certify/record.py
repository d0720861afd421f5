"""The certificate record (layer 1, no I/O): the one place that defines a certificate row of ``certificates.csv``,
how it is written from :class:`~ssn_exp.certify.core.Certificates` and how a row read back is parsed and checked.

Columns: ``index,label,prediction,correct,radius,seconds``, then the procedure's own columns
(:meth:`~ssn_exp.certify.procedures.Procedure.columns`: ``k`` for exact certificates, rho = k / q; ``p_lower`` and
the noise's further radii such as ``radius_box`` for sampled ones; sequential certificates add ``samples``, the
forward passes spent on the example), then ``counts``: the base classifier's votes as ``class:count`` pairs
(nonzero only): over all L copies (exact), over the n estimation samples (fixed), over the test's samples of a
sequential certificate (every class, the n0 selection samples excluded: they sum to ``samples`` - n0, or to
``samples`` when the label is tested).

A new field is one change here (or in the procedure / noise that computes it). The run files
(:mod:`ssn_exp.lightning.results`), the report and wandb read rows through this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "BASE_COLUMNS",
    "EXACT_COLUMN",
    "SAMPLES_COLUMN",
    "EXTRA_RADIUS_PREFIX",
    "CertificateRecord",
    "format_counts",
    "parse_counts",
    "extra_radius_columns",
]

BASE_COLUMNS = ["index", "label", "prediction", "correct", "radius", "seconds"]
#: The column of exact certificates: the integer k of rho = k / q (q in metrics.json).
EXACT_COLUMN = "k"
#: The forward passes spent on one example, where a procedure spends a data-dependent number (sequential); the
#: run's ``forward_passes_per_example`` is then their mean.
SAMPLES_COLUMN = "samples"
#: Further certified radii of the same example (``radius_box``: the box-constrained radius) start with this.
EXTRA_RADIUS_PREFIX = "radius_"


def extra_radius_columns(columns: Sequence[str]) -> list[str]:
    """The columns holding further certified radii (``radius_box`` ...), in file order."""
    return [c for c in columns if c.startswith(EXTRA_RADIUS_PREFIX)]


def format_counts(counts: np.ndarray) -> str:
    """``class:count`` pairs of the nonzero entries, e.g. ``3:27 5:14``."""
    nz = np.flatnonzero(counts)
    return " ".join(f"{int(c)}:{int(counts[c])}" for c in nz)


def parse_counts(text: str, num_classes: int) -> np.ndarray:
    out = np.zeros(num_classes, dtype=np.int64)
    for item in text.split():
        c, _, v = item.partition(":")
        c, v = int(c), int(v)
        if not 0 <= c < num_classes or v < 0 or out[c]:
            raise ValueError(f"bad counts entry {item!r}")
        out[c] = v
    return out


def _cell(value) -> str | int:
    """Integers as integers, floats as their shortest exact repr (read back bit for bit)."""
    if isinstance(value, np.integer | int) and not isinstance(value, bool):
        return int(value)
    return repr(float(value))


class CertificateRecord:
    """The rows of one certification: the columns of ``noise`` certified by ``procedure``."""

    def __init__(self, noise, procedure):
        procedure.check(noise)
        self.noise, self.procedure = noise, procedure
        self.fields = list(procedure.columns(noise))
        self.columns = [*BASE_COLUMNS, *self.fields, "counts"]

    @property
    def exact_denominator(self) -> int | None:
        """q when the rows hold exact certificates k (rho = k / q), else None."""
        return self.procedure.exact_denominator(self.noise)

    def rows(self, indices: Sequence[int], labels: Sequence[int], cert, seconds: float) -> list[dict]:
        """One row per example of ``cert`` (the certificates of examples ``indices`` with these ``labels``)."""
        out = []
        for j, idx in enumerate(indices):
            label, pred = int(labels[j]), int(cert.prediction[j])
            row = {
                "index": int(idx),
                "label": label,
                "prediction": pred,
                "correct": int(pred == label),
                "radius": repr(float(cert.radius[j])),
                "seconds": f"{seconds:.6f}",
            }
            for name in self.fields:
                row[name] = _cell(cert.values[name][j])
            row["counts"] = format_counts(cert.counts[j])
            out.append(row)
        return out

    def check(self, row: dict, num_classes: int | None) -> int:
        """The example index of a row read back, after checking that this certification could have written it;
        ``ValueError`` (or ``KeyError`` / ``TypeError``) naming what is wrong otherwise."""
        if None in row or any(v is None for v in row.values()):
            raise ValueError("wrong number of fields")
        index, label, pred, correct = (int(row[c]) for c in ("index", "label", "prediction", "correct"))
        radius, seconds = float(row["radius"]), float(row["seconds"])
        if index < 0 or label < 0 or pred < 0 or correct not in (0, 1) or correct != int(pred == label):
            raise ValueError("index, label, prediction and correct disagree")
        if num_classes is not None and (label >= num_classes or pred >= num_classes):
            raise ValueError(f"class outside [0, {num_classes})")
        if not math.isfinite(radius) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError("radius and seconds must be finite")
        counts = parse_counts(row["counts"], num_classes or max(pred, label, 1) + 1 + 4096)
        values = {name: row[name] for name in ("label", *self.fields)}
        self.procedure.check_row(values, counts, pred, radius, self.noise)
        return index
