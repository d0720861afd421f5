"""Certification of a data set into a run directory (layer 2): one driver, :func:`run_certification`, run by the
callback after ``fit`` and by the Lightning predict task for a model without training (``python -m
ssn_exp.certify``, the denoiser variants). It calls the library: a procedure (:mod:`ssn_exp.certify.procedures`)
certifies each batch and the certificate record (:mod:`ssn_exp.certify.record`) writes and checks the rows; the
driver never asks which noise or procedure it holds.

Files: see :mod:`ssn_exp.lightning.results`. Under DDP every rank certifies its own shard
(``indices[rank::world]``, no padding) into ``certificates.rank{r}.csv``; rank 0 merges them by index.
Resuming skips the examples already certified, after checking every row read back.

A certification can also be split over jobs (``certify.num_shards=J``, ``certify.shard=j``): the same idea one level
up. Job ``j`` certifies ``indices[j::J]`` (its ranks ``indices[j::J][r::W]``) into ``certificates.shard{j}of{J}.csv``
(its ranks' files ``certificates.shard{j}of{J}.rank{r}.csv``, merged by its rank 0); once every job's file holds
its examples, :func:`merge_job_shards` merges them into the one ``certificates.csv``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from ssn_exp.certify.core import NonFiniteLogitsError
from ssn_exp.certify.procedures import Procedure, default_procedure
from ssn_exp.certify.record import CertificateRecord
from ssn_exp.lightning.certify_run import CertifyRun, certify_indices
from ssn_exp.lightning.data import dataset_labels, mix_seed
from ssn_exp.lightning.memory import MemoryLimitError, check_noise_batch, host_memory
from ssn_exp.lightning.results import (
    ResultsFileError,
    append_rows,
    merge_shards,
    model_fingerprint,
    read_certificates,
    summarize,
    write_json_atomic,
    write_rows_atomic,
)
from ssn_exp.noises import Noise

log = logging.getLogger("ssn_exp")

__all__ = [
    "certify_indices",
    "shard_indices",
    "ShardCertifier",
    "CertifyRun",
    "open_certifier",
    "certification_settings",
    "check_settings",
    "certify_dataset",
    "CertifyCallback",
    "CertifyTask",
    "run_certification",
    "finish_certification",
    "merge_job_shards",
    "ShardsPending",
    "shard_stem",
    "log_metrics",
]


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of ``indices``: ``indices[rank::world_size]`` (every index exactly once overall)."""
    return list(indices)[rank::world_size]


def certification_settings(smoothing: Noise, procedure: Procedure, settings: CertifyRun, weights: str | None) -> dict:
    """What a directory's certificates depend on (``certify_settings.json``): the noise's and the procedure's
    ``describe()``, the certification seed (unless the noise names its own: DSSN's), the weights
    (:func:`model_fingerprint`) and how the base classifier is run (which changes its logits, hence the certificates)."""
    recorded = {**smoothing.describe(), **procedure.describe()}
    recorded.setdefault("seed", settings.seed)
    recorded["weights"] = weights
    s = settings
    recorded.update(autocast=s.autocast, precision=s.precision, channels_last=s.channels_last, compile=s.compile)
    return recorded


def check_settings(out_dir: str | Path, settings: dict, *, weights_known: bool = True, strict: bool = False) -> None:
    """Refuse (:class:`ResultsFileError`) a directory that holds certificates made with other ``settings``
    (:func:`certification_settings`), or certificates without the ``certify_settings.json`` that explains them.
    Reads only: the entry points call it before they train or write anything (``weights_known=False``: the weights
    are not known before training and are compared when the certification itself checks again; ``strict``: job
    shards, whose directory is fixed by the first job's settings even before it wrote a row)."""
    out_dir = Path(out_dir)
    path = out_dir / "certify_settings.json"
    has_rows = any(out_dir.glob("certificates*.csv"))
    if not path.is_file():
        if has_rows:
            raise ResultsFileError(
                f"{out_dir} holds certificates but no certify_settings.json, so how they were made is unknown; "
                "certify into another directory (tag=NAME or hydra.run.dir=DIR)"
            )
        return
    if not (has_rows or strict):
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsFileError(f"{path} is unreadable ({exc}); certify into another directory") from None
    if not isinstance(old, dict):
        raise ResultsFileError(
            f"{path} holds a JSON {type(old).__name__}, not the settings object ssn_exp writes; "
            "certify into another directory (tag=NAME or hydra.run.dir=DIR)"
        )
    # both ways: a setting the old certificates had and these lack (procedure=sequential's, say) differs too
    keys = [*settings, *(k for k in old if k not in settings)]
    if not weights_known:
        keys = [k for k in keys if k != "weights"]
    diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys if old.get(k) != settings.get(k)]
    if diff:
        raise ResultsFileError(
            f"{out_dir} holds certificates made with other settings ({'; '.join(diff)}); "
            "certify into another directory (tag=NAME or hydra.run.dir=DIR)"
        )


def shard_stem(shard: int, num_shards: int) -> str:
    """The file stem of job shard ``shard`` of ``num_shards`` (``certificates`` for an unsplit certification)."""
    return "certificates" if num_shards == 1 else f"certificates.shard{shard}of{num_shards}"


class ShardCertifier:
    """Certifies one rank's shard of the test examples into its CSV, resumably: built by :func:`open_certifier`, which
    calls :meth:`check_settings` and then :meth:`resume` (the constructor only stores).

    ``procedure``: how each batch is certified (:mod:`ssn_exp.certify.procedures`); ``settings``: what every
    certification shares (:class:`CertifyRun`). Every example gets its own noise generator seeded from (seed, index),
    so results depend neither on batching nor on sharding.
    """

    def __init__(self, model, smoothing: Noise, dataset, out_dir, *, num_classes: int, procedure: Procedure,
                 settings: CertifyRun, rank: int = 0, world_size: int = 1):  # fmt: skip
        self.model, self.smoothing, self.procedure, self.dataset = model, smoothing, procedure, dataset
        self.record = CertificateRecord(smoothing, procedure)  # refuses a noise the procedure cannot certify
        self.columns = self.record.columns
        self.out_dir, self.num_classes, self.settings = Path(out_dir), num_classes, settings
        self.rank, self.world_size = rank, world_size
        self.job_shard, self.num_shards = settings.shard or 0, settings.num_shards
        self.stem = shard_stem(self.job_shard, self.num_shards)
        self.path = self.out_dir / (f"{self.stem}.csv" if world_size == 1 else f"{self.stem}.rank{rank}.csv")
        self.selected = settings.indices(len(dataset))
        self.mine = shard_indices(self.selected, self.job_shard, self.num_shards)  # this job's examples (all: one job)
        self.shard = shard_indices(self.mine, rank, world_size)
        self._allowed = self.shard if world_size == 1 else self.mine  # the rows this rank's file may hold
        self._check = dict(record=self.record, labels=lambda idx: dataset_labels(dataset, idx), num_classes=num_classes)
        self._forward = None
        self.done: set[int] = set()
        self.todo = list(self.shard)

    def check_settings(self, device=None, barrier: Callable[[str], None] | None = None) -> None:
        """Before anything is written: refuse a noisy batch that cannot fit in ``device``'s free memory (a corrected
        noise_batch just runs) and a directory of certificates made otherwise (:func:`check_settings`); then (rank
        0) record the settings. Ranks that run concurrently pass ``barrier``: every rank checks before any rank
        writes a file (a shard file written by a fast rank must not look like an unexplained certificate to a slow
        one)."""
        s = self.settings
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if len(self.dataset) and device is not None:
            shape = torch.as_tensor(self.dataset[0][0]).shape
            per_example = self.procedure.samples_per_example(self.smoothing)
            check_batch_memory(shape, per_example, s.noise_batch, s.batch_size, device)
        recorded = certification_settings(self.smoothing, self.procedure, s, model_fingerprint(self.model))
        jobs = self.num_shards > 1 and self.rank == 0  # other jobs may start in this directory at the same time
        with _exclusive(self.out_dir / ".certify_settings.lock") if jobs else contextlib.nullcontext():
            check_settings(self.out_dir, recorded, strict=self.num_shards > 1)
            concurrent = barrier is not None and self.world_size > 1
            if concurrent:
                barrier("certify settings checked")
            if self.rank == 0:
                write_json_atomic(self.out_dir / "certify_settings.json", recorded)
            if concurrent:  # no shard file exists without the settings that explain it, even if a rank is killed here
                barrier("certify settings written")

    def resume(self) -> None:
        """Read back the rows already certified (checked against the data set): this rank's file, and where there
        are several ranks or jobs every rank file and the merged files (the world size may have changed); rewrite
        this rank's file cleanly (drops a torn line, keeps every finished row) and leave the rest in :attr:`todo`."""
        out, read = self.out_dir, lambda path, allowed: read_certificates(path, allowed=allowed, **self._check)
        if self.world_size == 1 and self.num_shards == 1:
            done = keep = read(self.path, self.shard)
            complete = set(self.selected) <= set(done)
        else:
            found: dict[int, dict] = {}
            own = [out / f"{self.stem}.csv"] if self.num_shards > 1 else []
            for path in [*own, *sorted(out.glob(f"{self.stem}.rank*.csv"))]:
                found.update(read(path, self.mine))
            # read after the shard files: a job-shard merge removes them only after writing certificates.csv
            merged = read(out / "certificates.csv", self.selected)
            complete = set(self.mine) <= set(merged)
            found.update(merged)
            done = {i: found[i] for i in self.shard if i in found}
            # this rank's file keeps the rows it had (another rank may take them over) and gains the ones it found
            keep = {**read(self.path, self.mine), **done}
        if not complete and self.rank == 0:  # results are being added: a metrics.json of fewer examples is stale
            (out / "metrics.json").unlink(missing_ok=True)
        if not (complete and self.num_shards > 1):  # (a job shard already merged leaves no file behind)
            write_rows_atomic(self.path, self.columns, [keep[i] for i in sorted(keep)])
        self._sorted, self._last = True, max(keep, default=-1)  # the file's rows are in index order, up to _last
        self.done = set(done)
        self.todo = [i for i in self.shard if i not in self.done]

    def _model(self):
        """The base classifier as certification runs it (channels_last, torch.compile: set up on first use)."""
        if self._forward is None:
            if self.settings.channels_last:
                self.model.to(memory_format=torch.channels_last)
            self._forward = torch.compile(self.model) if self.settings.compile else self.model
        return self._forward

    def chunks(self) -> list[list[int]]:
        size = self.settings.batch_size
        return [self.todo[i : i + size] for i in range(0, len(self.todo), size)]

    def run_chunk(self, chunk: list[int], device: torch.device) -> None:
        """Certify the examples of ``chunk`` only (and append their rows)."""
        self._certify_stream([chunk], torch.device(device), lambda _k: None)

    def run(self, device, progress: bool | None = None) -> Path:
        """Certify :attr:`todo` (``progress``: default ``settings.progress``); returns this rank's CSV."""
        device = torch.device(device)
        self.model.eval().to(device)
        progress = self.settings.progress if progress is None else progress
        done = len(self.shard) - len(self.todo)
        bar = _progress_bar(len(self.shard), done, self.smoothing, enabled=progress and self.rank == 0)
        try:
            self._certify_stream(self.chunks(), device, bar)
        finally:
            bar(0, close=True)
        return self.path

    def _certify_stream(self, chunks: list[list[int]], device: torch.device, bar: Callable) -> None:
        """Certify the examples of ``chunks`` as one stream (:meth:`Procedure.certify_batches`: a chunk at a time, or
        examples in flight across chunks) and append (and flush) each example's row as soon as it is certified, so
        a killed run loses only the examples in flight. The rows are put in index order at the end."""
        order = [i for chunk in chunks for i in chunk]
        loaded: dict[int, int] = {}  # position in ``order`` -> label, for the examples loaded and not yet written
        kw = dict(noise_batch=self.settings.noise_batch)
        with self._autocast(device):
            stream = self.procedure.certify_batches(
                self._model(), self._batches(chunks, device, loaded), self.smoothing, self.num_classes, **kw
            )
            t0 = time.perf_counter()
            for positions, cert in self._named(stream, order, loaded, device):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                seconds, t0 = (now - t0) / max(1, len(positions)), now
                indices = [order[p] for p in positions]
                rows = self.record.rows(indices, [loaded.pop(p) for p in positions], cert, seconds)
                append_rows(self.path, self.columns, rows)  # never through a symbolic link
                self.done.update(indices)
                self._sorted = self._sorted and indices == sorted(indices) and indices[0] > self._last
                self._last = max(self._last, *indices)
                bar(len(indices))
        if not self._sorted:  # index order, as a resumed run writes them (a sequential stream finishes out of order)
            rows = read_certificates(self.path, allowed=self._allowed, **self._check)
            write_rows_atomic(self.path, self.columns, [rows[i] for i in sorted(rows)])
            self._sorted = True

    def _batches(self, chunks, device: torch.device, loaded: dict[int, int]):
        """The chunks as ``(x, generators, labels)`` batches, read when the stream asks for them."""
        start = 0
        for chunk in chunks:
            xs, ys = zip(*(self.dataset[i] for i in chunk), strict=True)
            x = torch.stack([torch.as_tensor(v) for v in xs]).to(device)
            if self.settings.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            # one generator per example: reproducible whatever the batching or sharding (unused by exact procedures)
            generators = [
                torch.Generator(device=device).manual_seed(mix_seed(self.settings.seed, 0xCE27, i)) for i in chunk
            ]
            labels = [int(y) for y in ys]
            loaded.update(zip(range(start, start + len(chunk)), labels, strict=True))
            start += len(chunk)
            yield x, generators, labels

    def _named(self, stream, order: list[int], loaded: dict[int, int], device: torch.device):
        """``stream``, with its errors naming the data set's examples (not positions in the stream)."""
        try:
            yield from stream
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # an allocation the memory check could not foresee
            if not isinstance(exc, torch.OutOfMemoryError) and not _is_allocation_failure(exc):
                raise
            flight = [order[p] for p in sorted(loaded)]
            raise MemoryLimitError(
                f"out of memory certifying test example(s) {flight[:10]} on {device} with "
                f"certify.noise_batch={self.settings.noise_batch}: set a smaller certify.noise_batch"
            ) from None
        except NonFiniteLogitsError as exc:
            examples = [order[p] for p in exc.positions]
            raise NonFiniteLogitsError(
                f"the model returned NaN or infinite logits for test example(s) {examples[:10]}"
                f"{' ...' if len(examples) > 10 else ''}: no certificate is computed from them",
                positions=examples,
            ) from None

    def _autocast(self, device: torch.device):
        if self.settings.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(
            device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.settings.autocast]
        )


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (waiting for it), never following a link: the settings of a directory
    are checked and written by one job shard at a time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _is_allocation_failure(exc: BaseException) -> bool:
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower() or "not enough memory" in text


def check_batch_memory(shape, per_example: int, noise_batch: int, batch_size: int, device) -> None:
    """Refuse (:class:`MemoryLimitError`, naming ``certify.noise_batch``) a noisy batch that cannot fit in the memory
    free on ``device`` now: the inputs of one forward pass are at most ``noise_batch``, and at most ``batch_size``
    examples times the noisy copies per example (``per_example``: the procedure's, e.g. L offsets for DSSN)."""
    device = torch.device(device)
    rows = min(int(noise_batch), int(batch_size) * int(per_example))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"the memory free on {device}"
    else:
        free, where = host_memory(available=True), "the memory available on this host"
    check_noise_batch(rows, shape, free, where, asked=int(noise_batch))


def open_certifier(model, smoothing, dataset, out_dir, *, num_classes: int, procedure: Procedure | None = None,
                   settings: CertifyRun | None = None, rank: int = 0, world_size: int = 1, barrier=None, device=None,
                   n0: int = 64, n: int = 100_000, alpha: float = 0.001, **certify) -> ShardCertifier:  # fmt: skip
    """A :class:`ShardCertifier` ready to run, in the driver's order: settings checked (and recorded), then the rows
    already certified read back. ``procedure``: by default the noise's own (exact for DSSN, fixed with ``n0``,
    ``n``, ``alpha`` otherwise); ``settings`` (default :class:`CertifyRun`'s), with ``certify`` (its fields, e.g.
    ``skip=2``, ``noise_batch=512``) replaced."""
    procedure = procedure or default_procedure(smoothing, n0=n0, n=n, alpha=alpha)
    settings = dataclasses.replace(settings or CertifyRun(), **certify)
    kw = dict(num_classes=num_classes, procedure=procedure, settings=settings, rank=rank, world_size=world_size)
    certifier = ShardCertifier(model, smoothing, dataset, out_dir, **kw)
    certifier.check_settings(device, barrier)
    certifier.resume()
    return certifier


def certify_dataset(model, smoothing, dataset, out_dir, *, device="cpu", progress=None, **kwargs) -> Path:
    """Certify every ``skip``-th test example (this rank's shard) into ``out_dir`` (:func:`open_certifier`'s
    arguments); returns the CSV path."""
    return open_certifier(model, smoothing, dataset, out_dir, device=device, **kwargs).run(device, progress)


def _progress_bar(total: int, initial: int, smoothing: Noise, enabled: bool) -> Callable:
    from ssn_exp.lightning.progress import progress_reporter

    return progress_reporter(total, initial, f"certify {smoothing.name} sigma={smoothing.sigma:g}", "img", enabled)


class CertifyCallback(pl.Callback):
    """After ``fit``: certify the test split (every ``skip``-th example) into ``out_dir`` (:func:`run_certification`).

    Sharded over DDP ranks; rank 0 merges, writes metrics.json and the curve, and logs the metrics.
    """

    def __init__(self, out_dir, datamodule, procedure, settings: CertifyRun, meta: dict):
        self.job = dict(procedure=procedure, datamodule=datamodule, out_dir=Path(out_dir), settings=settings, meta=meta)
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
            pl_module.model, pl_module.smoothing, device=pl_module.device, trainer=trainer, **self.job
        )


def run_certification(model, smoothing, procedure, datamodule, out_dir, *, settings: CertifyRun, meta, device,
                      trainer: pl.Trainer | None = None) -> dict | None:  # fmt: skip
    """The certification driver: certify this rank's shard of ``trainer``'s ranks (None: one process), then (rank 0)
    merge, summarize and log to the trainer's loggers. Returns the metrics on rank 0. Every way of certifying (after
    training, a checkpoint, a denoiser variant, DDP) runs this function."""
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
    barrier = trainer.strategy.barrier if trainer else None
    dataset = datamodule.certify_set()
    kw = dict(num_classes=datamodule.num_classes, procedure=procedure, settings=settings, rank=rank)
    certify_dataset(model, smoothing, dataset, out_dir, device=device, barrier=barrier, world_size=world_size, **kw)
    if world_size > 1 and barrier is not None:
        barrier("certified")
    if rank != 0:
        return None
    record = CertificateRecord(smoothing, procedure)
    num_shards = settings.num_shards
    if num_shards > 1:  # this job's part, then all jobs' parts if every one is in (else: ShardsPending)
        if world_size > 1:
            merge_shards(out_dir, world_size, record, stem=shard_stem(settings.shard, num_shards))
        check = dict(labels=lambda idx: dataset_labels(dataset, idx), num_classes=datamodule.num_classes)
        try:
            merge_job_shards(out_dir, record, num_shards, settings.indices(len(dataset)), check)
        except ShardsPending as pending:
            log.info(
                "shard %s of %d done; waiting for shards %s (the last shard to finish merges them into %s)",
                settings.shard,
                num_shards,
                ", ".join(map(str, pending.missing)),
                Path(out_dir) / "certificates.csv",
            )
            return None
    metrics = finish_certification(out_dir, record, 1 if num_shards > 1 else world_size, len(dataset), settings, meta)
    for logger in trainer.loggers if trainer else ():
        log_metrics(logger, metrics, Path(out_dir))
    return metrics


class ShardsPending(Exception):
    """Some job shards of a split certification have not finished yet (:attr:`missing`: their numbers)."""

    def __init__(self, missing: list[int], num_shards: int):
        super().__init__(f"shards {missing} of {num_shards} not finished")
        self.missing, self.num_shards = missing, num_shards


_JOB_FILE = re.compile(r"certificates\.shard(\d+)of(\d+)(?:\.rank\d+)?\.csv")


def merge_job_shards(out_dir, record: CertificateRecord, num_shards: int, selected: Sequence[int], check: dict) -> Path:
    """Merge the job shards' files ``certificates.shard{j}of{J}.csv`` into ``certificates.csv`` once every one
    holds its examples (``selected[j::J]``); else raise :class:`ShardsPending`. Every row is checked as on resume, and
    must be one of its shard's examples; a file of another split (another ``J``) is refused. Idempotent and atomic
    (the merged file is written before the shard files go), so the jobs that finish last may all merge at once."""
    out_dir = Path(out_dir)
    files = sorted(p.name for p in out_dir.glob("certificates.shard*.csv"))
    for name in files:
        m = _JOB_FILE.fullmatch(name)
        if m is None or int(m.group(2)) != num_shards or int(m.group(1)) >= num_shards:
            raise ResultsFileError(
                f"{out_dir / name} is not a shard of this certification (certify.num_shards={num_shards}): it "
                "belongs to another split of the examples; remove it, or certify into another directory (tag=NAME)"
            )
    rows: dict[int, dict] = {}
    for j in range(num_shards):  # the shard files first: a concurrent merge removes them after writing the result
        rows.update(
            read_certificates(
                out_dir / f"{shard_stem(j, num_shards)}.csv", record, allowed=selected[j::num_shards], **check
            )
        )
    rows.update(read_certificates(out_dir / "certificates.csv", record, allowed=selected, **check))
    missing = [j for j in range(num_shards) if not set(selected[j::num_shards]) <= set(rows)]
    if missing:
        raise ShardsPending(missing, num_shards)
    path = out_dir / "certificates.csv"
    write_rows_atomic(path, record.columns, [rows[i] for i in sorted(rows)])
    for j in range(num_shards):
        (out_dir / f"{shard_stem(j, num_shards)}.csv").unlink(missing_ok=True)
    return path


def finish_certification(out_dir, record, world_size, dataset_len, settings: CertifyRun, meta) -> dict:
    """Merge the shards (if any) and write metrics.json and the curve for the selected examples."""
    if world_size > 1:
        merge_shards(out_dir, world_size, record)
    return summarize(out_dir, record, meta, list(settings.radii), indices=set(settings.indices(dataset_len)))


class CertifyTask(pl.LightningModule):
    """Certification without training, as a Lightning predict loop (``trainer.predict(task)``): the trainer starts
    the processes (one per DDP rank) and each runs :func:`run_certification` for its own shard, once (a loader of
    one step); rank 0 logs to the trainer's loggers, and its metrics are in :attr:`metrics` afterwards (under
    ``ddp_spawn``: in ``metrics.json``)."""

    def __init__(self, model, smoothing, procedure, datamodule, out_dir, settings: CertifyRun, meta: dict):
        super().__init__()
        self.model, self.smoothing = model, smoothing
        self.job = dict(procedure=procedure, datamodule=datamodule, out_dir=str(out_dir), settings=settings, meta=meta)
        self.metrics: dict | None = None

    def predict_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader([0], batch_size=None, collate_fn=_identity)

    def on_predict_start(self) -> None:
        self.model.eval()

    def predict_step(self, batch, batch_idx):
        self.metrics = run_certification(
            self.model, self.smoothing, device=self.device, trainer=self.trainer, **self.job
        )


def _identity(batch):
    return batch


def log_metrics(logger, metrics: dict, out_dir: Path | None = None) -> None:
    """Flatten metrics.json into the logger (certify/acc@r, certify/acr, ...); wandb gets plots and tables too."""
    flat = {f"certify/acc@{r}": v for r, v in metrics["certified_accuracy"].items()}
    flat.update({f"certify/acc_box@{r}": v for r, v in metrics.get("certified_accuracy_box", {}).items()})
    for key in ("clean_accuracy", "acr", "acr_box", "seconds_per_example", "forward_passes_per_example"):
        if key in metrics:
            flat[f"certify/{key}"] = float(metrics[key])
    logger.log_metrics(flat)
    if out_dir is not None:
        from ssn_exp.lightning.loggers import log_certification

        log_certification(logger, out_dir, metrics)
    if hasattr(logger, "save"):
        logger.save()
