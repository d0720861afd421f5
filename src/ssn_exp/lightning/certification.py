"""Certification of a data set into a run directory (layer 2): the callback that runs it after ``fit``
and the Lightning predict task that runs it for a checkpoint. Both call the library (``ssn_exp.certify``).

Files: see :mod:`ssn_exp.lightning.run_files`. Under DDP every rank certifies its own shard
(``indices[rank::world]``, no padding) into ``certificates.rank{r}.csv``; rank 0 merges them by index.
Resuming skips the examples already certified, after checking every row read back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from ssn_exp.certify import NonFiniteLogitsError, certify_batch
from ssn_exp.lightning.data import dataset_labels, mix_seed
from ssn_exp.lightning.memory import MemoryLimitError, check_noise_batch, host_memory
from ssn_exp.lightning.run_files import (
    ResultsFileError,
    append_rows,
    columns_for,
    format_counts,
    merge_shards,
    model_fingerprint,
    read_certificates,
    summarize,
    write_json_atomic,
    write_rows_atomic,
)
from ssn_exp.smoothing import Smoothing

log = logging.getLogger("ssn_exp")

__all__ = [
    "certify_indices",
    "shard_indices",
    "ShardCertifier",
    "certify_dataset",
    "CertifyCallback",
    "CertifyTask",
    "run_certification",
    "finish_certification",
    "log_metrics",
]


def certify_indices(dataset_len: int, skip: int = 1, max_examples: int | None = None) -> list[int]:
    """The test examples certified: every ``skip``-th, at most ``max_examples``."""
    indices = list(range(0, dataset_len, max(1, int(skip))))
    return indices if max_examples is None else indices[: int(max_examples)]


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of ``indices``: ``indices[rank::world_size]`` (every index exactly once overall)."""
    return list(indices)[rank::world_size]


class ShardCertifier:
    """Certifies one rank's shard of the test examples into its CSV, resumably.

    Examples already present in the shard's CSV (or in a merged ``certificates.csv`` from an earlier
    attempt) are checked against the data set and skipped. Randomized methods seed their noise per
    example from (seed, index), so results depend neither on batching nor on sharding.
    ``certify_settings.json`` records what the certificates depend on (the noise, n0/n/alpha/seed for
    the randomized methods, and a fingerprint of the weights): other settings are refused.
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
        precision: str | None = None,
        barrier: Callable[[str], None] | None = None,
        device: torch.device | str | None = None,
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
        self.columns = columns_for(smoothing)
        if len(dataset) and device is not None:  # before anything is written: a corrected noise_batch just runs
            check_batch_memory(
                torch.as_tensor(dataset[0][0]).shape, smoothing, noise_batch, self.batch_size, n0, n, device
            )
        self._check_settings(
            {
                **self._settings(n0, n, alpha, seed),
                # how the base classifier is run changes its logits, hence the certificates
                "autocast": autocast if autocast not in (None, "none") else None,
                "precision": None if precision is None else str(precision),
                "channels_last": self.channels_last,
                "compile": bool(compile),
            },
            barrier,
        )
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(model) if compile else model
        self.path = self.out_dir / ("certificates.csv" if world_size == 1 else f"certificates.rank{rank}.csv")
        selected = certify_indices(len(dataset), skip, max_examples)
        self.shard = shard_indices(selected, rank, world_size)
        check = dict(
            smoothing=smoothing,
            labels=lambda idx: dataset_labels(dataset, idx),
            num_classes=num_classes,
            n=None if smoothing.deterministic else n,
            alpha=alpha,
        )
        if world_size == 1:
            done = read_certificates(self.path, allowed=self.shard, **check)
            keep = done
            complete = set(selected) <= set(done)
        else:  # this rank's rows from the merged file and from every shard file (the world size may have changed)
            merged = read_certificates(self.out_dir / "certificates.csv", allowed=selected, **check)
            complete = set(selected) <= set(merged)
            found = dict(merged)
            for path in sorted(self.out_dir.glob("certificates.rank*.csv")):
                found.update(read_certificates(path, allowed=selected, **check))
            done = {i: found[i] for i in self.shard if i in found}
            # this rank's file keeps the rows it had (another rank may take them over) and gains the ones it found
            keep = {**read_certificates(self.path, allowed=selected, **check), **done}
        if not complete and rank == 0:  # results are being added: a metrics.json of fewer examples is stale
            (self.out_dir / "metrics.json").unlink(missing_ok=True)
        # rewrite the shard file cleanly (drops a torn line, keeps every finished row)
        write_rows_atomic(self.path, self.columns, [keep[i] for i in sorted(keep)])
        self.done = set(done)
        self.todo = [i for i in self.shard if i not in self.done]

    def _settings(self, n0, n, alpha, seed) -> dict:
        settings = dict(self.smoothing.describe())
        if not self.smoothing.deterministic:  # DSSN certificates do not depend on n0, n, alpha or seed
            settings.update(n0=n0, n=n, alpha=alpha, seed=seed)
        settings["weights"] = model_fingerprint(self.model)
        return settings

    def _check_settings(self, settings: dict, barrier: Callable[[str], None] | None) -> None:
        """Refuse a directory of certificates made otherwise, then (rank 0) record ``settings``.

        Ranks that run concurrently pass ``barrier``: every rank checks before any rank writes a file
        (a shard file written by a fast rank must not look like an unexplained certificate to a slow one).
        """
        path = self.out_dir / "certify_settings.json"
        if not path.is_file() and any(self.out_dir.glob("certificates*.csv")):
            raise ResultsFileError(
                f"{self.out_dir} holds certificates but no certify_settings.json, so how they were made is unknown; "
                "certify into another directory (tag=NAME or hydra.run.dir=DIR)"
            )
        if path.is_file() and any(self.out_dir.glob("certificates*.csv")):
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ResultsFileError(f"{path} is unreadable ({exc}); certify into another directory") from None
            if not isinstance(old, dict):
                raise ResultsFileError(
                    f"{path} holds a JSON {type(old).__name__}, not the settings object ssn_exp writes; "
                    "certify into another directory (tag=NAME or hydra.run.dir=DIR)"
                )
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            if diff:
                raise ResultsFileError(
                    f"{self.out_dir} holds certificates made with other settings ({'; '.join(diff)}); "
                    "certify into another directory (tag=NAME or hydra.run.dir=DIR)"
                )
        concurrent = barrier is not None and self.world_size > 1
        if concurrent:
            barrier("certify settings checked")
        if self.rank == 0:
            write_json_atomic(path, settings)
        if concurrent:  # no shard file exists without the settings that explain it, even if a rank is killed here
            barrier("certify settings written")

    def chunks(self) -> list[list[int]]:
        return [self.todo[i : i + self.batch_size] for i in range(0, len(self.todo), self.batch_size)]

    def run_chunk(self, chunk: list[int], device: torch.device) -> None:
        """Certify the examples of ``chunk`` and append (and flush) their rows."""
        xs, ys = zip(*(self.dataset[i] for i in chunk), strict=True)
        x = torch.stack([torch.as_tensor(v) for v in xs]).to(device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        try:
            parts = []
            if self.smoothing.deterministic:
                cert = self._certify(x, None)
            else:  # one generator per example: reproducible whatever the batching or sharding
                for j, idx in enumerate(chunk):
                    g = torch.Generator(device=device).manual_seed(mix_seed(self.seed, 0xCE27, idx))
                    parts.append(self._certify(x[j : j + 1], g))
                cert = _concat(parts)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # an allocation the memory check could not foresee
            if not isinstance(exc, torch.OutOfMemoryError) and not _is_allocation_failure(exc):
                raise
            raise MemoryLimitError(
                f"out of memory certifying test example(s) {chunk[:10]} on {device} with "
                f"certify.noise_batch={self.kw['noise_batch']}: set a smaller certify.noise_batch"
            ) from None
        except NonFiniteLogitsError as exc:  # name the data set's examples, not positions in a batch
            if self.smoothing.deterministic:
                examples = [chunk[p] for p in exc.positions]
            else:  # one example at a time: the one that failed is the next without a part
                examples = [chunk[len(parts)]]
            raise NonFiniteLogitsError(
                f"the model returned NaN or infinite logits for test example(s) {examples[:10]}"
                f"{' ...' if len(examples) > 10 else ''}: no certificate is computed from them",
                positions=examples,
            ) from None
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
                "radius": repr(float(cert.radius[j])),
                "seconds": f"{seconds:.6f}",
                "counts": format_counts(cert.counts[j]),
            }
            if self.smoothing.deterministic:
                row["k"] = int(cert.k[j])
            else:
                row["p_lower"] = repr(float(cert.p_lower[j]))
                if cert.radius_box is not None:
                    row["radius_box"] = repr(float(cert.radius_box[j]))
            rows.append(row)
        append_rows(self.path, self.columns, rows)  # never through a symbolic link
        self.done.update(chunk)

    def _certify(self, x, generator):
        kw = dict(generator=generator, **self.kw)
        if self.autocast_dtype is None:
            return certify_batch(self.forward, x, self.smoothing, self.num_classes, **kw)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            return certify_batch(self.forward, x, self.smoothing, self.num_classes, **kw)

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


def _is_allocation_failure(exc: BaseException) -> bool:
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower() or "not enough memory" in text


def check_batch_memory(shape, smoothing: Smoothing, noise_batch: int, batch_size: int, n0: int, n: int, device) -> None:
    """Refuse (:class:`MemoryLimitError`, naming ``certify.noise_batch``) a noisy batch that cannot fit in the memory
    free on ``device`` now: the inputs of one forward pass are at most ``noise_batch``, and at most ``batch_size``
    examples times the samples per example (L offsets for DSSN, max(n0, n) otherwise)."""
    device = torch.device(device)
    per_example = smoothing.levels if smoothing.deterministic else max(int(n0), int(n))
    rows = min(int(noise_batch), int(batch_size) * int(per_example))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"the memory free on {device}"
    else:
        free, where = host_memory(available=True), "the memory available on this host"
    check_noise_batch(rows, shape, free, where, asked=int(noise_batch))


def certify_dataset(model, smoothing, dataset, out_dir, *, device="cpu", progress=True, **kwargs) -> Path:
    """Certify every ``skip``-th test example (this rank's shard) into ``out_dir``; returns the CSV path."""
    return ShardCertifier(model, smoothing, dataset, out_dir, device=device, **kwargs).run(device, progress)


def _concat(parts):
    first = parts[0]
    for field in ("prediction", "radius", "counts", "p_lower", "counts_n0", "radius_box"):
        if getattr(first, field) is not None:
            setattr(first, field, np.concatenate([getattr(p, field) for p in parts]))
    return first


def _progress_bar(total: int, initial: int, smoothing: Smoothing, enabled: bool) -> Callable:
    from ssn_exp.lightning.progress import progress_reporter

    return progress_reporter(total, initial, f"certify {smoothing.name} sigma={smoothing.sigma:g}", "img", enabled)


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
        if trainer.interrupted or trainer.current_epoch < (trainer.max_epochs or 0):
            # stopped early (trainer.max_time, a callback): certifying would describe a model that is not the run's
            if trainer.global_rank == 0:
                log.warning(
                    "training stopped at epoch %d of %d: certification skipped; run the same command again to "
                    "finish training and certify",
                    trainer.current_epoch,
                    trainer.max_epochs,
                )
            return
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
        barrier=barrier,
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
            barrier=self.trainer.strategy.barrier,
            device=self.device,
            **{k: v for k, v in self.settings.items() if k != "progress"},
        )
        return DataLoader(self.certifier.chunks(), batch_size=None, collate_fn=_identity)

    def on_predict_start(self) -> None:
        self.model.eval()

    def predict_step(self, chunk, batch_idx):
        self.certifier.run_chunk(list(chunk), self.device)


def log_metrics(logger, metrics: dict, out_dir: Path | None = None) -> None:
    """Flatten metrics.json into the logger (certify/acc@r, certify/acr, ...); wandb gets plots and tables too."""
    flat = {f"certify/acc@{r}": v for r, v in metrics["certified_accuracy"].items()}
    flat.update({f"certify/acc_box@{r}": v for r, v in metrics.get("certified_accuracy_box", {}).items()})
    for key in ("clean_accuracy", "acr", "acr_box", "seconds_per_example", "forward_passes_per_example"):
        if key in metrics:
            flat[f"certify/{key}"] = float(metrics[key])
    logger.log_metrics(flat)
    if out_dir is not None:
        from ssn_exp.lightning.tracking import log_certification

        log_certification(logger, out_dir, metrics)
    if hasattr(logger, "save"):
        logger.save()
