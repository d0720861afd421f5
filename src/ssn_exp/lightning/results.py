"""The result files of a run directory (layer 2): ``certificates.csv``, ``metrics.json``, the curve PNG.

- ``certificates.csv``: a row per example, appended and flushed as it is certified, so a crash loses nothing
  done. Its columns, how a row is written and how it is checked are the certificate record's
  (:class:`ssn_exp.certify.record.CertificateRecord`).
- ``metrics.json`` (written atomically): identity, clean and certified accuracy, ACR, timing.
- ``certificates.locuslab.tsv`` (written atomically with ``metrics.json``, from the same rows): the format of
  locuslab/smoothing's ``certify.py`` (``idx label predict radius correct time``, tab-separated), so analysis
  scripts written for it read our runs unchanged; an abstention is ``predict = -1``, ``correct = 0`` there.

Rows read back on resume are checked (:func:`read_certificates`): well-formed, one per example, for an
example of this certification with the data set's label, and consistent in themselves (the record's check:
e.g. DSSN's prediction and k recomputed from the counts); anything else is a :class:`ResultsFileError` naming
the file and row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ssn_exp.atomic import replace_file
from ssn_exp.certify.metrics import average_certified_radius, certified_accuracy
from ssn_exp.certify.record import (
    BASE_COLUMNS,
    EXACT_COLUMN,
    SAMPLES_COLUMN,
    CertificateRecord,
    extra_radius_columns,
    format_counts,
    parse_counts,
)
from ssn_exp.exceptions import LinkedRunFileError, UserError, describe

__all__ = [
    "ResultsFileError",
    "LinkedRunFileError",
    "refuse_link",
    "append_rows",
    "BASE_COLUMNS",
    "CertificateRecord",
    "format_counts",
    "parse_counts",
    "read_certificates",
    "write_rows_atomic",
    "write_json_atomic",
    "write_text_atomic",
    "merge_shards",
    "summarize",
    "write_locuslab",
    "format_table",
    "model_fingerprint",
]


class ResultsFileError(UserError, ValueError):
    """A result file that does not belong to this certification or is damaged (one-line message)."""


def refuse_link(path: Path) -> None:
    """Raise :class:`LinkedRunFileError` if ``path`` is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise LinkedRunFileError(
            f"{path} is a symbolic link; ssn_exp does not write run files through links: remove it, or give the "
            "run another directory (tag=NAME or hydra.run.dir=DIR)"
        )


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """:func:`ssn_exp.atomic.replace_file` for a run file: never half a file, and a symbolic link at ``path`` is
    refused (:class:`LinkedRunFileError`) rather than replaced, so a user sees that the run is not where they linked it.
    """
    refuse_link(path)
    replace_file(Path(path), text)


def append_rows(path: Path, columns: list[str], rows: Sequence[dict]) -> None:
    """Append (and flush) CSV ``rows`` to ``path``, creating it if needed; a symbolic link is refused."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            refuse_link(path)
        raise exc
    with os.fdopen(fd, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore").writerows(rows)


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as strict JSON (no NaN or Infinity: ``ValueError`` instead, nothing written), atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes, dtypes and values): which weights were certified."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _torn_tail(text: str) -> str:
    """Drop a last line without its newline: a row cut by a crash mid-write."""
    return text[: text.rfind("\n") + 1]  # the whole text when it ends in a newline, "" when it has none


def read_certificates(
    path: Path,
    record: CertificateRecord | None = None,
    *,
    allowed: Iterable[int] | None = None,
    labels: Callable[[Sequence[int]], Sequence[int]] | None = None,
    num_classes: int | None = None,
) -> dict[int, dict]:
    """Rows of ``certificates.csv`` by example index; ``{}`` if the file does not exist.

    With the ``record`` of this certification (and optionally ``allowed`` indices, a ``labels(indices)`` function
    and ``num_classes``) every row is checked (:meth:`CertificateRecord.check`); the first bad one raises
    :class:`ResultsFileError` naming the file and the row. A torn last line (no final newline) is ignored.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        text = _torn_tail(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ResultsFileError(
            f"{path} is not UTF-8 text: not a certificates file; certify into another directory"
        ) from None
    try:
        return _read_rows(path, text, record, allowed, labels, num_classes)
    except csv.Error as exc:
        raise ResultsFileError(f"{path} is not a CSV file ({exc}); certify into another directory") from None


def _read_rows(path, text, record, allowed, labels, num_classes) -> dict[int, dict]:
    reader = csv.DictReader(io.StringIO(text))
    want = record.columns if record is not None else None
    if want is not None and text and reader.fieldnames != want:
        raise ResultsFileError(
            f"{path} has columns {reader.fieldnames}, expected {want}: it was written for another method or by "
            "another version; certify into another directory"
        )
    allowed = None if allowed is None else set(allowed)
    rows: dict[int, dict] = {}
    for line, row in enumerate(reader, start=2):
        if record is None:
            try:
                rows[int(row["index"])] = row
            except (TypeError, ValueError, KeyError):
                continue
            continue
        try:
            index = record.check(row, num_classes)
        except (TypeError, ValueError, KeyError) as exc:
            raise ResultsFileError(f"{path} line {line}: malformed certificate row ({describe(exc)})") from None
        if allowed is not None and index not in allowed:
            raise ResultsFileError(
                f"{path} line {line}: example {index} is not one this certification selects (skip/max_examples/"
                "data set differ); certify into another directory"
            )
        if index in rows:
            raise ResultsFileError(f"{path} line {line}: a second row for example {index}")
        rows[index] = row
    if labels is not None and rows:
        order = sorted(rows)
        for index, label in zip(order, labels(order), strict=True):
            if int(rows[index]["label"]) != int(label):
                raise ResultsFileError(
                    f"{path}: the row of example {index} has label {rows[index]['label']} but the data set's label "
                    f"is {label}: the file belongs to other data or was edited; certify into another directory"
                )
    return rows


def write_rows_atomic(path: Path, columns: list[str], rows: Sequence[dict]) -> None:
    """Write a whole CSV atomically (:func:`write_text_atomic`)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def merge_shards(out_dir: Path, world_size: int, record: CertificateRecord, stem: str = "certificates") -> Path:
    """Merge ``{stem}.rank*.csv`` (and any earlier merged file) into ``{stem}.csv`` by index (``stem``: a job
    shard's, ``certificates.shard{j}of{J}``).

    Every rank's file must be present (an empty one for a rank without examples): a missing shard is an
    error rather than a silently shorter result.
    """
    out_dir = Path(out_dir)
    rows = read_certificates(out_dir / f"{stem}.csv")
    for r in range(world_size):
        shard = out_dir / f"{stem}.rank{r}.csv"
        if not shard.is_file():
            raise ResultsFileError(f"{shard} is missing: rank {r} did not finish its shard")
    shards = sorted(out_dir.glob(f"{stem}.rank*.csv"))  # also those of an earlier run with more ranks
    for shard in shards:
        rows.update(read_certificates(shard))
    path = out_dir / f"{stem}.csv"
    write_rows_atomic(path, record.columns, [rows[i] for i in sorted(rows)])
    for shard in shards:
        shard.unlink(missing_ok=True)  # a shard gone between the glob and here is no loss
    return path


def summarize(
    out_dir: Path, record: CertificateRecord, meta: dict, radii: Sequence[float], plot: bool = True, indices=None
) -> dict:
    """metrics.json (atomic) and the curve PNG from ``certificates.csv`` (restricted to ``indices``).

    Exact certificates (the record's k column) are counted exactly (rho = k / q); every further radius column
    ``radius_<name>`` of the record gives ``certified_accuracy_<name>`` and ``acr_<name>``."""
    out_dir = Path(out_dir)
    rows = read_certificates(out_dir / "certificates.csv")
    if indices is not None:
        missing = sorted(set(indices) - set(rows))
        if missing:
            raise ResultsFileError(
                f"{len(missing)} selected examples have no certificate in {out_dir} (e.g. {missing[:5]})"
            )
        rows = {i: rows[i] for i in indices}
    if not rows:
        raise ResultsFileError(f"no certificates in {out_dir / 'certificates.csv'}")
    order = sorted(rows)
    correct = np.array([int(rows[i]["correct"]) == 1 for i in order])
    noise = record.noise
    q = record.exact_denominator
    if q is not None:
        radius = np.array([int(rows[i][EXACT_COLUMN]) for i in order], dtype=np.int64)
    else:
        radius = np.array([float(rows[i]["radius"]) for i in order])
    extra = {
        c[len("radius_") :]: np.array([float(rows[i][c]) for i in order]) for c in extra_radius_columns(record.fields)
    }
    seconds = float(np.mean([float(rows[i]["seconds"]) for i in order]))
    passes = _forward_passes(record, [rows[i] for i in order])
    acc = certified_accuracy(correct, radius, radii, q=q)
    metrics = {
        "method": noise.name,
        "label": noise.label,  # the noise's display name (the report's tables and curves, wandb)
        "procedure": record.procedure.name,  # how the certificates were computed (exact, fixed, sequential, ...)
        "sigma": noise.sigma,
        "lambda": noise.lam,
        "q": meta.get("q"),
        "dataset": meta.get("dataset"),
        "training": meta.get("training"),
        "denoiser": meta.get("denoiser", "none"),
        "seed": meta.get("seed"),
        "n_examples": len(order),
        "clean_accuracy": float(correct.mean()),
        # examples whose certificate is negative: the smoothed classifier abstains there (randomized: p_lower < 1/2)
        "abstain_rate": float(np.mean(radius < 0)),
        "certified_accuracy": {f"{r:g}": a for r, a in acc.items()},
        "acr": average_certified_radius(correct, radius, q=q),
        "seconds_per_example": seconds,
        **passes,
    }
    for name, values in extra.items():
        metrics[f"certified_accuracy_{name}"] = {
            f"{r:g}": a for r, a in certified_accuracy(correct, values, radii).items()
        }
        metrics[f"acr_{name}"] = average_certified_radius(correct, values)
    for key in ("model", "levels", "checkpoint", "ckpt_format", "arithmetic"):
        if key in meta:
            metrics.setdefault(key, meta[key])
    metrics.update(record.procedure.describe())  # the procedure's own settings (fixed: n0, n, alpha), as it ran
    for key, value in noise.describe().items():  # the noise's own parameters (DSSN: levels, arithmetic)
        if key != "seed":  # the run's seed is meta's; method, sigma, lambda repeat the above, DSSN's q is the data's
            metrics[key] = value
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_locuslab(out_dir / LOCUSLAB_FILE, [rows[i] for i in order], correct, radius / q if q else radius)
    if plot:
        from ssn_exp.lightning.accuracy_curve import plot_run_curve

        plot_run_curve(correct, radius, q, metrics, out_dir / "certified_accuracy.png", extra=extra)
    return metrics


LOCUSLAB_FILE = "certificates.locuslab.tsv"


def write_locuslab(path: Path, rows: Sequence[dict], correct, rho) -> None:
    """locuslab/smoothing's ``certify.py`` output (atomic): ``idx label predict radius correct time``, one line per
    row; ``rho`` the rows' radii (exact certificates as k / q). An abstention (rho < 0) is ``predict = -1``,
    ``correct = 0`` as there; ``radius`` is written in full (``repr``, not locuslab's 3 digits) so that their
    ``(df.correct & (df.radius >= r)).mean()`` gives our certified accuracy; ``time`` is ``str(timedelta)`` of the
    row's ``seconds`` (its batch's time per example)."""
    import datetime

    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for row, ok, r in zip(rows, correct, rho, strict=True):
        abstain = bool(r < 0)
        predict = -1 if abstain else int(row["prediction"])
        time = datetime.timedelta(seconds=float(row["seconds"]))
        lines.append(f"{row['index']}\t{row['label']}\t{predict}\t{float(r)!r}\t{int(ok and not abstain)}\t{time}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def _forward_passes(record: CertificateRecord, rows: Sequence[dict]) -> dict:
    """``forward_passes_per_example`` (mean), ``forward_passes_median`` and ``forward_passes_p90``: the procedure's
    fixed count, or, where that depends on the data (None), the statistics of the rows' ``samples`` column."""
    fixed = record.procedure.forward_passes(record.noise)
    if fixed is not None:
        return {"forward_passes_per_example": fixed, "forward_passes_median": fixed, "forward_passes_p90": fixed}
    if SAMPLES_COLUMN not in record.fields:
        raise ValueError(
            f"{type(record.procedure).__name__}.forward_passes gives no count and its rows have no "
            f"{SAMPLES_COLUMN} column"
        )
    samples = np.array([int(r[SAMPLES_COLUMN]) for r in rows], dtype=np.int64)
    return {
        "forward_passes_per_example": float(samples.mean()),
        "forward_passes_median": float(np.median(samples)),
        "forward_passes_p90": float(np.percentile(samples, 90)),
    }


def format_table(metrics: dict) -> str:
    """A short Markdown certified-accuracy table for the console (radii up to the first all-zero one)."""
    rows = [("certified accuracy (%)", metrics["certified_accuracy"])]
    extra = [k[len("certified_accuracy_") :] for k in metrics if k.startswith("certified_accuracy_")]
    rows += [(f"{name} (%)", metrics[f"certified_accuracy_{name}"]) for name in extra]
    items = list(rows[-1][1].items())
    cut = next((i for i, (_, v) in enumerate(items) if v == 0), len(items) - 1)
    radii = [r for r, _ in items[: cut + 1]]
    head = "| radius | " + " | ".join(radii) + " |"
    sep = "|---|" + "---|" * len(radii)
    lines = [f"| {name} | " + " | ".join(f"{100 * acc[r]:.1f}" for r in radii) + " |" for name, acc in rows]
    acr = f"ACR {metrics['acr']:.3f}" + "".join(f" ({name} {metrics[f'acr_{name}']:.3f})" for name in extra)
    title = (
        f"{metrics['method']} sigma={metrics['sigma']:g} on {metrics['dataset']} ({metrics['training']} training): "
        f"clean {100 * metrics['clean_accuracy']:.1f}%, {acr}, n={metrics['n_examples']}, "
        f"{metrics['seconds_per_example'] * 1000:.1f} ms/example"
    )
    notes = []
    if metrics.get("abstain_rate", 0) > 0:
        notes.append(
            f"clean = the majority vote of the noisy copies; the smoothed classifier abstains on "
            f"{100 * metrics['abstain_rate']:.1f}% of the examples (p_lower < 1/2), which no radius counts as certified"
        )
    return "\n".join([title, head, sep, *lines, *notes])
