"""The report's inputs are data (issue 23 sections 3 and 7): no name read from a result file places a file outside
``--out``, ``--out`` is a folder of the report's own, and a number beyond any run's range is one "unreadable" line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import run_report_main
from ssn_exp.atomic import replace_file, safe_name
from ssn_exp.report.records import RunFileError, load_reference, load_run_dir

EVIL = "../../../../escaped"


def write_run(run_dir: Path, rows=("0,1,1,0.5,10,0.7", "1,2,2,0.25,20,0.3"), **meta) -> Path:
    """A uniform run with a samples column (a samples plot) and a further radius, denoiser mse (a denoiser plot)."""
    run_dir.mkdir(parents=True)
    header = meta.pop("header", "index,label,prediction,radius,samples,radius_box")
    (run_dir / "certificates.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    base = {"dataset": "digits", "method": "uniform", "training": "standard", "denoiser": "mse", "sigma": 0.5}
    (run_dir / "metrics.json").write_text(json.dumps({**base, "n_examples": len(rows), "seed": 0, **meta}))
    return run_dir


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


@pytest.mark.parametrize("key", ["dataset", "training", "denoiser", "method", "label", "tag", "radius column"])
def test_no_name_from_a_result_file_writes_outside_out(tmp_path, key):
    runs = tmp_path / "a" / "b" / "c" / "runs"
    if key == "tag":  # the procedure of a method certified two ways is appended to it ("uniform [<procedure>]")
        write_run(runs / "0", procedure=EVIL)
        write_run(runs / "1", procedure="fixed", sigma=1.0)
    elif key == "radius column":  # a further radius radius_<name> gives the method "uniform (<name>)"
        write_run(runs / "0", header=f"index,label,prediction,radius,samples,radius_{EVIL}")
    else:
        write_run(runs / "0", **{key: EVIL})
    out = runs.parent / "out"
    before = files(tmp_path)
    rc, stdout, stderr = run_report_main([runs, "--out", out])
    assert rc == 0, stderr
    written = files(tmp_path) - before
    assert {p.parent for p in written} == {out}, sorted(written)
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) >= 2 and all(p.stat().st_size > 1000 for p in pngs)


def test_safe_name_keeps_plain_names_and_tells_changed_ones_apart():
    assert [safe_name(v) for v in ("cifar10", "mse_retrain", "sigma0.5", "a=b-c")] == [
        "cifar10",
        "mse_retrain",
        "sigma0.5",
        "a=b-c",
    ]
    names = [safe_name(v) for v in ("../x", "/x", "..x", "_x", ".x", "", "x" * 300, "x" * 301, "a b", "a_b ")]
    assert len(set(names)) == len(names)
    for name in names:
        assert name == Path(name).name and not name.startswith(".") and ".." not in name and 0 < len(name) <= 36


def test_the_writer_refuses_a_path_outside_its_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for path in (out / ".." / "x.md", out / "..", tmp_path / "x.md"):
        with pytest.raises(PermissionError, match="outside the output folder"):
            replace_file(path, "text", inside=out)
    assert files(tmp_path) == set()
    replace_file(out / "x.md", "text", inside=out)
    assert (out / "x.md").read_text() == "text"


@pytest.mark.parametrize("value", ["", ".", "./", "{cwd}"])
def test_out_must_not_be_the_working_directory(tmp_path, monkeypatch, value):
    write_run(tmp_path / "runs" / "0")
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    rc, stdout, stderr = run_report_main([tmp_path / "runs", "--out", value.format(cwd=tmp_path), "--no-plots"])
    lines = stderr.strip().splitlines()
    assert rc == 2 and stdout == "" and len(lines) == 1 and "is the working directory" in lines[0], stderr
    assert files(tmp_path) == before


BIG = 10**30
OUT_OF_RANGE = {  # (what is changed, the run's metrics / rows, what the one line says)
    "label": ({}, (f"0,{BIG},1,0.5,10,0.7", "1,2,2,0.25,20,0.3"), "line 2: label is out of range"),
    "prediction": ({}, (f"0,1,{BIG},0.5,10,0.7", "1,2,2,0.25,20,0.3"), "line 2: prediction is out of range"),
    "samples": ({}, ("0,1,1,0.5,10,0.7", f"1,2,2,0.25,{BIG},0.3"), "line 3: samples is out of range"),
    "digits": ({}, ("0,1,1,0.5,10,0.7", f"1,2,2,0.25,{'9' * 5000},0.3"), "samples is out of range"),
    "k": ({"q": 16, "header": "index,label,prediction,k"}, ("0,1,1,4", f"1,2,2,-{BIG}"), "k is out of range"),
    "q": ({"q": BIG, "header": "index,label,prediction,k"}, ("0,1,1,4", "1,2,2,3"), "'q' is out of range"),
    "radius": ({}, ("0,1,1,1e308,10,0.7", "1,2,2,0.25,20,0.3"), "radius must be a finite number of at most 2**53"),
    "further radius": ({}, ("0,1,1,0.5,10,1e300", "1,2,2,0.25,20,0.3"), "radius_box must be a finite number"),
    "passes": ({"forward_passes_per_example": 10**400}, None, "'forward_passes_per_example' must be a finite number"),
    "seed": ({"seed": BIG}, None, "'seed' is out of range"),
    "n_examples": ({"n_examples": BIG}, None, "'n_examples' is out of range"),
    "sigma": ({"sigma": 1e300}, None, "'sigma' must be a finite number of at most 2**53"),
    "no rows": ({}, (), "certificates.csv: no examples (a header without rows)"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_a_number_beyond_any_runs_range_is_one_unreadable_line(tmp_path, case):
    meta, rows, message = OUT_OF_RANGE[case]
    bad = write_run(tmp_path / "runs" / "bad", **({} if rows is None else {"rows": rows}), **meta)
    with pytest.raises(RunFileError, match=re.escape(message)) as info:
        load_run_dir(bad)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    write_run(tmp_path / "runs" / "good")
    rc, stdout, stderr = run_report_main([tmp_path / "runs", "--out", tmp_path / "out", "--no-plots"])
    lines = stderr.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: partial results"), stderr
    assert f"unreadable or ignored: {bad}: unreadable (" in (tmp_path / "out" / "missing.txt").read_text()


def test_a_published_index_names_files_in_its_folder_only(tmp_path):
    folder = tmp_path / "published" / "x"
    folder.mkdir(parents=True)
    (folder / "index.csv").write_text(
        "file,dataset,method,training,denoiser,sigma,time_per_image_s\n../secret.npz,cifar10,ssn,standard,none,0.5,\n"
    )
    rc, stdout, stderr = run_report_main([folder, "--out", tmp_path / "out"])
    assert rc == 2 and "../secret.npz" in stderr and "is not a file name in" in stderr


def test_a_byte_order_mark_is_skipped_in_every_file_the_report_reads(tmp_path):
    """Spreadsheet programs write UTF-8 with a BOM: it is not part of the first column's name or of the JSON."""
    run = write_run(tmp_path / "run")
    for name in ("certificates.csv", "metrics.json"):
        (run / name).write_bytes(b"\xef\xbb\xbf" + (run / name).read_bytes())
    (rec, box) = load_run_dir(run)
    assert rec.labels.tolist() == [1, 2] and rec.samples.tolist() == [10, 20] and box.variant == "box"
    folder = tmp_path / "published"
    folder.mkdir()
    np.savez(folder / "a.npz", labels=np.array([1, 2]), predicted=np.array([1, 0]), radius_l1=np.array([0.5, 0.1]))
    (folder / "index.csv").write_bytes(
        b"\xef\xbb\xbffile,dataset,method,training,denoiser,sigma,time_per_image_s\na.npz,x,y,standard,none,0.5,\n"
    )
    (published,) = load_reference(folder)
    assert published.prediction.tolist() == [1, 0] and published.origin == "published"


@pytest.mark.parametrize(
    "arrays, sigma, words",
    [
        (dict(labels=[1, 2], predicted=[1, 0], radius_l1=[0.5, np.inf]), "0.5", "radii must be finite"),
        (dict(labels=[1, 2], predicted=[1, 0], radius_l1=[0.5, 1e308]), "0.5", "radii must be finite"),
        (dict(labels=[1, 2], predicted=[1, -7], radius_l1=[0.5, 0.1]), "0.5", "must be >= -1"),
        (dict(labels=[1, 2], predicted=[1], radius_l1=[0.5, 0.1]), "0.5", "one length per image"),
        (dict(labels=[1, 2], predicted=[1, 0], radius_l1=[0.5, 0.1]), "nan", "sigma of a.npz must be a finite"),
        (dict(labels=[1, 2], predicted=[1, 0], radius_l1=[0.5, 0.1]), "-1", "sigma of a.npz must be > 0"),
        (dict(labels=[1, 2], predicted=[1, 0], radius_l1=[0.5, 0.1]), "1e400", "sigma of a.npz must be a finite"),
    ],
)
def test_published_arrays_are_bounded_as_run_rows_are(tmp_path, arrays, sigma, words):
    folder = tmp_path / "published"
    folder.mkdir()
    np.savez(folder / "a.npz", **{k: np.array(v) for k, v in arrays.items()})
    (folder / "index.csv").write_text(
        f"file,dataset,method,training,denoiser,sigma,time_per_image_s\na.npz,x,y,standard,none,{sigma},\n"
    )
    with pytest.raises(RunFileError, match=words):
        load_reference(folder)
    rc, _, stderr = run_report_main([folder, "--out", tmp_path / "out"])
    assert rc == 2 and words.split()[0] in stderr and "Traceback" not in stderr
