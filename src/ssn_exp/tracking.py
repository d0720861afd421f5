"""Weights & Biases wiring: offline unless credentials exist, one run per job, resolved config."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["wandb_mode", "wandb_logger"]


def wandb_mode(requested: str) -> str:
    """auto -> online when logged in (WANDB_API_KEY or ~/.netrc entry), else offline."""
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


def wandb_logger(cfg: DictConfig, out_dir: Path, job_name: str):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pytorch_lightning.loggers import WandbLogger

    lc = cfg.logger
    group = lc.group
    if group is None:
        hc = HydraConfig.get()
        group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else cfg.data.name
    return WandbLogger(
        project=lc.project,
        entity=lc.entity,
        name=job_name,
        group=str(group),
        tags=list(lc.tags),
        save_dir=str(out_dir),
        mode=wandb_mode(lc.mode),
        config=OmegaConf.to_container(cfg, resolve=True),
        reinit=True,
    )


def log_certification(logger, out_dir: Path, metrics: dict) -> None:
    """On a WandbLogger: metrics.json as the run summary, the curve as a wandb plot, certificates as a table."""
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import csv

    import wandb

    run = logger.experiment
    run.summary.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    run.summary.update({f"certified_accuracy/{r}": v for r, v in metrics["certified_accuracy"].items()})
    with open(Path(out_dir) / "certificates.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) > 1:
        run.log({"certificates": wandb.Table(columns=rows[0], data=rows[1:])})
    curve = wandb.Table(
        columns=["radius", "certified_accuracy"],
        data=[[float(r), float(v)] for r, v in metrics["certified_accuracy"].items()],
    )
    title = f"{metrics['method']} σ={metrics['sigma']:g}: certified accuracy"
    run.log({"certified_accuracy_curve": wandb.plot.line(curve, "radius", "certified_accuracy", title=title)})
    png = Path(out_dir) / "certified_accuracy.png"
    if png.is_file():
        run.log({"certified_accuracy_png": wandb.Image(str(png))})
