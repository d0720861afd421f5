"""Per-run certification results, read from our run directories or from published arrays.

Two sources, one record type (:class:`RunRecord`):

- a run directory written by ``python -m ssn_exp`` (``metrics.json`` + ``certificates.csv``); runs of
  uniform noise and SSN with ``radius_box`` give a second record, method ``"uniform (box)"`` / ``"ssn (box)"``;
- a folder of published arrays (``index.csv`` + one npz per run, labels per run or in ``labels.npz``), such as
  the authors' arrays shipped with the package (:func:`published_dir`, ``levine2021``).

numpy only: reports (layer 4) and tests build on this.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssn_exp.certify.core import exact_certificate
from ssn_exp.certify.metrics import PAPER_RADII, average_certified_radius, certified_accuracy

__all__ = [
    "RunRecord",
    "PUBLISHED",
    "BOX_SUFFIX",
    "published_dir",
    "load_reference",
    "load_run_dir",
    "find_runs",
    "load_paths",
]

#: Published results shipped with the package (``ssn_exp/published/<name>``).
PUBLISHED = ("levine2021",)
#: Appended to the method of the box-constrained records of a run: "uniform (box)", "ssn (box)".
BOX_SUFFIX = " (box)"


def published_dir(name: str) -> Path:
    """The folder of a published result set shipped with the package, e.g. ``published_dir("levine2021")``."""
    from importlib import resources

    if name not in PUBLISHED:
        raise ValueError(f"unknown published results {name!r}; choose one of {list(PUBLISHED)}")
    return Path(str(resources.files("ssn_exp") / "published" / name))


@dataclass
class RunRecord:
    """One certified model: per-example labels, predictions and radii plus its identity."""

    dataset: str
    method: str
    training: str
    denoiser: str
    sigma: float
    labels: np.ndarray
    prediction: np.ndarray
    radius: np.ndarray  # integer k when q is set (rho = k/q), else float rho
    q: int | None = None
    seed: int = 0
    source: str = ""  # where it came from (file or run dir)
    origin: str = "ours"  # "ours" or the reference folder's name, e.g. "levine2021"
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> np.ndarray:
        return self.prediction == self.labels

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.correct))

    @property
    def rho(self) -> np.ndarray:
        return self.radius / self.q if self.q is not None else np.asarray(self.radius, dtype=np.float64)

    def certified_accuracy(self, radii=PAPER_RADII) -> dict[float, float]:
        return certified_accuracy(self.correct, self.radius, radii, q=self.q)

    def acr(self) -> float:
        return average_certified_radius(self.correct, self.radius, q=self.q)

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.dataset, self.method, self.training, self.denoiser)

    def summary(self, radii=PAPER_RADII) -> dict:
        return {
            "sigma": self.sigma,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": self.certified_accuracy(radii),
        }


def load_reference(folder: str | Path, q: int = 255) -> list[RunRecord]:
    """Read a folder of published arrays (``index.csv`` + one npz per run, labels per run or in ``labels.npz``).

    DSSN runs get exact integer radii from their counts; randomized runs keep the stored float radii.
    """
    folder = Path(folder)
    index = folder / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no index.csv: not a folder of published arrays")
    shared_labels = {}
    if (folder / "labels.npz").is_file():
        with np.load(folder / "labels.npz") as z:
            shared_labels = {k: z[k].astype(np.int64) for k in z.files}
    records = []
    with open(index, newline="") as fh:
        for row in csv.DictReader(fh):
            with np.load(folder / row["file"]) as z:
                labels = z["labels"].astype(np.int64) if "labels" in z.files else shared_labels[row["dataset"]]
                if row["method"] == "dssn":
                    prediction, k = exact_certificate(z["counts"])
                    radius, rq = k, q
                else:
                    prediction = z["predicted"].astype(np.int64)
                    radius, rq = z["radius_l1"].astype(np.float64), None
            records.append(
                RunRecord(
                    dataset=row["dataset"],
                    method=row["method"],
                    training=row["training"],
                    denoiser=row["denoiser"],
                    sigma=float(row["sigma"]),
                    labels=labels,
                    prediction=prediction,
                    radius=radius,
                    q=rq,
                    source=str(folder / row["file"]),
                    origin=folder.name,
                    extra={"time_per_image_s": float(row["time_per_image_s"] or "nan")},
                )
            )
    return records


def load_run_dir(run_dir: str | Path) -> list[RunRecord]:
    """Read one of our run directories (metrics.json + certificates.csv): its record, and its box-constrained
    record (method ``"<method> (box)"``) when the certificates have ``radius_box``."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "metrics.json").read_text())
    labels, preds, radius, box = [], [], [], []
    is_exact = meta["method"] == "dssn"
    with open(run_dir / "certificates.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["index"]))
    if len(rows) != int(meta["n_examples"]):
        raise ValueError(
            f"certificates.csv has {len(rows)} rows but metrics.json counts {meta['n_examples']} examples "
            "(a certification being resumed, or an edited file)"
        )
    has_box = bool(rows) and "radius_box" in rows[0]
    for row in rows:
        labels.append(int(row["label"]))
        preds.append(int(row["prediction"]))
        radius.append(int(row["k"]) if is_exact else float(row["radius"]))
        if has_box:
            box.append(float(row["radius_box"]))
    rec = RunRecord(
        dataset=meta["dataset"],
        method=meta["method"],
        training=meta["training"],
        denoiser=meta.get("denoiser", "none"),
        sigma=float(meta["sigma"]),
        labels=np.asarray(labels, dtype=np.int64),
        prediction=np.asarray(preds, dtype=np.int64),
        radius=np.asarray(radius, dtype=np.int64 if is_exact else np.float64),
        q=int(meta["q"]) if is_exact else None,
        seed=int(meta.get("seed", 0)),
        source=str(run_dir),
        extra={k: meta[k] for k in ("acr", "seconds_per_example", "forward_passes_per_example") if k in meta},
    )
    if not has_box:
        return [rec]
    boxed = dataclasses.replace(
        rec, method=rec.method + BOX_SUFFIX, radius=np.asarray(box, dtype=np.float64), q=None, extra=dict(rec.extra)
    )
    return [rec, boxed]


def find_runs(path: str | Path) -> list[Path]:
    """Every run directory (holding metrics.json) at or below path."""
    path = Path(path)
    if (path / "metrics.json").is_file():
        return [path]
    return sorted(p.parent for p in path.rglob("metrics.json"))


def load_paths(paths) -> tuple[list[RunRecord], list[str]]:
    """Records from run dirs, multirun dirs and reference folders; also the problems found on the way."""
    records, problems = [], []
    for p in map(Path, paths):
        if not p.exists():
            problems.append(f"{p}: does not exist")
        elif (p / "index.csv").is_file():
            records.extend(load_reference(p))
        else:
            runs = find_runs(p)
            if not runs:
                problems.append(f"{p}: no metrics.json found (not a run, multirun or reference folder)")
            for run in runs:
                try:
                    records.extend(load_run_dir(run))
                except (OSError, KeyError, ValueError) as exc:
                    problems.append(f"{run}: unreadable ({exc})")
    return records, problems


def sigma_label(sigma: float) -> str:
    """0.5 -> '0.5', 2.0 -> '2.0' (the paper's way of writing sigma)."""
    return f"{sigma:.2f}".rstrip("0").rstrip(".") if not math.isclose(sigma, round(sigma)) else f"{sigma:.1f}"
