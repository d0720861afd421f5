"""Helpers for the end-to-end tests: run the real entry points as subprocesses."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Code and configs of a user's own, outside ssn_exp (a noise, a procedure, a model; their YAMLs under conf/).
PLUGINS = ROOT / "tests" / "plugins"


def plugin(name: str):
    """The module ``name`` of :data:`PLUGINS`, imported in this process (once) without changing ``sys.path``."""
    key = f"_plugin_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, PLUGINS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def run_cli(module: str, *overrides: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """python -m <module> overrides... ; returns the CompletedProcess (text)."""
    e = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    e.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )


def run_cli_many(calls, workers: int = 3) -> list:
    """Several ``run_cli(module, *overrides)`` calls, ``calls`` = [(module, [overrides...]), ...], run concurrently
    (each is an independent process; most of their time is interpreter start-up). Results in the same order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_cli, module, *args) for module, args in calls]
        return [f.result() for f in futures]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_csv_header(path: Path) -> tuple[list[str], list[dict]]:
    """The header and the rows of a CSV file."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def cert_rows(path: Path) -> list[dict]:
    """The rows of a certificates.csv without the timing column (:func:`certificate_columns`)."""
    return certificate_columns(read_csv(path))


def same_metrics(a: dict, b: dict) -> None:
    """Two metrics.json contents are equal but for the timing (``seconds_per_example``)."""
    assert {k: v for k, v in a.items() if k != "seconds_per_example"} == {
        k: v for k, v in b.items() if k != "seconds_per_example"
    }


def succeeded(p):
    """A finished entry point (``run_cli``) that exited 0; else the assertion shows the ends of its output."""
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


def run_report_main(argv) -> tuple[int, str, str]:
    """``python -m ssn_exp.report`` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from ssn_exp.report import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def compose_config(overrides, out_dir: Path | str = "outputs/test-config", name: str = "config"):
    """ssn_exp's config ``name`` composed with ``overrides`` as Hydra composes it for a run whose output directory is
    ``out_dir`` (so that ``${hydra:...}`` resolves as inside a run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    from ssn_exp.cli.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def certificate_columns(rows: list[dict]) -> list[dict]:
    """Certificates without the timing column (which differs from run to run)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def locuslab_accuracy(path: Path, radii) -> dict[str, float]:
    """Certified accuracy at each radius as locuslab/smoothing's ``analyze.py`` computes it from a ``certify.py``
    file (``pd.read_csv(path, delimiter="\\t")``, then ``(df["correct"] & (df["radius"] >= r)).mean()``), written
    from that format alone (the csv module): header, columns, types and the ``H:MM:SS.ffffff`` time are checked."""
    import re

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    assert rows[0] == ["idx", "label", "predict", "radius", "correct", "time"], rows[0]
    df = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    for r in df:
        idx, label, predict, correct = (int(r[c]) for c in ("idx", "label", "predict", "correct"))
        assert idx >= 0 and label >= 0 and predict >= -1 and correct == int(predict == label), r
        assert re.fullmatch(r"\d+:\d\d:\d\d(\.\d{6})?", r["time"]), r["time"]
    return {f"{x:g}": sum(int(r["correct"]) & (float(r["radius"]) >= x) for r in df) / len(df) for x in radii}


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def write_tiny_cifar10(
    root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0, test_images=None, test_labels=None
) -> Path:
    """A cifar-10-batches-py folder in the standard pickle format, with random images (or the given test images,
    uint8 (n, 3, 32, 32), and labels)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n, data=None, labels=None):
        return {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8) if data is None else data,
            "labels": rng.integers(0, 10, size=n).tolist() if labels is None else [int(v) for v in labels],
            "batch_label": "tiny",
            "filenames": [f"{i}.png" for i in range(n)],
        }

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(batch(n_train // 5), fh)
    with open(folder / "test_batch", "wb") as fh:
        if test_images is not None:
            data = np.asarray(test_images, dtype=np.uint8).reshape(len(test_images), 3072)
            pickle.dump(batch(len(data), data, test_labels), fh)
        else:
            pickle.dump(batch(n_test), fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_train // 5}, fh)
    return folder


def write_tiny_imagefolder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = Path(root) / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size + 7, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img_{i}.png")
    return Path(root)


def read_wandb_offline(run_dir: Path, path: Path | None = None) -> dict:
    """Summary keys, config keys, name, group and id of the offline wandb run under run_dir/wandb (or of the
    transaction log ``path``).

    Reads the run's transaction log (.wandb: a leveldb-style record log of protobuf Records).
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    if path is None:
        (path,) = Path(run_dir).glob("wandb/offline-run-*/*.wandb")
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    out = {"summary": {}, "config": set(), "name": None, "group": None, "history": 0, "id": None}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind not in (1, 4):  # FIRST / MIDDLE parts of a record
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        buf = b""
        which = rec.WhichOneof("record_type")
        if which == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif which == "run":
            out["config"] |= {c.key for c in rec.run.config.update}
            out["name"] = rec.run.display_name or out["name"]
            out["group"] = rec.run.run_group or out["group"]
            out["id"] = rec.run.run_id or out["id"]
        elif which == "config":  # wandb.config.update(...), e.g. the resolved Hydra config
            out["config"] |= {c.key for c in rec.config.update}
        elif which == "history":
            out["history"] += 1
    return out


def one_error_line(p) -> str:
    """The one ``error:`` line of a refused entry point (exit status 2, nothing else on stderr)."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def start_cli(module: str, *overrides: str, stderr: bool = True) -> subprocess.Popen:
    """python -m <module> overrides... started in its own session (to be killed or terminated by a test); its
    stderr as text through a pipe when ``stderr``, else discarded."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.Popen(
        [sys.executable, "-m", module, *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )


#: CLI arguments of a quick run (the run-directory tests).
FAST = ["debug=fast", "trainer.enable_progress_bar=false"]


def tree(root: Path) -> dict[str, bytes | str | None]:
    """Every path under ``root`` (relative) -> its bytes, a link's target, or None for a folder."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else (None if p.is_dir() else p.read_bytes())
    return out


def hydra_start(out: Path | str, log_name: str = "ssn_exp.log") -> None:
    """What Hydra's run_job does before the task, with the path as Hydra has it (``..`` and all): make the folder,
    open the job log, write .hydra/*.yaml."""
    Path(out).mkdir(parents=True, exist_ok=True)
    out = Path(os.path.abspath(out))
    with open(out / log_name, "a") as fh:
        fh.write("[INFO] a new start\n")
    (out / ".hydra").mkdir(exist_ok=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (out / ".hydra" / name).write_text(f"new {name}\n")


def all_noises(q: int = 16, dim: int = 16) -> dict:
    """Every noise, by name: ssn_exp's own (uniform, ssn, laplace, dssn; DSSN for inputs of ``dim`` values on the
    grid k/``q``) and the user's of tests/plugins (mynoise), each at sigma = 0.5: what the contract suites
    (tests/test_noise_contract.py, tests/test_procedure_contract.py) run over."""
    from ssn_exp.noises import DSSN, SSN, Laplace, Uniform

    return {
        "uniform": Uniform(0.5),
        "ssn": SSN(0.5),
        "laplace": Laplace(0.5),
        "mynoise": plugin("mynoise").HalfUniform(0.5),
        "dssn": DSSN(0.5, q=q, dim=dim),
    }


#: The names of :func:`all_noises`, and of those drawn at random (certified from samples).
NOISES = ["uniform", "ssn", "laplace", "mynoise", "dssn"]
SAMPLED_NOISES = [name for name in NOISES if name != "dssn"]
