"""Fixed-sample against sequential certification on the same trained models (issue 18, README "Sequential
certification"): forward passes per image, certification time, certified accuracy and ACR, side by side.

    python scripts/compare_sequential.py [--out outputs/compare_sequential] [--procedures fixed,sequential]

For every (method, sigma) it trains a digits model once (``python -m ssn_exp method=M sigma=S
certify.enabled=false``, default epochs; an existing run is resumed, i.e. reused) and certifies all 360 test
images of that one checkpoint with each procedure (``python -m ssn_exp.certify ckpt=... procedure=P
certify.n=N certify.alpha=A``), each into its own directory. Everything goes through the ordinary entry points,
so a run cut short resumes where it stopped when the script is run again, and finished certifications are read
back, not redone. The Markdown table is printed at the end (and written to OUT/table.md).

The forward passes per image are read from each certification's ``certificates.csv``: its ``samples`` column
where the procedure writes one, else the procedure's fixed count from metrics.json. The certification time is
the driver's own (the sum of the rows' ``seconds``: no Python start, no data loading); on a shared machine it
depends on the load, so compare the forward passes first.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SAMPLES_COLUMN = "samples"  # ssn_exp.certify.record.SAMPLES_COLUMN (not imported: the script needs no torch)


def _run(cmd: list[str], log) -> float:
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def train(py: str, out: Path, method: str, sigma: float, log) -> Path:
    root = out / "runs"
    run = root / "digits" / f"{method}-standard-none" / f"sigma{sigma}-seed0"
    ckpt = run / "checkpoints" / "last.ckpt"
    if not (run / "done").is_file():
        _run(
            [py, "-m", "ssn_exp", f"method={method}", f"sigma={sigma}", "certify.enabled=false", f"run_root={root}"],
            log,
        )
        (run / "done").write_text("trained\n")
    return ckpt


def certify(py: str, out: Path, ckpt: Path, method: str, sigma: float, procedure: str, n: int, alpha: float, log):
    d = out / "certify" / f"{method}-sigma{sigma}-{procedure}"
    if not (d / "metrics.json").is_file():
        wall = _run(
            [
                py,
                "-m",
                "ssn_exp.certify",
                f"ckpt={ckpt}",
                f"procedure={procedure}",
                f"certify.n={n}",
                f"certify.alpha={alpha}",
                "certify.progress=false",
                "logger=none",
                f"hydra.run.dir={d}",
            ],
            log,
        )
        (d / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    metrics = json.loads((d / "metrics.json").read_text())
    with open(d / "certificates.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and SAMPLES_COLUMN in rows[0]:
        samples = np.array([int(r[SAMPLES_COLUMN]) for r in rows], dtype=np.int64)
    else:
        samples = np.full(len(rows), int(metrics["forward_passes_per_example"]), dtype=np.int64)
    seconds = float(sum(float(r["seconds"]) for r in rows))
    wall = d / "wall_seconds.txt"
    return {
        "procedure": procedure,
        "metrics": metrics,
        "samples": samples,
        "seconds": seconds,
        "wall": float(wall.read_text()) if wall.is_file() else float("nan"),
    }


def table(results: list[tuple[str, float, list[dict]]]) -> str:
    radii = None
    for _, _, runs in results:
        for r in runs:
            acc = r["metrics"]["certified_accuracy"]
            keep = [k for k, v in acc.items() if v > 0]
            last = list(acc).index(keep[-1]) + 1 if keep else 1
            cut = list(acc)[: min(last + 1, len(acc))]
            radii = cut if radii is None or len(cut) > len(radii) else radii
    head = (
        "| model | procedure | mean passes | median | p90 | fewer (mean) | cert. time (s) | passes/s | "
        + " | ".join(f"ρ={r}" for r in radii)
        + " | ACR |"
    )
    lines = [head, "|" + "---|" * (9 + len(radii))]
    for method, sigma, runs in results:
        base = next((r for r in runs if r["procedure"] == "fixed"), None)
        for r in runs:
            s = r["samples"]
            fewer = (base["samples"].mean() / s.mean()) if base is not None else float("nan")
            acc = r["metrics"]["certified_accuracy"]
            lines.append(
                f"| {method} σ={sigma:g} | {r['procedure']} | {s.mean():,.0f} | {np.median(s):,.0f} | "
                f"{np.percentile(s, 90):,.0f} | {fewer:.1f}× | {r['seconds']:.0f} | {s.sum() / r['seconds']:,.0f} | "
                + " | ".join(f"{100 * acc.get(k, 0.0):.1f}" for k in radii)
                + f" | {r['metrics']['acr']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/compare_sequential", help="where runs and certifications go")
    p.add_argument("--methods", default="uniform,ssn")
    p.add_argument("--sigmas", default="0.5,1.0")
    p.add_argument("--procedures", default="fixed,sequential")
    p.add_argument("--n", type=int, default=100_000, help="certify.n: fixed's sample count, sequential's cap")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    results = []
    for sigma in [float(s) for s in args.sigmas.split(",")]:
        for method in args.methods.split(","):
            ckpt = train(args.python, out, method, sigma, log)
            runs = [
                certify(args.python, out, ckpt, method, sigma, proc, args.n, args.alpha, log)
                for proc in args.procedures.split(",")
            ]
            results.append((method, sigma, runs))
            log("\n" + table(results[-1:]))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
