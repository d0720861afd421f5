"""``python -m ssn_exp.sweep NAME --plan``: what a sweep costs, before anything runs (layer 3).

Every job's config is composed as the sweep would run it (no data is read, nothing is written); its noise and
certificate procedure are built from the config and say how many forward passes an example costs
(:meth:`Procedure.forward_passes`: fixed n0 + n, exact L). The hours follow from a throughput in forward passes per
second: by default the authors' own, from their published per-image times for the same data set
(``published/levine2021/index.csv``: a 2080 Ti, WRN-40-2 on CIFAR-10, ResNet-50 on ImageNet).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable
from importlib import resources

__all__ = ["plan_lines", "published_throughput"]

#: Training and test examples of the built-in data sets (ImageNet: its validation set, before ``data.test_every``).
SIZES = {"digits": (1437, 360), "cifar10": (50_000, 10_000), "imagenet": (1_281_167, 50_000)}
#: Forward-pass equivalents of one training example: forward + backward ~ 3 forwards (stability training: 2 copies).
TRAIN_PASSES = 3
#: procedure=sequential: forward passes per example as a share of n0 + n, measured on trained digits models
#: (uniform and SSN, sigma = 0.5, default radii: 12,313 and 11,912 of 100,064; docs/library.md, "Sequential certification").
SEQUENTIAL_SHARE = (12_313 + 11_912) / 2 / 100_064


def published_throughput(dataset: str) -> float | None:
    """Forward passes per second of the authors' GPU on ``dataset``: the median over their runs (no denoiser) of the
    passes per image (n0 + n = 100,064; DSSN: L) over their published seconds per image; None if none."""
    path = resources.files("ssn_exp") / "published" / "levine2021" / "index.csv"
    rates = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["dataset"] != dataset or row["denoiser"] != "none" or not row["time_per_image_s"]:
                continue
            seconds = float(row["time_per_image_s"])
            passes = float(row["levels"]) if row["levels"] else 64 + 100_000  # enumerated noises list their L
            if math.isfinite(seconds) and seconds > 0:
                rates.append(passes / seconds)
    return statistics.median(rates) if rates else None


def _job_cost(cfg, overrides: list[str]) -> dict:
    from ssn_exp.cli.common import build_noise, build_procedure
    from ssn_exp.cli.config import apply_deprecated, check_certify_config

    apply_deprecated(cfg, {o.lstrip("+~").partition("=")[0] for o in overrides})
    settings = check_certify_config(cfg)
    name = str(cfg.data.name)
    train, test = SIZES.get(name, (None, None))
    if test is not None and "test_every" in cfg.data:
        test = math.ceil(test / int(cfg.data.test_every))
    noise = build_noise(cfg.method)
    procedure = build_procedure(cfg, noise)
    passes, how = procedure.forward_passes(noise), procedure.name
    if passes is None:  # a data-dependent count (procedure=sequential: stops each example once decided)
        own = procedure.describe()  # its own sample counts
        passes, how = SEQUENTIAL_SHARE * (own.get("n0", 0) + own.get("n", 0)), f"{procedure.name}, estimated"
    examples = None
    if test is not None:
        examples = len(settings.indices(test))
    copies = 2 if "stability" in str(cfg.training.name) else 1
    return dict(
        data=name,
        epochs=int(cfg.training.epochs),
        train=train,
        train_passes=None if train is None else int(cfg.training.epochs) * train * TRAIN_PASSES * copies,
        examples=examples,
        passes=passes,
        how=how,
        shards=settings.num_shards,
    )


def plan_lines(
    compose: Callable[[list[str]], object], fixed: list[str], all_jobs: list[list[str]], throughput: float | None
) -> list[str]:
    """The plan of a sweep: a line per job, then the total (lines to print). ``compose(overrides)``: a job's config
    as the sweep composes it, ``fixed`` (the overrides of every job) applied."""
    lines, total, rates = [], 0.0, {}
    for i, job in enumerate(all_jobs):
        shard = [] if any(o.startswith("certify.shard=") for o in fixed) else ["certify.shard=0"]  # (one is enough)
        sharded = any(o.startswith("certify.num_shards=") and o != "certify.num_shards=1" for o in fixed)
        overrides = [*fixed, *job, *(shard if sharded else [])]
        cfg = compose([*job, *(shard if sharded else [])])
        c = _job_cost(cfg, overrides)
        if c["data"] not in rates:
            rates[c["data"]] = throughput or published_throughput(c["data"])
        rate = rates[c["data"]]
        limit_h = _timeout_hours(cfg)
        train = "train ?" if c["train"] is None else f"train {c['epochs']} ep x {c['train']:,} ex"
        cert = "certify ? ex" if c["examples"] is None else f"certify {c['examples']:,} ex"
        text = f"  [{i}] {' '.join(job)}: {train}; {cert} x {c['passes']:,.0f} passes ({c['how']})"
        if rate is None or c["examples"] is None or c["train_passes"] is None:
            lines.append(f"{text}; hours unknown (no published time for {c['data']}: give --throughput)")
            continue
        train_h = c["train_passes"] / rate / 3600
        cert_h = c["examples"] * c["passes"] / rate / 3600
        total += train_h + cert_h
        if limit_h is None:
            lines.append(f"{text}; {train_h:.1f} h training + {cert_h:.1f} h certification at {rate:,.0f} passes/s")
            continue
        # one job trains and certifies; with certify.num_shards, training is a job of its own, then the shards
        per_job = train_h + cert_h if c["shards"] == 1 else max(train_h, cert_h / c["shards"])
        verdict = "fits" if per_job <= limit_h else "EXCEEDS"
        advice = []
        if cert_h / c["shards"] > limit_h:
            advice.append(f"certify.num_shards>={math.ceil(cert_h / limit_h)}")
        elif per_job > limit_h:
            advice.append("train with certify.enabled=false, then certify in a job of its own")
        if train_h > limit_h:
            advice.append(f"training spans {math.ceil(train_h / limit_h)} time limits (requeued, it resumes)")
        lines.append(
            f"{text}; {train_h:.1f} h training + {cert_h:.1f} h certification at {rate:,.0f} passes/s: "
            f"{verdict} timeout_min={limit_h * 60:.0f}"
            + (f" in {c['shards']} shard jobs of {cert_h / c['shards']:.1f} h" if c["shards"] > 1 else "")
            + (f" ({'; '.join(advice)})" if advice else "")
        )
    how = "--throughput" if throughput else "the authors' published per-image times (their 2080 Ti)"
    lines.append(f"total: {total:,.1f} GPU-hours ({len(all_jobs)} jobs; throughput from {how})")
    return lines


def _timeout_hours(cfg) -> float | None:
    launcher = cfg.hydra.get("launcher") if "hydra" in cfg else None
    minutes = None if launcher is None else launcher.get("timeout_min")
    return None if minutes is None else float(minutes) / 60
