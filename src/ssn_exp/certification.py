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
import io
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
    """Rows by example index. A torn last line (a crash mid-write: no final newline) is ignored."""
    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows: dict[int, dict] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if None in row or None in row.values() or "" in row.values():
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


def _fmt(value: float) -> str:
    return repr(float(value))


def certify_indices(dataset_len: int, skip: int = 1, max_examples: int | None = None) -> list[int]:
    """The test examples certified: every ``skip``-th, at most ``max_examples``."""
    indices = list(range(0, dataset_len, max(1, int(skip))))
    return indices if max_examples is None else indices[: int(max_examples)]


#: Settings that change certificates: a resumed certification must use the same ones.
RESULT_SETTINGS = ("n0", "n", "alpha", "seed")


class ShardCertifier:
    """Certifies one rank's shard of the test examples into its CSV, resumably.

    The shard is ``indices[rank::world_size]`` (no padding: every example exactly once overall).
    Examples already present in the shard's CSV (or in a merged ``certificates.csv`` from an
    earlier attempt) are skipped. Randomized methods seed their noise per example from
    (seed, index), so results depend neither on batching nor on sharding.
    """

    def __init__(
        self,
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
        rank: int = 0,
        world_size: int = 1,
        autocast: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        self.model, self.smoothing, self.dataset = model, smoothing, dataset
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.num_classes = num_classes
        self.kw = dict(n0=n0, n=n, alpha=alpha, noise_batch=noise_batch)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        dtypes = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if autocast not in dtypes:
            raise ValueError(f"certify.autocast must be null, bf16 or fp16, got {autocast!r}")
        self.autocast_dtype = dtypes[autocast]
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(model) if compile else model
        self.columns = _columns(smoothing)
        self._check_settings(
            {"method": smoothing.name, "sigma": smoothing.sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed}
        )
        self.path = self.out_dir / ("certificates.csv" if world_size == 1 else f"certificates.rank{rank}.csv")
        self.shard = certify_indices(len(dataset), skip, max_examples)[rank::world_size]
        done = read_certificates(self.path)
        if world_size > 1:
            merged = read_certificates(self.out_dir / "certificates.csv")
            done.update({i: merged[i] for i in self.shard if i in merged})
        # rewrite the shard file cleanly (drops a torn line, keeps every finished row)
        _write_rows_atomic(self.path, self.columns, [done[i] for i in sorted(done)])
        self.done = set(done)
        self.todo = [i for i in self.shard if i not in self.done]

    def _check_settings(self, settings: dict) -> None:
        if self.smoothing.deterministic:  # DSSN certificates do not depend on n0, n, alpha or seed
            settings = {k: v for k, v in settings.items() if k in ("method", "sigma")}
        path = self.out_dir / "certify_settings.json"
        if path.is_file() and (self.out_dir / "certificates.csv").is_file():
            old = json.loads(path.read_text())
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            if diff:
                from ssn_exp.lit import CheckpointMismatch

                raise CheckpointMismatch(
                    f"{self.out_dir} holds certificates made with other settings ({'; '.join(diff)}); "
                    "certify into another directory (tag=NAME or hydra.run.dir=DIR)"
                )
        if self.rank == 0:
            write_json_atomic(path, settings)

    def chunks(self) -> list[list[int]]:
        return [self.todo[i : i + self.batch_size] for i in range(0, len(self.todo), self.batch_size)]

    def run_chunk(self, chunk: list[int], device: torch.device) -> None:
        """Certify the examples of ``chunk`` and append (and flush) their rows."""
        xs, ys = zip(*(self.dataset[i] for i in chunk), strict=True)
        x = torch.stack([torch.as_tensor(v) for v in xs]).to(device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        if self.smoothing.deterministic:
            cert = self._certify(x, None)
        else:  # one generator per example: reproducible whatever the batching or sharding
            parts = []
            for j, idx in enumerate(chunk):
                g = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + idx)
                parts.append(self._certify(x[j : j + 1], g))
            cert = _concat(parts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - t0) / len(chunk)
        rows = []
        for j, idx in enumerate(chunk):
            label, pred = int(ys[j]), int(cert.prediction[j])
            row = {
                "index": idx,
                "label": label,
                "prediction": pred,
                "correct": int(pred == label),
                "radius": _fmt(cert.radius[j]),
                "seconds": f"{seconds:.6f}",
            }
            if self.smoothing.deterministic:
                row["k"] = int(cert.k[j])
            else:
                row["p_lower"] = _fmt(cert.p_lower[j])
            rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerows(rows)
        self.done.update(chunk)

    def _certify(self, x, generator):
        return _certify(
            self.forward,
            x,
            self.smoothing,
            self.num_classes,
            generator=generator,
            autocast_dtype=self.autocast_dtype,
            **self.kw,
        )

    def run(self, device, progress: bool = True) -> Path:
        device = torch.device(device)
        self.model.eval().to(device)
        bar = _progress_bar(
            len(self.shard), len(self.shard) - len(self.todo), self.smoothing, enabled=progress and self.rank == 0
        )
        try:
            for chunk in self.chunks():
                self.run_chunk(chunk, device)
                bar(len(chunk))
        finally:
            bar(0, close=True)
        return self.path


def certify_dataset(model, smoothing, dataset, out_dir, *, device="cpu", progress=True, **kwargs) -> Path:
    """Certify every ``skip``-th test example (this rank's shard) into ``out_dir``; returns the CSV path."""
    return ShardCertifier(model, smoothing, dataset, out_dir, **kwargs).run(device, progress)


def _certify(model, x, smoothing, num_classes, *, n0, n, alpha, noise_batch, generator, autocast_dtype):
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


def summarize(
    out_dir: Path, smoothing: Smoothing, meta: dict, radii: Sequence[float], plot: bool = True, indices=None
) -> dict:
    """metrics.json (atomic) and the curve PNG from ``certificates.csv`` (restricted to ``indices``)."""
    out_dir = Path(out_dir)
    rows = read_certificates(out_dir / "certificates.csv")
    if indices is not None:
        missing = sorted(set(indices) - set(rows))
        if missing:
            raise RuntimeError(
                f"{len(missing)} selected examples have no certificate in {out_dir} (e.g. {missing[:5]})"
            )
        rows = {i: rows[i] for i in indices}
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
                log_metrics(logger, self.metrics, self.out_dir)


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
    """Certify this rank's shard, then (rank 0) merge and summarize. Returns metrics on rank 0."""
    dataset = datamodule.certify_set()
    certify_dataset(
        model,
        smoothing,
        dataset,
        out_dir,
        num_classes=datamodule.num_classes,
        device=device,
        rank=rank,
        world_size=world_size,
        progress=progress,
        **settings,
    )
    if world_size > 1 and barrier is not None:
        barrier("certified")
    if rank != 0:
        return None
    return finish_certification(out_dir, smoothing, world_size, len(dataset), settings, meta, radii)


def finish_certification(out_dir, smoothing, world_size, dataset_len, settings, meta, radii) -> dict:
    """Merge the shards (if any) and write metrics.json and the curve for the selected examples."""
    if world_size > 1:
        merge_shards(out_dir, world_size, smoothing)
    selected = certify_indices(dataset_len, settings.get("skip", 1), settings.get("max_examples"))
    meta = {**meta, "n0": settings["n0"], "n": settings["n"], "alpha": settings["alpha"]}
    return summarize(out_dir, smoothing, meta, radii, indices=set(selected))


def _identity(batch):
    return batch


class CertifyTask(pl.LightningModule):
    """Certification as a Lightning predict loop (``trainer.predict(task)``).

    Every DDP rank builds the loader of its own shard of not-yet-certified examples (no padding,
    no duplicates) and appends its rows to its own CSV; :func:`finish_certification` merges them
    by example index afterwards.
    """

    def __init__(self, model, smoothing, dataset, out_dir, num_classes: int, settings: dict):
        super().__init__()
        self.model = model
        self.smoothing = smoothing
        self.dataset = dataset
        self.out_dir = str(out_dir)
        self.num_classes = num_classes
        self.settings = settings
        self.certifier: ShardCertifier | None = None

    def predict_dataloader(self):
        from torch.utils.data import DataLoader

        self.certifier = ShardCertifier(
            self.model,
            self.smoothing,
            self.dataset,
            self.out_dir,
            num_classes=self.num_classes,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
            **self.settings,
        )
        return DataLoader(self.certifier.chunks(), batch_size=None, collate_fn=_identity)

    def on_predict_start(self) -> None:
        self.model.eval()

    def predict_step(self, chunk, batch_idx):
        self.certifier.run_chunk(list(chunk), self.device)


def log_metrics(logger, metrics: dict, out_dir: Path | None = None) -> None:
    """Flatten metrics.json into the logger (certify/acc@r, certify/acr, ...); wandb gets plots and tables too."""
    flat = {f"certify/acc@{r}": v for r, v in metrics["certified_accuracy"].items()}
    for key in ("clean_accuracy", "acr", "seconds_per_example", "forward_passes_per_example"):
        flat[f"certify/{key}"] = float(metrics[key])
    logger.log_metrics(flat)
    if out_dir is not None:
        from ssn_exp.tracking import log_certification

        log_certification(logger, out_dir, metrics)
    if hasattr(logger, "save"):
        logger.save()
