"""Loggers (layer 2): a crash-safe CSV log, Weights & Biases (offline unless logged in), or none.

Built from ``conf/logger/*.yaml`` by ``_target_``. The training log is one row per epoch
(:class:`ssn_exp.lightning.callbacks.EpochLog`), written before the epoch's checkpoint.
"""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ssn_exp.lightning.results import write_text_atomic as _atomic_write

__all__ = [
    "RunCSVLogger",
    "wandb_mode",
    "wandb_logger",
    "wandb_run_id",
    "log_certification",
    "certification_summary",
    "certification_curves",
]


class RunCSVLogger(Logger):
    """``<save_dir>/<name>/metrics.csv``: every row is on disk as soon as it is logged, nothing is ever deleted.

    Lightning's CSVLogger deletes an existing metrics file when it starts and buffers rows; a resumed run
    therefore lost the log of the epochs before a kill. Here a new column rewrites the file atomically with
    the old rows kept, a torn last line (a kill mid-write) is dropped, and :meth:`truncate_from_epoch` drops
    the rows of epochs a resumed run is about to redo, so the log of a resumed run equals an uninterrupted one.
    """

    def __init__(self, save_dir: str, name: str = "csv"):
        super().__init__()
        self._save_dir = str(save_dir)
        self._name = name
        self._columns: list[str] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

    def _read(self) -> tuple[list[str], list[dict]]:
        path = self.metrics_file
        if not path.is_file():
            return [], []
        text = path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        return list(reader.fieldnames or []), [row for row in reader if None not in row.values()]

    def _write(self, columns: list[str], rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write(self.metrics_file, buf.getvalue())

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args, **kwargs) -> None:
        from argparse import Namespace

        import yaml

        params = vars(params) if isinstance(params, Namespace) else dict(params or {})
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(self.log_dir) / "hparams.yaml", yaml.safe_dump(params, sort_keys=False))

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        if step is not None:
            row["step"] = step
        if self._columns is None:
            self._columns, rows = self._read()
            if rows or self._columns:
                self._write(self._columns, rows)  # drops a torn last line
        new = [k for k in row if k not in self._columns]
        if new or not self.metrics_file.is_file():
            columns, rows = self._read()
            self._columns = list(dict.fromkeys([*columns, *self._columns, *sorted(new)]))
            self._write(self._columns, rows + [row])
            return
        with open(self.metrics_file, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._columns, lineterminator="\n", restval="").writerow(row)

    @rank_zero_only
    def truncate_from_epoch(self, epoch: int) -> None:
        """Drop the rows of epochs >= ``epoch`` and the rows logged after training (a resumed run redoes them)."""
        columns, rows = self._read()
        kept = [r for r in rows if r.get("epoch") not in (None, "") and int(float(r["epoch"])) < epoch]
        if columns and len(kept) != len(rows):
            self._write(columns, kept)
        self._columns = columns or None

    @rank_zero_only
    def save(self) -> None:  # rows are written as they are logged
        pass


def wandb_mode(requested: str) -> str:
    """auto -> online when logged in (WANDB_API_KEY or ~/.netrc entry), else offline. WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class _WandbLogger(WandbLogger):
    """Lightning's WandbLogger, pickled (ddp_spawn, once per rank) without its ``wandb.require("service")``: a no-op
    since wandb 0.18 that prints a deprecation warning every time."""

    def __getstate__(self):
        import wandb

        require, wandb.require = wandb.require, lambda *args, **kwargs: None
        try:
            return super().__getstate__()
        finally:
            wandb.require = require


def wandb_logger(
    *,
    project: str,
    entity: str | None,
    mode: str,
    group: str | None,
    dataset: str,
    tags: list,
    name: str,
    save_dir: str,
):
    """A ``WandbLogger``, one wandb run per job: grouped by the sweep (multirun) or the data set."""
    if group is None:
        group = dataset
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:
                group = Path(hc.sweep.dir).name
        except ValueError:  # not inside a Hydra app
            pass
    logger = _WandbLogger(
        project=project,
        entity=entity,
        name=name,
        group=str(group),
        tags=list(tags),
        save_dir=str(save_dir),
        mode=wandb_mode(mode),
        reinit="finish_previous",
        id=wandb_run_id(Path(save_dir)),  # (Lightning resumes it: resume="allow")
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning passes it always; wandb >= 0.19 warns it has no effect
    return logger


_WANDB_ID = re.compile(r"[a-z0-9]{8,64}")


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of a run directory: read from its ``wandb_id`` file, or made and written there (atomically)
    on the first start, so every resume of the run (a requeued job) continues one wandb run."""
    path = Path(run_dir) / "wandb_id"
    if path.is_file() and not path.is_symlink():
        text = path.read_text(errors="replace").strip()
        if not _WANDB_ID.fullmatch(text):
            raise ValueError(
                f"{path} does not hold a wandb run id (8-64 lowercase letters and digits); remove it to start a new "
                "wandb run"
            )
        return text
    run_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _atomic_write(path, run_id + "\n")
    return run_id


_ACCURACY = "certified_accuracy"


def _accuracies(metrics: dict) -> list[tuple[str, str]]:
    """(key, name) of every certified-accuracy table of metrics.json: ``certified_accuracy`` (name "") and one
    ``certified_accuracy_<name>`` per further radius of the certificate (e.g. box), in file order."""
    out = []
    for key, value in metrics.items():
        if isinstance(value, dict) and (key == _ACCURACY or key.startswith(_ACCURACY + "_")):
            out.append((key, key[len(_ACCURACY) + 1 :]))
    return out


def certification_summary(metrics: dict) -> dict:
    """The wandb run summary of a certification: metrics.json's plain values, and every certified-accuracy table
    as ``<key>/<radius>`` entries."""
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for key, _ in _accuracies(metrics):
        summary.update({f"{key}/{r}": v for r, v in metrics[key].items()})
    return summary


def certification_curves(metrics: dict) -> dict[str, tuple[str, list[list[float]]]]:
    """``{"<key>_curve": (title, [[radius, accuracy], ...])}`` for every certified-accuracy table of metrics.json,
    titled by the noise's label (metrics.json's ``label``; the method without one) and the further radius."""
    label = metrics.get("label") or metrics["method"]
    curves = {}
    for key, name in _accuracies(metrics):
        title = f"{label} σ={metrics['sigma']:g}: certified accuracy{f' ({name})' if name else ''}"
        curves[f"{key}_curve"] = (title, [[float(r), float(v)] for r, v in metrics[key].items()])
    return curves


def log_certification(logger, out_dir: Path, metrics: dict) -> None:
    """On a WandbLogger: metrics.json as the run summary (:func:`certification_summary`), every certified-accuracy
    curve as a wandb plot (:func:`certification_curves`), certificates as a table."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    run = logger.experiment
    run.summary.update(certification_summary(metrics))
    with open(Path(out_dir) / "certificates.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) > 1:
        run.log({"certificates": wandb.Table(columns=rows[0], data=rows[1:])})
    for key, (title, data) in certification_curves(metrics).items():
        curve = wandb.Table(columns=["radius", "certified_accuracy"], data=data)
        run.log({key: wandb.plot.line(curve, "radius", "certified_accuracy", title=title)})
    png = Path(out_dir) / "certified_accuracy.png"
    if png.is_file():
        run.log({"certified_accuracy_png": wandb.Image(str(png))})
