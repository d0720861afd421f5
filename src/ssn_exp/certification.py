"""Certification of a data set into a run directory, and the Lightning callback that runs it after fit.

Files written (see README "Outputs"):
- ``certificates.csv``: a row per example, appended and flushed as it is certified, so a crash loses
  nothing done; a re-run skips the examples already there (resume). Columns
  ``index,label,prediction,correct,radius,seconds`` plus ``k`` (dssn) or ``p_lower`` (uniform, ssn).
- ``metrics.json`` (atomic): the run's identity, clean and certified accuracy, ACR, timing.
- ``certified_accuracy.png``: the certified-accuracy curve.
Under DDP every rank certifies its own shard (``index % world == rank``) into
``certificates.rank{r}.csv``; rank 0 merges them by example index.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from ssn_exp.certify import average_certified_radius, certified_accuracy, certify_batch
from ssn_exp.smoothing import DSSN, Smoothing

__all__ = ["certify_dataset", "CertifyCallback", "write_json_atomic", "read_certificates", "summarize"]

BASE_COLUMNS = ["index", "label", "prediction", "correct", "radius", "seconds"]


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _columns(smoothing: Smoothing) -> list[str]:
    return BASE_COLUMNS + (["k"] if smoothing.deterministic else ["p_lower"])


def read_certificates(path: Path) -> dict[int, dict]:
    """Rows by example index; a torn last line (crash mid-write) is ignored."""
    rows: dict[int, dict] = {}
    if not Path(path).is_file():
        return rows
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            if None in row.values() or None in row or any(v == "" for v in row.values()):
                continue
            try:
                rows[int(row["index"])] = row
            except ValueError:
                continue
    return rows


def _write_rows_atomic(path: Path, columns: list[str], rows: Sequence[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _open_append(path: Path, columns: list[str]):
    """Open for appending, rewriting the file first if it holds a torn last line or another header."""
    done = read_certificates(path)
    if path.is_file():
        with open(path, newline="") as fh:
            header = fh.readline().strip().split(",")
            fh.seek(0)
            lines = fh.read().splitlines()
        if header != columns or len(lines) - 1 != len(done):
            _write_rows_atomic(path, columns, [done[i] for i in sorted(done)])
    else:
        _write_rows_atomic(path, columns, [])
    return open(path, "a", newline=""), done


def _fmt(value: float) -> str:
    return repr(float(value))


def certify_dataset(
    model: torch.nn.Module,
    smoothing: Smoothing,
    dataset,
    out_dir: str | Path,
    *,
    num_classes: int,
    skip: int = 1,
    max_examples: int | None = None,
    n0: int = 64,
    n: int = 100_000,
    alpha: float = 0.001,
    noise_batch: int = 1024,
    batch_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> Path:
    """Certify every ``skip``-th test example (this rank's shard) into ``out_dir``; returns the CSV path.

    Resumable: examples already in the CSV are skipped. Randomized methods seed their noise per
    example from (seed, index), so results do not depend on batching or sharding either.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = _columns(smoothing)
    name = "certificates.csv" if world_size == 1 else f"certificates.rank{rank}.csv"
    path = out_dir / name
    indices = list(range(0, len(dataset), max(1, int(skip))))
    if max_examples is not None:
        indices = indices[: int(max_examples)]
    mine = [i for i in indices if i % world_size == rank]
    fh, done = _open_append(path, columns)
    if world_size > 1 and rank == 0:  # a merged file from an earlier single-process attempt counts too
        done.update({i: r for i, r in read_certificates(out_dir / "certificates.csv").items() if i % world_size == 0})
    todo = [i for i in mine if i not in done]
    device = torch.device(device)
    model.eval().to(device)
    writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
    bar = _progress_bar(len(mine), len(mine) - len(todo), smoothing, enabled=progress and rank == 0)
    try:
        for start in range(0, len(todo), max(1, batch_size)):
            chunk = todo[start : start + batch_size]
            xs, ys = zip(*(dataset[i] for i in chunk), strict=True)
            x = torch.stack([torch.as_tensor(v) for v in xs]).to(device)
            t0 = time.perf_counter()
            if smoothing.deterministic:
                cert = _certify(model, x, smoothing, num_classes, n0, n, alpha, noise_batch, None, autocast_dtype)
            else:  # one generator per example: reproducible whatever the batching or sharding
                parts = []
                for j, idx in enumerate(chunk):
                    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + idx)
                    parts.append(
                        _certify(
                            model, x[j : j + 1], smoothing, num_classes, n0, n, alpha, noise_batch, g, autocast_dtype
                        )
                    )
                cert = _concat(parts)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for j, idx in enumerate(chunk):
                label = int(ys[j])
                pred = int(cert.prediction[j])
                row = {
                    "index": idx,
                    "label": label,
                    "prediction": pred,
                    "correct": int(pred == label),
                    "radius": _fmt(cert.radius[j]),
                    "seconds": f"{seconds:.6f}",
                }
                if smoothing.deterministic:
                    row["k"] = int(cert.k[j])
                else:
                    row["p_lower"] = _fmt(cert.p_lower[j])
                writer.writerow(row)
            fh.flush()
            bar(len(chunk))
    finally:
        fh.close()
        bar(0, close=True)
    return path


def _certify(model, x, smoothing, num_classes, n0, n, alpha, noise_batch, generator, autocast_dtype):
    if autocast_dtype is None:
        return certify_batch(
            model, x, smoothing, num_classes, n0=n0, n=n, alpha=alpha, noise_batch=noise_batch, generator=generator
        )
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        return certify_batch(
            model, x, smoothing, num_classes, n0=n0, n=n, alpha=alpha, noise_batch=noise_batch, generator=generator
        )


def _concat(parts):
    first = parts[0]
    for field in ("prediction", "radius", "counts", "p_lower", "counts_n0"):
        setattr(first, field, np.concatenate([getattr(p, field) for p in parts]))
    return first


def _progress_bar(total: int, initial: int, smoothing: Smoothing, enabled: bool) -> Callable:
    if not enabled:
        return lambda k, close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=f"certify {smoothing.name} sigma={smoothing.sigma:g}", unit="img")

    def update(k: int, close: bool = False):
        if close:
            bar.close()
        elif k:
            bar.update(k)

    return update


def merge_shards(out_dir: Path, world_size: int, smoothing: Smoothing) -> Path:
    """Merge ``certificates.rank*.csv`` (and any earlier merged file) into ``certificates.csv`` by index."""
    out_dir = Path(out_dir)
    rows = read_certificates(out_dir / "certificates.csv")
    for r in range(world_size):
        rows.update(read_certificates(out_dir / f"certificates.rank{r}.csv"))
    path = out_dir / "certificates.csv"
    _write_rows_atomic(path, _columns(smoothing), [rows[i] for i in sorted(rows)])
    for r in range(world_size):
        (out_dir / f"certificates.rank{r}.csv").unlink(missing_ok=True)
    return path


def summarize(out_dir: Path, smoothing: Smoothing, meta: dict, radii: Sequence[float], plot: bool = True) -> dict:
    """metrics.json (atomic) and the curve PNG from ``certificates.csv``; returns the metrics."""
    out_dir = Path(out_dir)
    rows = read_certificates(out_dir / "certificates.csv")
    if not rows:
        raise RuntimeError(f"no certificates in {out_dir / 'certificates.csv'}")
    order = sorted(rows)
    correct = np.array([int(rows[i]["correct"]) == 1 for i in order])
    exact = isinstance(smoothing, DSSN)
    if exact:
        radius = np.array([int(rows[i]["k"]) for i in order], dtype=np.int64)
        q = smoothing.q
    else:
        radius = np.array([float(rows[i]["radius"]) for i in order])
        q = None
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
        "certified_accuracy": {f"{r:g}": a for r, a in acc.items()},
        "acr": average_certified_radius(correct, radius, q=q),
        "seconds_per_example": seconds,
        "forward_passes_per_example": smoothing.levels if exact else meta["n0"] + meta["n"],
    }
    for key in ("arch", "levels", "n0", "n", "alpha"):
        if key in meta:
            metrics.setdefault(key, meta[key])
    if exact:
        metrics["levels"] = smoothing.levels
    write_json_atomic(out_dir / "metrics.json", metrics)
    if plot:
        from ssn_exp.plots import plot_run_curve

        plot_run_curve(correct, radius, q, metrics, out_dir / "certified_accuracy.png")
    return metrics


def format_table(metrics: dict) -> str:
    """A short Markdown certified-accuracy table for the console (radii up to the first all-zero one)."""
    items = list(metrics["certified_accuracy"].items())
    cut = next((i for i, (_, v) in enumerate(items) if v == 0), len(items) - 1)
    items = items[: cut + 1]
    head = "| radius | " + " | ".join(r for r, _ in items) + " |"
    sep = "|---|" + "---|" * len(items)
    vals = "| certified accuracy (%) | " + " | ".join(f"{100 * v:.1f}" for _, v in items) + " |"
    title = (
        f"{metrics['method']} sigma={metrics['sigma']:g} on {metrics['dataset']} ({metrics['training']} training): "
        f"clean {100 * metrics['clean_accuracy']:.1f}%, ACR {metrics['acr']:.3f}, n={metrics['n_examples']}, "
        f"{metrics['seconds_per_example'] * 1000:.1f} ms/example"
    )
    return "\n".join([title, head, sep, vals])


class CertifyCallback(pl.Callback):
    """After ``fit``: certify the test split (every ``skip``-th example) into ``out_dir``.

    Sharded over DDP ranks; rank 0 merges, writes metrics.json and the curve, and logs the metrics.
    """

    def __init__(self, out_dir, datamodule, settings: dict, radii: Sequence[float], meta: dict, progress: bool = True):
        self.out_dir = Path(out_dir)
        self.datamodule = datamodule
        self.settings = settings
        self.radii = list(radii)
        self.meta = meta
        self.progress = progress
        self.metrics: dict | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.metrics = run_certification(
            pl_module.model,
            pl_module.smoothing,
            self.datamodule,
            self.out_dir,
            settings=self.settings,
            radii=self.radii,
            meta=self.meta,
            device=pl_module.device,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            barrier=trainer.strategy.barrier,
            progress=self.progress,
        )
        if trainer.global_rank == 0 and self.metrics is not None:
            for logger in trainer.loggers:
                log_metrics(logger, self.metrics)


def run_certification(
    model,
    smoothing,
    datamodule,
    out_dir,
    *,
    settings,
    radii,
    meta,
    device,
    rank=0,
    world_size=1,
    barrier=None,
    progress=True,
) -> dict | None:
    """Certify (this rank's shard), merge on rank 0, and summarize. Returns metrics on rank 0."""
    certify_dataset(
        model,
        smoothing,
        datamodule.certify_set(),
        out_dir,
        num_classes=datamodule.num_classes,
        device=device,
        rank=rank,
        world_size=world_size,
        progress=progress,
        **settings,
    )
    if world_size > 1:
        if barrier is not None:
            barrier("certified")
        if rank != 0:
            return None
        merge_shards(out_dir, world_size, smoothing)
    return summarize(
        out_dir, smoothing, {**meta, "n0": settings["n0"], "n": settings["n"], "alpha": settings["alpha"]}, radii
    )


def log_metrics(logger, metrics: dict) -> None:
    """Flatten metrics.json into the logger (certify/acc@r, certify/acr, ...)."""
    flat = {f"certify/acc@{r}": v for r, v in metrics["certified_accuracy"].items()}
    for key in ("clean_accuracy", "acr", "seconds_per_example", "forward_passes_per_example"):
        flat[f"certify/{key}"] = float(metrics[key])
    logger.log_metrics(flat)
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "summary"):
        try:
            logger.experiment.summary.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
            logger.experiment.summary.update(flat)
        except Exception:  # a disabled/offline experiment without a summary
            pass
    if hasattr(logger, "save"):
        logger.save()
