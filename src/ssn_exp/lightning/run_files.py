"""The result files of a run directory (layer 2): ``certificates.csv``, ``metrics.json``, the curve PNG.

- ``certificates.csv``: a row per example, appended and flushed as it is certified, so a crash loses nothing
  done. Columns ``index,label,prediction,correct,radius,seconds`` then ``k`` (dssn: rho = k / q exactly) or
  ``p_lower`` (uniform, ssn; with ``radius_box``, the box-constrained radius), then ``counts``: the base
  classifier's votes as ``class:count`` pairs (nonzero only; DSSN: over all L offsets, else over the N
  estimation samples).
- ``metrics.json`` (written atomically): identity, clean and certified accuracy, ACR, timing.

Rows read back on resume are checked (:func:`read_certificates`): well-formed, one per example, for an
example of this certification with the data set's label, and consistent in themselves (DSSN: prediction
and k recomputed from the counts); anything else is a :class:`ResultsFileError` naming the file and row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ssn_exp.certify import average_certified_radius, certified_accuracy, clopper_pearson_lower, exact_certificate
from ssn_exp.exceptions import LinkedRunFileError, UserError
from ssn_exp.smoothing import Smoothing

__all__ = [
    "ResultsFileError",
    "LinkedRunFileError",
    "refuse_link",
    "append_rows",
    "BASE_COLUMNS",
    "columns_for",
    "format_counts",
    "parse_counts",
    "read_certificates",
    "write_rows_atomic",
    "write_json_atomic",
    "write_text_atomic",
    "merge_shards",
    "summarize",
    "format_table",
    "model_fingerprint",
]

BASE_COLUMNS = ["index", "label", "prediction", "correct", "radius", "seconds"]


class ResultsFileError(UserError, ValueError):
    """A result file that does not belong to this certification or is damaged (one-line message)."""


def refuse_link(path: Path) -> None:
    """Raise :class:`LinkedRunFileError` if ``path`` is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise LinkedRunFileError(
            f"{path} is a symbolic link; ssn_exp does not write run files through links: remove it, or give the "
            "run another directory (tag=NAME or hydra.run.dir=DIR)"
        )


def _open_new(tmp: Path):
    """A fresh temporary file opened for writing without following links (a stale one of this name goes first)."""
    try:
        os.unlink(tmp)  # removes a link itself, never its target
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "w", newline="")


def _replace(tmp: Path, path: Path) -> None:
    try:
        refuse_link(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: never half a file.

    Neither the temporary file nor ``path`` is followed if it is a symbolic link: a link at ``path`` is refused
    (:class:`LinkedRunFileError`), so a file outside the run directory is never written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with _open_new(tmp) as fh:
            fh.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


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
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def columns_for(smoothing: Smoothing) -> list[str]:
    if smoothing.deterministic:
        return BASE_COLUMNS + ["k", "counts"]
    return BASE_COLUMNS + ["p_lower"] + (["radius_box"] if smoothing.box_certificate else []) + ["counts"]


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


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes, dtypes and values): which weights were certified."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _torn_tail(text: str) -> str:
    """Drop a last line without its newline: a row cut by a crash mid-write."""
    return text[: text.rfind("\n") + 1]  # the whole text when it ends in a newline, "" when it has none


def read_certificates(
    path: Path,
    smoothing: Smoothing | None = None,
    *,
    allowed: Iterable[int] | None = None,
    labels: Callable[[Sequence[int]], Sequence[int]] | None = None,
    num_classes: int | None = None,
    n: int | None = None,
    alpha: float | None = None,
) -> dict[int, dict]:
    """Rows of ``certificates.csv`` by example index; ``{}`` if the file does not exist.

    With ``smoothing`` (and optionally ``allowed`` indices, a ``labels(indices)`` function, ``num_classes``,
    the estimation sample count ``n`` and ``alpha``) every row is checked; the first bad one raises
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
        return _read_rows(path, text, smoothing, allowed, labels, num_classes, n, alpha)
    except csv.Error as exc:
        raise ResultsFileError(f"{path} is not a CSV file ({exc}); certify into another directory") from None


def _read_rows(path, text, smoothing, allowed, labels, num_classes, n, alpha) -> dict[int, dict]:
    reader = csv.DictReader(io.StringIO(text))
    want = columns_for(smoothing) if smoothing is not None else None
    if want is not None and text and reader.fieldnames != want:
        raise ResultsFileError(
            f"{path} has columns {reader.fieldnames}, expected {want}: it was written for another method or by "
            "another version; certify into another directory"
        )
    allowed = None if allowed is None else set(allowed)
    rows: dict[int, dict] = {}
    for line, row in enumerate(reader, start=2):
        if smoothing is None:
            try:
                rows[int(row["index"])] = row
            except (TypeError, ValueError, KeyError):
                continue
            continue
        try:
            index = _check_row(row, smoothing, num_classes, n, alpha)
        except (TypeError, ValueError, KeyError) as exc:
            raise ResultsFileError(f"{path} line {line}: malformed certificate row ({exc})") from None
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


def _check_row(row: dict, smoothing: Smoothing, num_classes: int | None, n: int | None, alpha: float | None) -> int:
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
    if smoothing.deterministic:
        if int(counts.sum()) != smoothing.levels:
            raise ValueError(f"counts sum to {int(counts.sum())}, not L = {smoothing.levels}")
        a, k = exact_certificate(counts[None, :])
        if int(a[0]) != pred or int(k[0]) != int(row["k"]) or float(row["radius"]) != int(row["k"]) / smoothing.q:
            raise ValueError("prediction, k and radius do not follow from the counts")
    else:
        p = float(row["p_lower"])
        if not 0.0 <= p <= 1.0 or abs(radius - 2.0 * smoothing.lam * (p - 0.5)) > 1e-9 * max(1.0, abs(radius)):
            raise ValueError("p_lower and radius disagree")
        if n is not None and int(counts.sum()) != n:
            raise ValueError(f"counts sum to {int(counts.sum())}, not N = {n}")
        if n is not None and alpha is not None:
            want = float(clopper_pearson_lower(int(counts[pred]), n, alpha))
            if abs(p - want) > 1e-12:
                raise ValueError("p_lower does not follow from the counts of the prediction")
        if "radius_box" in row and not float(row["radius_box"]) >= radius - 1e-12:
            raise ValueError("radius_box is below radius")
    return index


def write_rows_atomic(path: Path, columns: list[str], rows: Sequence[dict]) -> None:
    """Write a whole CSV atomically (as :func:`write_text_atomic`: no half file, no writing through a link)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with _open_new(tmp) as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def merge_shards(out_dir: Path, world_size: int, smoothing: Smoothing) -> Path:
    """Merge ``certificates.rank*.csv`` (and any earlier merged file) into ``certificates.csv`` by index.

    Every rank's file must be present (an empty one for a rank without examples): a missing shard is an
    error rather than a silently shorter result.
    """
    out_dir = Path(out_dir)
    rows = read_certificates(out_dir / "certificates.csv")
    for r in range(world_size):
        shard = out_dir / f"certificates.rank{r}.csv"
        if not shard.is_file():
            raise ResultsFileError(f"{shard} is missing: rank {r} did not finish its shard")
    shards = sorted(out_dir.glob("certificates.rank*.csv"))  # also those of an earlier run with more ranks
    for shard in shards:
        rows.update(read_certificates(shard))
    path = out_dir / "certificates.csv"
    write_rows_atomic(path, columns_for(smoothing), [rows[i] for i in sorted(rows)])
    for shard in shards:
        shard.unlink(missing_ok=True)
    return path


def summarize(
    out_dir: Path, smoothing: Smoothing, meta: dict, radii: Sequence[float], plot: bool = True, indices=None
) -> dict:
    """metrics.json (atomic) and the curve PNG from ``certificates.csv`` (restricted to ``indices``)."""
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
    exact = smoothing.deterministic
    if exact:
        radius = np.array([int(rows[i]["k"]) for i in order], dtype=np.int64)
        q = smoothing.q
    else:
        radius = np.array([float(rows[i]["radius"]) for i in order])
        q = None
    radius_box = None
    if "radius_box" in rows[order[0]]:
        radius_box = np.array([float(rows[i]["radius_box"]) for i in order])
    seconds = float(np.mean([float(rows[i]["seconds"]) for i in order]))
    acc = certified_accuracy(correct, radius, radii, q=q)
    metrics = {
        "method": smoothing.name,
        "sigma": smoothing.sigma,
        "lambda": smoothing.lam,
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
        "forward_passes_per_example": smoothing.levels if exact else meta["n0"] + meta["n"],
    }
    if radius_box is not None:
        box = certified_accuracy(correct, radius_box, radii)
        metrics["certified_accuracy_box"] = {f"{r:g}": a for r, a in box.items()}
        metrics["acr_box"] = average_certified_radius(correct, radius_box)
    for key in ("model", "levels", "n0", "n", "alpha", "checkpoint", "ckpt_format", "arithmetic"):
        if key in meta:
            metrics.setdefault(key, meta[key])
    if exact:
        metrics["levels"] = smoothing.levels
        metrics["arithmetic"] = smoothing.arithmetic
    write_json_atomic(out_dir / "metrics.json", metrics)
    if plot:
        from ssn_exp.lightning.run_plot import plot_run_curve

        plot_run_curve(correct, radius, q, metrics, out_dir / "certified_accuracy.png", radius_box=radius_box)
    return metrics


def format_table(metrics: dict) -> str:
    """A short Markdown certified-accuracy table for the console (radii up to the first all-zero one)."""
    rows = [("certified accuracy (%)", metrics["certified_accuracy"])]
    if "certified_accuracy_box" in metrics:
        rows.append(("box-constrained (%)", metrics["certified_accuracy_box"]))
    items = list(rows[-1][1].items())
    cut = next((i for i, (_, v) in enumerate(items) if v == 0), len(items) - 1)
    radii = [r for r, _ in items[: cut + 1]]
    head = "| radius | " + " | ".join(radii) + " |"
    sep = "|---|" + "---|" * len(radii)
    lines = [f"| {name} | " + " | ".join(f"{100 * acc[r]:.1f}" for r in radii) + " |" for name, acc in rows]
    acr = f"ACR {metrics['acr']:.3f}" + (f" (box {metrics['acr_box']:.3f})" if "acr_box" in metrics else "")
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
