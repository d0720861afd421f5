"""Per-run certification results, read from our run directories or from published arrays.

Two sources, one record type (:class:`RunRecord`):

- a run directory written by ``python -m ssn_exp`` (``metrics.json`` + ``certificates.csv``); every further
  radius column ``radius_<name>`` of its certificates gives one more record, method ``"<method> (<name>)"`` and
  label ``"<label> (<name>)"`` (e.g. the box-constrained radius of uniform noise: ``"uniform (box)"``);
- a folder of published arrays (``index.csv`` + one npz per run, labels per run or in ``labels.npz``), such as
  the authors' arrays shipped with the package (:func:`published_dir`, ``levine2021``).

numpy only: reports (layer 4) and tests build on this.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssn_exp.certify.core import exact_certificate
from ssn_exp.certify.metrics import PAPER_RADII, average_certified_radius, certified_accuracy
from ssn_exp.certify.record import EXACT_COLUMN, EXTRA_RADIUS_PREFIX, SAMPLES_COLUMN, extra_radius_columns
from ssn_exp.exceptions import describe

__all__ = [
    "RunRecord",
    "PUBLISHED",
    "variant_suffix",
    "procedure_suffix",
    "FORWARD_PASS_KEYS",
    "tell_procedures_apart",
    "published_dir",
    "load_reference",
    "RunFileError",
    "read_metrics",
    "read_run_certificates",
    "load_run_dir",
    "find_runs",
    "load_paths",
]

#: Published results shipped with the package (``ssn_exp/published/<name>``).
PUBLISHED = ("levine2021",)


#: The largest magnitude of a number read from a run's files (a count, a label, a radius, sigma): exact in float64,
#: and any sum or mean over the examples stays finite. Larger values are refused (the run is listed as unreadable).
MAX_NUMBER = 2**53

#: The forward-pass statistics of metrics.json a run's record keeps (in ``extra``), where the file has them.
FORWARD_PASS_KEYS = ("forward_passes_per_example", "forward_passes_median", "forward_passes_p90")


def procedure_suffix(procedure: str) -> str:
    """Appended to the method and label of a run when a report holds runs of its method by several procedures."""
    return f" [{procedure}]"


def tag_suffix(tag: str) -> str:
    """Appended to the method and label of a run when a report holds runs of its method with several tags."""
    return f" [tag={tag}]"


#: A run directory's tag (``tag=NAME``): ``sigma<s>-seed<k>-NAME`` (``python -m ssn_exp``) or
#: ``<checkpoint name>-<8 hex digits>-NAME`` (``python -m ssn_exp.certify``).
_DIR_TAG = (re.compile(r"sigma[^-]+-seed-?\d+-(.+)"), re.compile(r".+-[0-9a-f]{8}-(.+)"))


def dir_tag(name: str) -> str:
    """The tag of a run directory named ``name`` as the run commands name them (:data:`_DIR_TAG`); "" for none."""
    for pattern in _DIR_TAG:
        m = pattern.fullmatch(name)
        if m:
            return m.group(1)
    return ""


def variant_suffix(name: str) -> str:
    """Appended to the method and label of the record of a further radius ``radius_<name>``: " (box)"."""
    return f" ({name})"


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
    label: str = ""  # the display name (metrics.json / index.csv "label"); the method when empty
    variant: str = ""  # <name> of the further radius radius_<name> this record holds; "" for the certificate itself
    procedure: str = ""  # how the certificates were computed (metrics.json "procedure"); "" when not recorded
    samples: np.ndarray | None = None  # forward passes spent per example (certificates.csv "samples"), if recorded
    metric_radii: tuple[float, ...] = ()  # the radii of the run's own metrics (metrics.json certified_accuracy)
    tag: str = ""  # appended to method and label to tell procedures and tags apart (:func:`tell_procedures_apart`)
    run_tag: str = ""  # the run's tag=NAME, read from its directory's name (:func:`dir_tag`); "" for none

    def __post_init__(self):
        if not self.label:
            self.label = self.method

    @property
    def base_method(self) -> str:
        """The method of the certificate this record belongs to (itself, or the one it is a further radius of)."""
        return self.method.removesuffix(variant_suffix(self.variant)) if self.variant else self.method

    @property
    def base_label(self) -> str:
        return self.label.removesuffix(variant_suffix(self.variant)) if self.variant else self.label

    @property
    def noise_method(self) -> str:
        """The method as its result file names it: without the further radius' and the procedure's suffixes."""
        return self.base_method.removesuffix(self.tag) if self.tag else self.base_method

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
    with open(index, newline="", encoding="utf-8-sig") as fh:  # (a BOM, as spreadsheet programs write, is skipped)
        for row in csv.DictReader(fh):
            name = row["file"]
            if not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(f"{index}: file {name!r} is not a file name in {folder}")
            with np.load(folder / name) as z:
                labels = z["labels"].astype(np.int64) if "labels" in z.files else shared_labels[row["dataset"]]
                if "counts" in z.files:  # enumerated counts (DSSN): the exact certificate, recomputed
                    prediction, k = exact_certificate(z["counts"])
                    radius, rq = k, q
                else:
                    prediction = z["predicted"].astype(np.int64)
                    radius, rq = z["radius_l1"].astype(np.float64), None
            _check_arrays(folder / name, labels, prediction, radius)
            sigma = _finite(row["sigma"], f"{index}: sigma of {name}")
            if sigma <= 0:
                raise RunFileError(f"{index}: sigma of {name} must be > 0, got {row['sigma']}")
            records.append(
                RunRecord(
                    dataset=row["dataset"],
                    method=row["method"],
                    training=row["training"],
                    denoiser=row["denoiser"],
                    sigma=sigma,
                    labels=labels,
                    prediction=prediction,
                    radius=radius,
                    q=rq,
                    source=str(folder / row["file"]),
                    origin=folder.name,
                    extra={"time_per_image_s": float(row["time_per_image_s"] or "nan")},
                    label=row.get("label") or row["method"],
                )
            )
    return records


def _check_arrays(path: Path, labels, prediction, radius) -> None:
    """Published arrays bounded as a run's rows are: one label, prediction and radius per image, labels and
    predictions integers in [-1, 2**53] (-1: abstained), radii finite within 2**53 in magnitude."""
    arrays = [np.asarray(a) for a in (labels, prediction, radius)]
    if any(a.ndim != 1 or len(a) != len(arrays[0]) for a in arrays):
        raise RunFileError(f"{path}: labels, predictions and radii must be 1-D arrays of one length per image")
    for a, what in zip(arrays, ("labels", "predictions", "radii"), strict=True):
        if a.dtype.kind not in "iuf" or not np.isfinite(a).all() or (a.size and np.abs(a).max() > MAX_NUMBER):
            raise RunFileError(f"{path}: {what} must be finite numbers of at most 2**53 in magnitude")
    if arrays[0].size and min(arrays[0].min(), arrays[1].min()) < -1:
        raise RunFileError(f"{path}: labels and predictions must be >= -1")


class RunFileError(ValueError):
    """A result file of a run that the report cannot use (the message names the file and what is wrong)."""


def _text(meta: dict, key: str, path: Path, default: str | None = None) -> str:
    value = meta.get(key, default)
    if not isinstance(value, str) or not value:
        raise RunFileError(f"{path}: {key!r} must be a non-empty string, got {_short(repr(value))}")
    return value


def _integer(value, what: str, minimum: int | None = 0) -> int:
    """An integer from JSON (int, not bool) or a CSV cell ("12") within ``[minimum, MAX_NUMBER]`` (``minimum`` None:
    ``-MAX_NUMBER``); a RunFileError otherwise."""
    if isinstance(value, bool) or value is None:
        raise RunFileError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        # (a cell of thousands of digits is beyond the range anyway: not converted, which Python refuses)
        number = int(value) if len(value) < 40 else (MAX_NUMBER + 1) * (-1 if "-" in value else 1)
    else:
        raise RunFileError(f"{what} must be an integer, got {_short(repr(value))}")
    if abs(number) > MAX_NUMBER:
        raise RunFileError(f"{what} is out of range (at most 2**53 in magnitude), got {_short(str(value).strip())}")
    if minimum is not None and number < minimum:
        raise RunFileError(f"{what} must be >= {minimum}, got {number}")
    return number


def _short(number) -> str:
    """A number for a message: a huge integer by its magnitude, not its thousands of digits."""
    text = str(number)
    if len(text) <= 24:
        return text
    return f"{text[:8]}... ({len(text.lstrip('-'))} digits)" if text.lstrip("-").isdigit() else f"{text[:24]}..."


def _finite(value, what: str) -> float:
    """A finite number within ``±MAX_NUMBER`` from JSON or a CSV cell; a RunFileError otherwise."""
    if isinstance(value, bool) or value is None:
        raise RunFileError(f"{what} must be a finite number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RunFileError(f"{what} must be a finite number, got {_short(repr(value))}") from None
    except OverflowError:  # an integer beyond float
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_NUMBER:
        raise RunFileError(f"{what} must be a finite number of at most 2**53 in magnitude, got {_short(value)}")
    return number


def read_metrics(run_dir: str | Path) -> dict:
    """``metrics.json`` of a run, checked: a JSON object with the run's identity (dataset, method, training,
    denoiser: strings; sigma > 0 finite; n_examples, seed: integers; q for DSSN). Only plain values are used:
    nothing in it is ever imported or instantiated."""
    path = Path(run_dir) / "metrics.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))  # (a UTF-8 BOM is skipped)
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise RunFileError(f"{path}: holds a JSON {type(meta).__name__}, not the object ssn_exp writes")
    out = {key: _text(meta, key, path) for key in ("dataset", "method", "training")}
    out["denoiser"] = _text(meta, "denoiser", path, default="none")
    out["label"] = _text(meta, "label", path, default=out["method"])
    out["sigma"] = _finite(meta.get("sigma"), f"{path}: 'sigma'")
    if out["sigma"] <= 0:
        raise RunFileError(f"{path}: 'sigma' must be positive, got {meta.get('sigma')!r}")
    out["n_examples"] = _integer(meta.get("n_examples"), f"{path}: 'n_examples'")
    out["seed"] = _integer(meta.get("seed", 0), f"{path}: 'seed'")
    out["q"] = meta.get("q")  # checked where certificates.csv holds exact certificates k (rho = k / q)
    # how the certificates were computed: absent in files written before procedures were recorded
    out["procedure"] = _text(meta, "procedure", path) if "procedure" in meta else ""
    for key in ("acr", "seconds_per_example"):
        value = meta.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
    for key in FORWARD_PASS_KEYS:  # optional, but a value that is there must be a count
        if key in meta:
            out[key] = _finite(meta[key], f"{path}: {key!r}")
            if out[key] < 0:
                raise RunFileError(f"{path}: {key!r} must be >= 0, got {meta[key]!r}")
    acc = meta.get("certified_accuracy")
    radii = []
    if isinstance(acc, dict):
        for key in acc:
            try:
                radius = float(key)
            except ValueError:
                continue
            if 0 <= radius <= MAX_NUMBER:
                radii.append(radius)
    out["metric_radii"] = tuple(sorted(set(radii)))
    return out


def read_run_certificates(run_dir: str | Path) -> tuple[list[dict], bool, list[str]]:
    """The rows of ``certificates.csv``, checked and sorted by example index: index, label, prediction (integers
    >= 0, indices unique), ``k`` (an exact certificate rho = k / q, integer) or ``radius`` (finite), every
    further radius ``radius_<name>`` (finite) and, where the file has the column, ``samples`` (forward passes
    spent on the example, an integer >= 1); whether the file holds exact certificates (a ``k`` column); and the
    further radius columns (``extra_radius_columns`` of the header, in file order)."""
    path = Path(run_dir) / "certificates.csv"
    rows = []
    exact = False
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # (a UTF-8 BOM is skipped, not a column name)
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            exact = EXACT_COLUMN in header
            absent = [c for c in ("index", "label", "prediction") if c not in header]
            if EXACT_COLUMN not in header and "radius" not in header:
                absent.append(f"{EXACT_COLUMN} or radius")
            if absent:
                raise RunFileError(f"{path}: no column {', '.join(absent)} (header: {','.join(header) or 'empty'})")
            extra = extra_radius_columns(header)
            if EXTRA_RADIUS_PREFIX in extra:
                raise RunFileError(
                    f"{path}: a column {EXTRA_RADIUS_PREFIX!r} names no radius ({EXTRA_RADIUS_PREFIX}<name>)"
                )
            if len(set(extra)) != len(extra):
                raise RunFileError(f"{path}: a further radius column occurs twice (header: {','.join(header)})")
            for row in reader:
                line = f"{path} line {reader.line_num}"
                if None in row or any(row[c] is None for c in header):
                    raise RunFileError(f"{line}: {len(header)} fields expected (a short, long or torn row)")
                rec = {c: _integer(row[c], f"{line}: {c}") for c in ("index", "label", "prediction")}
                rec["radius"] = (
                    _integer(row[EXACT_COLUMN], f"{line}: {EXACT_COLUMN}", None)
                    if exact
                    else _finite(row["radius"], f"{line}: radius")
                )
                for c in extra:
                    rec[c] = _finite(row[c], f"{line}: {c}")
                if SAMPLES_COLUMN in header:
                    rec[SAMPLES_COLUMN] = _integer(row[SAMPLES_COLUMN], f"{line}: {SAMPLES_COLUMN}", minimum=1)
                rows.append(rec)
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise RunFileError(f"{path}: not a CSV file ({exc})") from None
    if not rows:
        raise RunFileError(f"{path}: no examples (a header without rows)")
    indices = [r["index"] for r in rows]
    if len(set(indices)) != len(indices):
        raise RunFileError(f"{path}: an example index occurs twice")
    return sorted(rows, key=lambda r: r["index"]), exact, extra


def load_run_dir(run_dir: str | Path) -> list[RunRecord]:
    """Read one of our run directories (metrics.json + certificates.csv): its record, and one more record per
    further radius column ``radius_<name>`` of the certificates (method ``"<method> (<name>)"``, label
    ``"<label> (<name>)"``, e.g. the box-constrained radius ``radius_box``: ``"uniform (box)"``).

    A file that cannot be used raises :class:`RunFileError` (a ``ValueError``) or ``OSError``, naming it."""
    run_dir = Path(run_dir)
    meta = read_metrics(run_dir)
    rows, is_exact, extra_columns = read_run_certificates(run_dir)
    q = _integer(meta["q"], f"{run_dir / 'metrics.json'}: 'q'", minimum=1) if is_exact else None
    if len(rows) != meta["n_examples"]:
        raise RunFileError(
            f"certificates.csv has {len(rows)} rows but metrics.json counts {meta['n_examples']} examples "
            "(a certification being resumed, or an edited file)"
        )
    rec = RunRecord(
        dataset=meta["dataset"],
        method=meta["method"],
        training=meta["training"],
        denoiser=meta["denoiser"],
        sigma=meta["sigma"],
        labels=np.asarray([r["label"] for r in rows], dtype=np.int64),
        prediction=np.asarray([r["prediction"] for r in rows], dtype=np.int64),
        radius=np.asarray([r["radius"] for r in rows], dtype=np.int64 if is_exact else np.float64),
        q=q,
        seed=meta["seed"],
        source=str(run_dir),
        extra={k: meta[k] for k in ("acr", "seconds_per_example", *FORWARD_PASS_KEYS) if k in meta},
        label=meta["label"],
        procedure=meta["procedure"],
        samples=np.asarray([r[SAMPLES_COLUMN] for r in rows], dtype=np.int64)
        if rows and SAMPLES_COLUMN in rows[0]
        else None,
        metric_radii=meta["metric_radii"],
        run_tag=dir_tag(run_dir.resolve().name),
    )
    records = [rec]
    for column in extra_columns:
        name = column[len(EXTRA_RADIUS_PREFIX) :]
        records.append(
            dataclasses.replace(
                rec,
                method=rec.method + variant_suffix(name),
                label=rec.label + variant_suffix(name),
                variant=name,
                radius=np.asarray([r[column] for r in rows], dtype=np.float64),
                q=None,
                extra=dict(rec.extra),
            )
        )
    return records


def tell_procedures_apart(records: list[RunRecord]) -> list[RunRecord]:
    """The records, where runs of one method were certified by more than one procedure (e.g. fixed and
    sequential) with the procedure appended to method and label (:func:`procedure_suffix`: "uniform [sequential]",
    "uniform [sequential] (box)"), and where runs of one method carry more than one tag (``tag=NAME``: the run
    directory's, :func:`dir_tag`) with the tag appended (:func:`tag_suffix`: "uniform [tag=n100k]"), so that
    tables, legends and deduplication keep them apart. Every other record is returned as it is (a report of one
    procedure and one tag per method looks as it did before procedures were recorded)."""
    procedures: dict[tuple[str, str], set[str]] = {}
    tags: dict[tuple[str, str], set[str]] = {}
    for r in records:
        procedures.setdefault((r.origin, r.noise_method), set()).add(r.procedure)
        tags.setdefault((r.origin, r.noise_method), set()).add(r.run_tag)
    out = []
    for r in records:
        key = (r.origin, r.noise_method)
        tag = procedure_suffix(r.procedure) if len(procedures[key]) > 1 and r.procedure else ""
        tag += tag_suffix(r.run_tag) if len(tags[key]) > 1 and r.run_tag else ""
        if not tag or r.tag:
            out.append(r)
            continue
        variant = variant_suffix(r.variant) if r.variant else ""
        out.append(
            dataclasses.replace(r, method=r.base_method + tag + variant, label=r.base_label + tag + variant, tag=tag)
        )
    return out


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
            try:
                records.extend(load_reference(p))
            except (OSError, KeyError, ValueError, TypeError, IndexError, zipfile.BadZipFile, csv.Error) as exc:
                problems.append(f"{p}: unreadable published arrays ({describe(exc)})")
        else:
            runs = find_runs(p)
            if not runs:
                problems.append(f"{p}: no metrics.json found (not a run, multirun or reference folder)")
            for run in runs:
                try:
                    records.extend(load_run_dir(run))
                except (OSError, ValueError) as exc:
                    problems.append(f"{run}: unreadable ({describe(exc)})")
    return records, problems


def sigma_label(sigma: float) -> str:
    """0.5 -> '0.5', 2.0 -> '2.0' (the paper's way of writing sigma)."""
    return f"{sigma:.2f}".rstrip("0").rstrip(".") if not math.isclose(sigma, round(sigma)) else f"{sigma:.1f}"
