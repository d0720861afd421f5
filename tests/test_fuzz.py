"""Property-based fuzzing of the entry points' inputs (issue 16 section 4), in-process for speed.

The property everywhere: for any generated input, the boundary function either succeeds or raises a
:class:`~ssn_exp.exceptions.UserError` whose message is one line (never KeyError, TypeError, IndexError, ...,
which the entry points would print as a traceback). Inputs: every ``certify.*`` value and the top-level values
the run checks (composed from the real config once), ``certify_settings.json`` and ``certificates.csv`` of a run
folder, the report's inputs (``metrics.json``, ``certificates.csv``, ``.hydra/overrides.yaml``, ``error.txt``,
sweep records) and ImageFolder / CIFAR-10 data roots. Checkpoints are fuzzed elsewhere.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict
from torch import nn

from ssn_exp.cli.config import (
    CONF_DIR,
    check_certify_config,
    check_positive_int,
    check_seed,
    check_sigma,
    check_tag,
)
from ssn_exp.exceptions import UserError

#: Fewer examples than the project default (150): each example here touches files or builds a config.
FUZZ = settings(
    max_examples=min(40, settings.default.max_examples),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def assert_one_line_user_error(exc: BaseException) -> None:
    assert isinstance(exc, UserError), f"{type(exc).__name__}: {exc}"
    from ssn_exp.cli.messages import one_line

    text = one_line(exc)
    assert text and "\n" not in text and "Traceback" not in text


def either(fn, *args, **kwargs):
    """``fn(...)`` or a one-line UserError (returned as None)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the property is about the type of everything raised
        assert_one_line_user_error(exc)
        return None


# -- values a user can put on the command line or in a YAML file ---------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, -1, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "none", "bf16", "fp16", "true", "abc", "???", "${nope}", "${data.q}", "1e9", "0.5"]),
    st.text(max_size=8),
)
finite_or_not = st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3), min_size=1, max_size=3)
values = finite_or_not | st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=5,
)

CERTIFY_KEYS = [
    "enabled", "skip", "max_examples", "noise_batch", "batch_size", "radii", "progress", "autocast", "channels_last",
    "compile",
]  # fmt: skip
OTHER_KEYS = ["seed", "trainer.precision", "data.certify_n", "data.shape"]
OTHER_KEYS += ["procedure.n0", "procedure.n", "procedure.alpha"]  # (the procedure's own: procedure=auto, fixed, ...)


@pytest.fixture(scope="module")
def composed():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config")


def _set(cfg, key: str, value):
    with open_dict(cfg):
        try:
            OmegaConf.update(cfg, key, value, force_add=True)
        except Exception:  # noqa: BLE001 - a value OmegaConf itself refuses cannot reach the run either
            return False
    return True


ALL_KEYS = [f"certify.{k}" for k in CERTIFY_KEYS] + OTHER_KEYS


@settings(FUZZ, max_examples=min(100, settings.default.max_examples))  # fast: more examples
@given(key=st.sampled_from(ALL_KEYS), value=values)
# found by this test in CI: a list item that is a broken or missing interpolation escaped as an OmegaConf error
@example(key="certify.radii", value=["${nope}"])
@example(key="certify.radii", value=["???"])
@example(key="data.shape", value=["${nope}", 8, 8])
# and a value the procedure reads through an interpolation (procedure.n: ${data.certify_n}) that is ??? or holds one
@example(key="data.certify_n", value="???")
@example(key="data.certify_n", value=["???"])
def test_each_config_value_alone_is_accepted_or_refused_in_one_line(composed, key, value):
    """One value changed at a time (several at once can hide each other: the first bad one is reported)."""
    test_certify_settings_accept_or_refuse_in_one_line.hypothesis.inner_test(composed, [(key, value)], "auto")


@settings(FUZZ, max_examples=min(100, settings.default.max_examples))
@given(
    radii=st.lists(
        st.floats(allow_nan=True, allow_infinity=True)
        | st.integers(-(2**70), 2**70)
        | st.booleans()
        | st.text(max_size=2),
        max_size=4,
    )
)
def test_any_list_of_radii_is_accepted_or_refused_in_one_line(composed, radii):
    test = test_certify_settings_accept_or_refuse_in_one_line.hypothesis.inner_test
    test(composed, [("certify.radii", radii)], "auto")


@settings(FUZZ, max_examples=min(100, settings.default.max_examples))
@given(
    changes=st.lists(
        st.tuples(st.sampled_from([f"certify.{k}" for k in CERTIFY_KEYS] + OTHER_KEYS), values), min_size=1, max_size=3
    ),
    procedure=st.sampled_from(["auto", "fixed", "sequential"]),
)
def test_certify_settings_accept_or_refuse_in_one_line(composed, changes, procedure):
    from ssn_exp.cli.common import build_procedure

    cfg = copy.deepcopy(composed)
    if procedure != "auto":
        with open_dict(cfg):
            cfg.procedure._target_ = {"fixed": "ssn_exp.certify.procedures.FixedSample",
                                      "sequential": "ssn_exp.certify.procedures_sequential.Sequential"}[procedure]  # fmt: skip
    if not all(_set(cfg, key, value) for key, value in changes):
        return
    proc = either(build_procedure, cfg)
    if proc is not None:  # accepted: the procedure's own settings are of the type it certifies with
        own = proc.sampled.describe() if procedure == "auto" else proc.describe()
        assert type(own["n0"]) is int and type(own["n"]) is int and 1 <= own["n0"] and 1 <= own["n"] <= 2**53
        assert 0 < own["alpha"] < 1 and type(own["alpha"]) is float
    settings_ = either(check_certify_config, cfg)
    if settings_ is not None:  # accepted: every value is of the type the certification uses
        for key in ("skip", "noise_batch", "batch_size", "seed"):
            value = getattr(settings_, key)
            assert type(value) is int and value >= (0 if key == "seed" else 1), key
        assert settings_.autocast in (None, "bf16", "fp16")
        assert type(settings_.channels_last) is bool and type(settings_.compile) is bool
        assert settings_.noise_batch < 2**31
        radii = list(cfg.certify.radii)  # the run reads the radii from the config itself
        assert radii and all(type(r) in (int, float) and math.isfinite(r) and r >= 0 for r in radii)


@FUZZ
@given(value=values)
def test_top_level_checks_accept_or_refuse_in_one_line(value):
    for fn in (check_sigma, check_seed, check_tag, lambda v: check_positive_int(v, "training.epochs")):
        either(fn, value)


# -- run folder files: certify_settings.json, certificates.csv ---------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
file_bytes = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
)


def _tiny_data():
    return torch.utils.data.TensorDataset(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 0]))


_NET = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
_CERTIFY = dict(num_classes=2, n0=2, n=4, noise_batch=8)


def _valid_settings() -> bytes:
    """The certify_settings.json this certification writes (so that generated certificates are read, not refused
    for their settings)."""
    from ssn_exp.lightning.certification import open_certifier
    from ssn_exp.noises import Uniform

    with tempfile.TemporaryDirectory() as tmp:
        open_certifier(_NET, Uniform(0.5), _tiny_data(), tmp, **_CERTIFY)
        return (Path(tmp) / "certify_settings.json").read_bytes()


@pytest.fixture(scope="module")
def valid_settings() -> bytes:
    return _valid_settings()


@FUZZ
@given(
    settings_file=st.one_of(st.none(), file_bytes),
    certificates=st.one_of(file_bytes, st.just(b"")),
    header=st.booleans(),
)
def test_a_certify_folder_with_any_settings_and_certificates_file_is_used_or_refused_in_one_line(
    valid_settings, settings_file, certificates, header
):
    from ssn_exp.certify.procedures import FixedSample
    from ssn_exp.certify.record import CertificateRecord
    from ssn_exp.lightning.certification import open_certifier
    from ssn_exp.noises import Uniform

    if header:
        certificates = (",".join(CertificateRecord(Uniform(0.5), FixedSample()).columns) + "\n").encode() + certificates
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "certify_settings.json").write_bytes(valid_settings if settings_file is None else settings_file)
        (out / "certificates.csv").write_bytes(certificates)
        before = (out / "certificates.csv").read_bytes()
        cert = either(open_certifier, _NET, Uniform(0.5), _tiny_data(), out, **_CERTIFY)
        if cert is None:  # refused: the user's file is untouched
            assert (out / "certificates.csv").read_bytes() == before


CSV_CELLS = st.sampled_from(["0", "1", "2", "-1", "3", "0.5", "nan", "inf", "", "x", "1e400", "0:4", "1:4", "0:2;1:2"])
csv_text = st.lists(st.lists(CSV_CELLS, min_size=0, max_size=10), max_size=5).map(
    lambda rows: "\n".join(",".join(r) for r in rows) + "\n"
)
UNIFORM_HEADER = "index,label,prediction,correct,radius,seconds,p_lower,radius_box,counts"
DSSN_HEADER = "index,label,prediction,correct,radius,seconds,k,counts"


@FUZZ
@given(header=st.sampled_from([UNIFORM_HEADER, DSSN_HEADER, "index", ""]), body=csv_text, raw=st.binary(max_size=40))
def test_read_certificates_of_any_file_returns_rows_or_refuses_in_one_line(header, body, raw):
    from ssn_exp.certify.procedures import default_procedure
    from ssn_exp.certify.record import CertificateRecord
    from ssn_exp.lightning.results import read_certificates
    from ssn_exp.noises import DSSN, Uniform

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "certificates.csv"
        for content in ((header + "\n" + body).encode(), raw):
            path.write_bytes(content)
            for noise in (Uniform(0.5), DSSN(0.5, q=16, dim=16), None):
                record = None if noise is None else CertificateRecord(noise, default_procedure(noise, n=4, alpha=0.001))
                either(read_certificates, path, record, num_classes=2, allowed=[0, 1, 2])


# -- the report's inputs ---------------------------------------------------------------------------------------------
def _metrics(method, extra):
    base = {"dataset": "digits", "method": method, "training": "standard", "sigma": 0.5, "q": 16, "n_examples": 2}
    return {**base, **extra}


metrics_files = st.one_of(
    st.builds(
        lambda method, extra: json.dumps(_metrics(method, extra)).encode(),
        st.sampled_from(["dssn", "uniform", "ssn"]),
        st.dictionaries(
            st.sampled_from(
                ["dataset", "method", "label", "training", "denoiser", "sigma", "q", "n_examples", "seed", "acr"]
                + ["procedure", "forward_passes_per_example"]
            ),
            json_values | st.sampled_from([2, 0.5, 16, "dssn", "x", -1, 0, True, 10**30, 1e308, "../x"]),
            max_size=2,
        ),
    ),
    file_bytes,
)
#: Two valid rows per header (metrics.json says n_examples=2): the report then gets as far as the run's record.
VALID_BODY = {
    UNIFORM_HEADER: "0,1,1,1,0.25,0.01,0.9,0.3,1:4\n1,2,3,0,0.1,0.01,0.6,0.2,3:4\n",
    DSSN_HEADER: "0,1,1,1,0.25,0.01,4,1:16\n1,2,3,0,0.0,0.01,0,3:16\n",
    "index,label,prediction,k": "0,1,1,4\n1,2,3,0\n",
    "index,label,prediction,radius": "0,1,1,0.5\n1,2,3,-0.5\n",
    "index,label,prediction,radius,radius_tight": "0,1,1,0.5,0.7\n1,2,3,-0.5,0.1\n",  # a user noise's further radius
}
REPORT_HEADERS = st.sampled_from(list(VALID_BODY))
yaml_files = st.one_of(
    st.lists(st.sampled_from(["method=dssn", "sigma=0.5", "seed=0", "x", "- y", ": z", "'q"]), max_size=4).map(
        lambda items: "".join(f"- {i}\n" for i in items).encode()
    ),
    file_bytes,
)
sweep_records = st.one_of(
    st.lists(
        st.lists(st.sampled_from(["method=dssn", "sigma=0.5", "sigma=1.0", "seed=0"]), max_size=3), max_size=3
    ).map(lambda jobs: json.dumps({"sweep": "x", "jobs": jobs}).encode()),
    file_bytes,
)
multirun_files = st.one_of(
    st.builds(
        lambda params, task: json.dumps(
            {"hydra": {"sweeper": {"params": params}, "overrides": {"task": task}}}
        ).encode(),
        st.dictionaries(
            st.sampled_from(["sigma", "method", "+x", "a.b"]),
            st.sampled_from(["0.5,1.0", "dssn", "1", "[", "range(3)"]),
            max_size=2,
        ),
        st.lists(st.sampled_from(["sigma=0.5", "seed=0,1", "method=dssn", "=", "x=[", "hydra.x=1"]), max_size=3),
    ),
    file_bytes,
)


@FUZZ
@given(
    metrics=metrics_files,
    header=REPORT_HEADERS,
    body=st.one_of(st.none(), csv_text),
    overrides=yaml_files,
    error=st.binary(max_size=20),
    record=st.one_of(st.none(), sweep_records),
    multirun=st.one_of(st.none(), multirun_files),
)
def test_the_report_over_any_run_folder_reports_or_refuses_in_one_line(
    metrics, header, body, overrides, error, record, multirun
):
    import contextlib
    import io

    from ssn_exp.report import main

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        for job, with_metrics in (("0", True), ("1", False)):
            d = sweep / job
            (d / ".hydra").mkdir(parents=True)
            (d / ".hydra" / "overrides.yaml").write_bytes(overrides)
            (d / ".hydra" / "config.yaml").write_text("model:\n  _target_: os.system\n  _args_: ['exit 1']\n")
            if with_metrics:
                (d / "metrics.json").write_bytes(metrics)
                (d / "certificates.csv").write_text(header + "\n" + (VALID_BODY[header] if body is None else body))
            else:
                (d / "error.txt").write_bytes(error)
        if record is not None:
            (sweep / "sweep_jobs.json").write_bytes(record)
        if multirun is not None:
            (sweep / "multirun.yaml").write_bytes(multirun)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(sweep), "--out", str(Path(tmp) / "out"), "--no-plots", "--radii", "0.5", "1.0"])
        lines = err.getvalue().strip().splitlines()
        assert rc in (1, 2)  # job 1 never has results: the sweep is partial, or nothing could be read
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


@FUZZ
@given(metrics=metrics_files, header=REPORT_HEADERS, body=st.one_of(st.none(), csv_text))
def test_a_run_record_is_read_with_the_types_the_tables_need_or_refused(metrics, header, body):
    """The report's reader of one run: a record whose every field has the type the tables use, or a ValueError
    (which the report lists as an unreadable run)."""
    import numpy as np

    from ssn_exp.report.records import load_run_dir

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "metrics.json").write_bytes(metrics)
        (run / "certificates.csv").write_text(header + "\n" + (VALID_BODY[header] if body is None else body))
        try:
            records = load_run_dir(run)
        except (OSError, ValueError) as exc:
            assert "\n" not in str(exc)
            return
    for rec in records:
        assert all(type(v) is str and v for v in (rec.dataset, rec.method, rec.training, rec.denoiser, rec.label))
        assert type(rec.sigma) is float and math.isfinite(rec.sigma) and rec.sigma > 0
        assert type(rec.seed) is int and (rec.q is None or (type(rec.q) is int and rec.q >= 1))
        assert rec.labels.dtype == np.int64 and rec.prediction.dtype == np.int64
        assert len(rec.labels) == len(rec.prediction) == len(rec.radius)
        assert np.isfinite(np.asarray(rec.radius, dtype=np.float64)).all()
        assert np.abs(np.asarray(rec.radius, dtype=np.float64)).max() <= 2**53 and rec.sigma <= 2**53


# -- data roots -------------------------------------------------------------------------------------------------------
def _png(size: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = _png(12, 0)
image_files = st.one_of(
    st.just(GOOD_PNG),
    st.binary(max_size=40),
    st.integers(min_value=0, max_value=len(GOOD_PNG) - 1).map(lambda n: GOOD_PNG[:n]),
    st.just(b""),
)
class_folder = st.dictionaries(st.sampled_from(["a.png", "b.jpg", "c.JPEG", "d.txt", "e.png"]), image_files, max_size=3)


@FUZZ
@given(
    train=st.dictionaries(st.sampled_from(["c0", "c1", "c2", ".hidden"]), class_folder, max_size=3),
    val=st.dictionaries(st.sampled_from(["c0", "c1", "c2"]), class_folder, max_size=3),
    num_classes=st.integers(min_value=2, max_value=3),
)
def test_image_folder_data_roots_load_or_refuse_in_one_line(train, val, num_classes):
    from ssn_exp.lightning.data import ImageFolderData

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for split, tree in (("train", train), ("val", val)):
            (root / split).mkdir()
            for cls, files in tree.items():
                (root / split / cls).mkdir()
                for name, data in files.items():
                    (root / split / cls / name).write_bytes(data)
        dm = ImageFolderData(
            name="tiny", q=255, num_classes=num_classes, shape=[3, 8, 8], mean=[0.5] * 3, std=[0.5] * 3,
            train_root=str(root / "train"), val_root=str(root / "val"), image_size=8, resize=8, test_every=1,
        )  # fmt: skip
        either(dm.check, "fit")
        if either(dm.setup, "fit") is None and dm.train_set is None:
            return
        for ds in (dm.train_set, dm.certify_set()):
            for i in range(len(ds)):
                item = either(ds.__getitem__, i)
                if item is not None:
                    assert item[0].shape == (3, 8, 8) and 0 <= int(item[1]) < num_classes


@FUZZ
@given(
    files=st.dictionaries(
        st.sampled_from(["data_batch_1", "test_batch", "batches.meta", "readme.html"]), file_bytes, max_size=4
    )
)
def test_cifar10_data_roots_load_or_refuse_in_one_line(files):
    from ssn_exp.lightning.data import CIFAR10Data

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cifar-10-batches-py"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        dm = CIFAR10Data(
            root=tmp, name="cifar10", q=255, num_classes=10, shape=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3
        )
        either(dm.setup, "test")


# -- resume read-back: edits of a finished run's rows ----------------------------------------------------------------


def _finished_run(out: Path, kind: str):
    """A finished certification (fixed, sequential or exact) of the sequential tests' tiny data; its metrics."""
    from ssn_exp.lightning.results import summarize
    from test_sequential_procedure import _certifier

    cert = _certifier(out, **_RUN_KINDS[kind]())
    cert.run("cpu", progress=False)
    return summarize(out, cert.record, {"dataset": "digits"}, radii=[0.0, 0.25, 0.5], plot=False)


def _fixed():
    from ssn_exp.certify.procedures import FixedSample

    return {"procedure": FixedSample(n0=16, n=64, alpha=0.01)}


def _exact():
    from ssn_exp.certify.procedures import Exact
    from ssn_exp.noises import DSSN

    return {"noise": DSSN(0.5, q=16, dim=64), "procedure": Exact()}


_RUN_KINDS = {"fixed": _fixed, "sequential": dict, "exact": _exact}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    return {kind: (out, _finished_run(out, kind)) for kind in _RUN_KINDS for out in [tmp_path_factory.mktemp(kind)]}


def _same_metrics(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_metrics(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float | int):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _edit(value: str, kind: int, number: float, cls: int) -> str:
    """A changed cell: a nudge of its number, another number, a word, or (counts) a vote moved or added."""
    if kind == 0:  # a small nudge of a numeric cell
        try:
            return (
                repr(float(value) + number * 10.0 ** -(cls % 13))
                if "." in value or "e" in value
                else str(int(value) + (1 if number >= 0 else -1))
            )
        except ValueError:
            kind = 3
    if kind == 1:
        return repr(number)
    if kind == 2:
        return ["", "nan", "inf", "-inf", "1e308", "-0", "0x1", "1.0", "01", " 1", "5e-324"][cls % 11]
    votes = dict(item.split(":") for item in value.split()) if ":" in value else {}
    if votes:  # move one vote between classes, or add one
        src = sorted(votes)[cls % len(votes)]
        votes[src] = str(int(votes[src]) - (1 if number >= 0 else 0))
    votes[str(cls % 10)] = str(int(votes.get(str(cls % 10), "0")) + 1)
    return " ".join(f"{c}:{v}" for c, v in sorted(votes.items(), key=lambda kv: int(kv[0])) if v != "0")


@settings(FUZZ, max_examples=min(30, settings.default.max_examples))
@given(
    kind=st.sampled_from(sorted(_RUN_KINDS)),
    row=st.integers(0, 9),
    column=st.integers(0, 20),
    edit=st.integers(0, 3),
    number=st.floats(-1e3, 1e3, allow_nan=False),
    cls=st.integers(0, 100),
)
def test_an_edited_row_is_refused_in_one_line_or_changes_no_metric(finished_runs, kind, row, column, edit, number, cls):
    """Resume reads back a finished run's rows (fixed, sequential, exact) after one random edit: refused in one line
    (nothing certified, the file untouched), or (an edit that changes nothing a check could see, e.g. `01` for
    `1`) the run completes to the same metrics as the untouched run (seconds aside: they are not evidence)."""
    import shutil

    from ssn_exp.lightning.results import ResultsFileError, summarize
    from test_sequential_procedure import _certifier

    src, reference = finished_runs[kind]
    lines = (src / "certificates.csv").read_text().splitlines()
    header = lines[0].split(",")
    editable = [c for c in header if c != "seconds"]
    name = editable[column % len(editable)]
    cells = lines[1 + row].split(",")
    cells[header.index(name)] = _edit(cells[header.index(name)], edit, number, cls)
    lines[1 + row] = ",".join(cells)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        shutil.copy(src / "certify_settings.json", out / "certify_settings.json")
        (out / "certificates.csv").write_text("\n".join(lines) + "\n")
        try:
            cert = _certifier(out, **_RUN_KINDS[kind]())
        except ResultsFileError as exc:
            assert_one_line_user_error(exc)
            assert (out / "certificates.csv").read_text() == "\n".join(lines) + "\n"
            return
        cert.run("cpu", progress=False)  # an example whose row the edit moved away is certified again
        metrics = summarize(out, cert.record, {"dataset": "digits"}, radii=[0.0, 0.25, 0.5], plot=False)
    strip = {"seconds_per_example"}
    assert _same_metrics(
        {k: v for k, v in metrics.items() if k not in strip}, {k: v for k, v in reference.items() if k not in strip}
    ), (name, cells)
