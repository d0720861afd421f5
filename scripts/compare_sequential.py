"""Fixed-sample against sequential certification on the same trained models (issue 18, README "Sequential
certification"): forward passes per image, certification time, certified accuracy and ACR, side by side.

    python scripts/compare_sequential.py [--out outputs/compare_sequential] [--procedures fixed,sequential,...]

For every (method, sigma) it trains a digits model once (``python -m ssn_exp method=M sigma=S
certify.enabled=false``, default epochs; an existing run is resumed, i.e. reused) and certifies all 360 test
images of that one checkpoint with each procedure (``python -m ssn_exp.certify ckpt=... procedure=P
procedure.n=N procedure.alpha=A``), each into its own directory. ``sequential@0.5`` is the sequential procedure
deciding only the radii listed (``certify.radii=[0.5]``; radii joined by ``:``). The table shows a sequential
run's certified accuracy only at the radii it decided (its certify.radii), "–" elsewhere. Everything goes through the ordinary entry points,
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


def parse_procedure(spec: str) -> tuple[str, list[float] | None]:
    """``sequential@0.25:0.5`` -> ("sequential", [0.25, 0.5]); ``fixed`` -> ("fixed", None)."""
    name, _, radii = spec.partition("@")
    return name, ([float(r) for r in radii.split(":")] if radii else None)


def certify(py, out: Path, ckpt: Path, method, sigma, spec, n, alpha, skip, log) -> dict:
    procedure, radii = parse_procedure(spec)
    tag = "" if radii is None else "-radii" + "_".join(f"{r:g}" for r in radii)
    d = out / "certify" / (f"{method}-sigma{sigma}-{procedure}-n{n}" + tag + ("" if skip == 1 else f"-skip{skip}"))
    if not (d / "metrics.json").is_file():
        _run(
            [
                py,
                "-m",
                "ssn_exp.certify",
                f"ckpt={ckpt}",
                f"procedure={procedure}",
                f"procedure.n={n}",
                f"procedure.alpha={alpha}",
                f"certify.skip={skip}",
                *([] if radii is None else [f"certify.radii=[{','.join(f'{r:g}' for r in radii)}]"]),
                "certify.progress=false",
                "logger=none",
                f"hydra.run.dir={d}",
            ],
            log,
        )
    metrics = json.loads((d / "metrics.json").read_text())
    with open(d / "certificates.csv", newline="") as fh:
        rows = {int(r["index"]): r for r in csv.DictReader(fh)}
    # the radii the stopping rule decided (sequential records them; fixed decides every radius: None)
    decided = json.loads((d / "certify_settings.json").read_text()).get("radii")
    return {"procedure": spec, "radii": decided, "metrics": metrics, "rows": rows, "skip": skip}


def _stats(run: dict, indices: list[int], radii: list[float]) -> dict:
    rows = [run["rows"][i] for i in indices]
    if SAMPLES_COLUMN in rows[0]:
        samples = np.array([int(r[SAMPLES_COLUMN]) for r in rows], dtype=np.int64)
    else:
        samples = np.full(len(rows), int(run["metrics"]["forward_passes_per_example"]), dtype=np.int64)
    correct = np.array([r["correct"] == "1" for r in rows])
    radius = np.array([float(r["radius"]) for r in rows])
    return {
        "samples": samples,
        "seconds": float(sum(float(r["seconds"]) for r in rows)),
        "acc": [float(np.mean(correct & (radius >= r))) for r in radii],
        "acr": float(np.mean(np.where(correct, np.maximum(radius, 0.0), 0.0))),
    }


def table(results, radii: list[float]) -> str:
    """One row per (model, procedure, images): the images fixed certified, and sequential on the same images (and
    on all, where fixed certified a subset)."""
    head = (
        "| model | procedure | images | mean passes | median | p90 | fewer (mean) | cert. time (s) | passes/s | "
        + " | ".join(f"ρ={r:g}" for r in radii)
        + " | ACR |"
    )
    lines = [head, "|" + "---|" * (10 + len(radii))]
    for method, sigma, runs in results:
        fixed = next((r for r in runs if r["procedure"] == "fixed"), None)
        common = sorted(set.intersection(*(set(r["rows"]) for r in runs)))
        groups = [(r, common) for r in runs]
        groups += [(r, sorted(r["rows"])) for r in runs if len(r["rows"]) > len(common)]
        base = _stats(fixed, common, radii)["samples"].mean() if fixed is not None else float("nan")
        for run, idx in groups:
            s = _stats(run, idx, radii)
            n = s["samples"]
            decided = run["radii"]  # None: every radius (fixed); "–": a radius the sequential test did not decide
            acc = [f"{100 * a:.1f}" if decided is None or r in decided else "–" for r, a in zip(radii, s["acc"])]
            lines.append(
                f"| {method} σ={sigma:g} | {run['procedure']} | {len(idx)} | {n.mean():,.0f} | {np.median(n):,.0f} | "
                f"{np.percentile(n, 90):,.0f} | {base / n.mean():.1f}× | {s['seconds']:.0f} | "
                f"{n.sum() / s['seconds']:,.0f} | " + " | ".join(acc) + f" | {s['acr']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/compare_sequential", help="where runs and certifications go")
    p.add_argument("--methods", default="uniform,ssn")
    p.add_argument("--sigmas", default="0.5,1.0")
    p.add_argument(
        "--procedures",
        default="fixed,sequential,sequential@0.5,sequential@0.25:0.5:0.75:1:1.25:1.5",
        help="procedure=NAME runs; NAME@r1:r2 decides only those radii (certify.radii)",
    )
    p.add_argument("--n", type=int, default=100_000, help="procedure.n: fixed's sample count, sequential's cap")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--fixed-skip", type=int, default=1, help="fixed certifies every k-th test image (1: all 360)")
    p.add_argument("--sequential-skip", type=int, default=1)
    p.add_argument(
        "--radii",
        default="0,0.25,0.5,0.75,1.0,1.25,1.5",
        help="radii of the table (certify.radii, which sequential decides)",
    )
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    radii = [float(r) for r in args.radii.split(",")]
    results = []
    for sigma in [float(s) for s in args.sigmas.split(",")]:
        for method in args.methods.split(","):
            ckpt = train(args.python, out, method, sigma, log)
            runs = []
            for proc in args.procedures.split(","):
                skip = args.fixed_skip if parse_procedure(proc)[0] == "fixed" else args.sequential_skip
                runs.append(certify(args.python, out, ckpt, method, sigma, proc, args.n, args.alpha, skip, log))
            results.append((method, sigma, runs))
            log("\n" + table(results[-1:], radii))
    text = table(results, radii)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
