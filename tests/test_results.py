"""The result-file code (``ssn_exp.lightning.results``) tested in-process (issue 16 section 6).

The CLI tests reach this module only through subprocesses, where neither coverage nor the mutation run sees it.
Here every check of a resumed row, the shard merge, the summary and the console table is driven directly:
rows with prediction 0, with ``correct`` 0, votes for class 0, a resume with alpha != 0.001, radius_box at and
below radius, the header check, negative counts. Small DSSN tables and no model: the file runs in about a second.
"""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
import torch

from ssn_exp.certify import clopper_pearson_lower, exact_certificate
from ssn_exp.certify.procedures import default_procedure
from ssn_exp.certify.record import CertificateRecord
from ssn_exp.exceptions import LinkedRunFileError, UserError
from ssn_exp.lightning.results import (
    BASE_COLUMNS,
    ResultsFileError,
    append_rows,
    format_counts,
    format_table,
    merge_shards,
    model_fingerprint,
    parse_counts,
    read_certificates,
    summarize,
    write_json_atomic,
    write_locuslab,
    write_rows_atomic,
    write_text_atomic,
)
from ssn_exp.noises import DSSN, SSN, SampledNoise, Uniform, uniform_radius

N, ALPHA = 50, 0.001


class NoBox(SampledNoise):
    """A sampled noise with uniform noise's radius but no box-constrained one (its rows have no radius_box column)."""

    name = "nobox"

    def scale(self, sigma):
        return 3**0.5 * sigma

    def radius(self, p_lower):
        return uniform_radius(p_lower, self.lam)


def record(noise, n=N, alpha=ALPHA, n0=64):
    """The record of ``noise`` certified by its own procedure (fixed: n0 + n samples at level alpha)."""
    return CertificateRecord(noise, default_procedure(noise, n0=n0, n=n, alpha=alpha))


def columns_for(noise):
    return record(noise).columns


@pytest.fixture(scope="module")
def dssn():
    return DSSN(0.5, q=16, dim=4)  # L = floor(2 sqrt(3) 0.5 16) = 27


def dssn_row(dssn, index, label, counts, seconds=0.25):
    counts = np.asarray(counts, dtype=np.int64)
    a, k = exact_certificate(counts[None, :])
    pred, k = int(a[0]), int(k[0])
    return {
        "index": index,
        "label": label,
        "prediction": pred,
        "correct": int(pred == label),
        "radius": k / dssn.q,
        "seconds": seconds,
        "k": k,
        "counts": format_counts(counts),
    }


def uniform_row(smoothing, index, label, counts, alpha=ALPHA, seconds=0.5, box_extra=0.0):
    counts = np.asarray(counts, dtype=np.int64)
    pred = int(np.argmax(counts))
    p = float(clopper_pearson_lower(int(counts[pred]), int(counts.sum()), alpha))
    radius = 2.0 * smoothing.lam * (p - 0.5)
    row = {
        "index": index,
        "label": label,
        "prediction": pred,
        "correct": int(pred == label),
        "radius": radius,
        "seconds": seconds,
        "p_lower": p,
        "counts": format_counts(counts),
    }
    if "radius_box" in smoothing.extra_columns:
        row["radius_box"] = radius + box_extra
    return row


def write(path, smoothing, rows):
    write_rows_atomic(path, columns_for(smoothing), rows)
    return path


def read(path, smoothing, n=N, alpha=ALPHA, **kw):
    return read_certificates(path, record(smoothing, n, alpha), **kw)


# ------------------------------------------------------------------------------------- small helpers


def test_columns_of_each_method(dssn):
    assert BASE_COLUMNS == ["index", "label", "prediction", "correct", "radius", "seconds"]
    assert columns_for(dssn) == BASE_COLUMNS + ["k", "counts"]
    assert columns_for(Uniform(0.5)) == BASE_COLUMNS + ["p_lower", "radius_box", "counts"]
    assert columns_for(SSN(0.5)) == BASE_COLUMNS + ["p_lower", "radius_box", "counts"]
    assert columns_for(NoBox(0.5)) == BASE_COLUMNS + ["p_lower", "counts"]


def test_counts_are_written_as_nonzero_pairs_including_class_0_and_read_back():
    c = np.array([5, 0, 0, 2], dtype=np.int64)
    assert format_counts(c) == "0:5 3:2"
    assert format_counts(np.zeros(3, np.int64)) == ""
    back = parse_counts("0:5 3:2", 4)
    assert back.dtype == np.int64 and back.tolist() == [5, 0, 0, 2]
    assert parse_counts("", 2).tolist() == [0, 0]
    assert parse_counts("  1:7  ", 2).tolist() == [0, 7]
    assert parse_counts("1:0", 2).tolist() == [0, 0]  # an explicit zero is a zero


@pytest.mark.parametrize(
    "text", ["-1:3", "4:1", "0:-1", "0:1 0:2", "0:1 1:1 0:1"], ids=["neg-class", "class>=C", "neg-count", "dup", "dup2"]
)
def test_bad_counts_entries_are_refused_by_name(text):
    bad = text.split()[-1] if text.startswith("0:1") else text
    with pytest.raises(ValueError, match=re.escape(f"bad counts entry {bad!r}")):
        parse_counts(text, 4)


@pytest.mark.parametrize("text", ["3", "a:1", "1:x", "1:2:3"])
def test_malformed_counts_entries_are_value_errors(text):
    with pytest.raises(ValueError):
        parse_counts(text, 4)


def test_atomic_writes_leave_no_temporary_file_and_refuse_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("the user's file\n")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    with pytest.raises(LinkedRunFileError, match="is a symbolic link"):
        write_text_atomic(link, "new\n")
    assert target.read_text() == "the user's file\n"  # not written through the link
    assert link.is_symlink()  # and the link itself is the user's: left as it is
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "m.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1.5\n  ]\n}\n'
    write_rows_atomic(tmp_path / "r.csv", ["x", "y"], [{"x": 1, "y": 2, "z": 3}, {"x": 4}])
    assert (tmp_path / "r.csv").read_bytes() == b"x,y\r\n1,2\r\n4,\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "m.json", "out.txt", "r.csv"]


LINK_WORDS = (
    "is a symbolic link; ssn_exp does not write run files through links: remove it, or give the run another "
    "directory (tag=NAME or hydra.run.dir=DIR)"
)


def test_append_rows_creates_the_file_then_appends_and_ignores_other_keys(tmp_path):
    path = tmp_path / "certificates.csv"
    old = os.umask(0o022)
    try:
        append_rows(path, ["x", "y"], [{"x": 1, "y": 2, "z": 3}])
        write_text_atomic(tmp_path / "other.txt", "x")
    finally:
        os.umask(old)
    append_rows(path, ["x", "y"], [{"x": 4}])
    assert path.read_bytes() == b"1,2\r\n4,\r\n"
    # every run file is created rw-r--r-- (under the usual umask): data, not a program
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "other.txt").stat().st_mode) == 0o644


@pytest.mark.parametrize("dangling", [False, True])
def test_append_rows_refuses_a_symlink_and_writes_nothing_through_it(tmp_path, dangling):
    target = tmp_path / "elsewhere.csv"
    if not dangling:
        target.write_text("the user's file\n")
    link = tmp_path / "certificates.csv"
    link.symlink_to(target)
    with pytest.raises(LinkedRunFileError) as info:
        append_rows(link, ["x"], [{"x": 1}])
    assert str(info.value) == f"{link} {LINK_WORDS}"
    assert target.read_text() == "the user's file\n" if not dangling else not target.exists()
    assert link.is_symlink()


def test_metrics_json_is_strict_json_or_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "metrics.json", {"acr": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_a_certificates_file_that_is_not_utf8_or_not_csv_is_named(tmp_path, dssn):
    path = tmp_path / "certificates.csv"
    path.write_bytes(b"index,label\n\xff\xfe\n")
    with pytest.raises(ResultsFileError) as info:
        read(path, dssn)
    assert str(info.value) == f"{path} is not UTF-8 text: not a certificates file; certify into another directory"
    path.write_text(",".join(columns_for(dssn)) + "\n" + "1" * 200_000 + "\n")  # beyond the csv module's field limit
    with pytest.raises(ResultsFileError) as info:
        read(path, dssn)
    assert str(info.value).startswith(f"{path} is not a CSV file (field larger than field limit")
    assert str(info.value).endswith("; certify into another directory")


def test_atomic_write_temporaries_are_per_process(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(str(a)), real(a, b)))
    write_text_atomic(tmp_path / "a.txt", "x")
    write_rows_atomic(tmp_path / "b.csv", ["x"], [])
    assert seen == [str(tmp_path / f".a.txt.tmp{os.getpid()}"), str(tmp_path / f".b.csv.tmp{os.getpid()}")]


def test_model_fingerprint_tracks_names_shapes_dtypes_and_values():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    fp = model_fingerprint(m)
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and model_fingerprint(m) == fp
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(m.state_dict())
    assert model_fingerprint(m2) == fp
    with torch.no_grad():
        m2.bias[0] += 1
    assert model_fingerprint(m2) != fp
    assert model_fingerprint(m.double()) != fp
    m3 = torch.nn.Linear(3, 2)
    m3.load_state_dict(m.float().state_dict())
    m3.register_buffer("empty", torch.zeros(0))
    assert model_fingerprint(m3) != fp  # a name more, even an empty tensor
    r = torch.nn.Linear(2, 3)
    with torch.no_grad():
        r.weight.copy_(m.float().weight.T)
        r.bias.zero_()
    assert model_fingerprint(r) != model_fingerprint(m.float())


# --------------------------------------------------------------------------------- read_certificates


def test_a_missing_file_is_empty_and_an_unchecked_read_skips_rows_without_an_index(tmp_path, dssn):
    assert read_certificates(tmp_path / "none.csv") == {}
    assert read(tmp_path / "none.csv", dssn) == {}
    p = tmp_path / "c.csv"
    p.write_text("index,label\n3,1\nx,2\n,5\n0,4\n")
    rows = read_certificates(p)
    assert sorted(rows) == [0, 3] and rows[3]["label"] == "1"


def test_an_empty_file_reads_as_no_rows(tmp_path, dssn):
    p = tmp_path / "c.csv"
    p.write_text("")
    assert read(p, dssn) == {}


def test_dssn_rows_with_prediction_0_correct_0_and_votes_for_class_0_are_accepted(tmp_path, dssn):
    rows = [
        dssn_row(dssn, 0, 0, [20, 7, 0]),  # prediction 0, correct 1
        dssn_row(dssn, 1, 1, [27, 0, 0]),  # prediction 0, correct 0, every vote for class 0
        dssn_row(dssn, 2, 2, [0, 3, 24]),  # votes for class 0 are none
        dssn_row(dssn, 5, 1, [13, 14, 0]),  # a near tie
    ]
    assert rows[0]["prediction"] == 0 and rows[1]["correct"] == 0
    p = write(tmp_path / "certificates.csv", dssn, rows)
    got = read(p, dssn, allowed=range(10), labels=lambda idx: [{0: 0, 1: 1, 2: 2, 5: 1}[i] for i in idx])
    assert sorted(got) == [0, 1, 2, 5] and got[1]["correct"] == "0" and got[0]["k"] == str(rows[0]["k"])
    assert read(p, dssn, num_classes=3) == got


def test_a_torn_last_line_is_ignored(tmp_path, dssn):
    p = write(tmp_path / "certificates.csv", dssn, [dssn_row(dssn, 0, 0, [20, 7])])
    with open(p, "a") as fh:
        fh.write("1,0,0,1,0.")
    assert sorted(read(p, dssn)) == [0]
    assert sorted(read_certificates(p)) == [0]


def test_the_header_must_be_this_methods(tmp_path, dssn):
    p = write(tmp_path / "certificates.csv", Uniform(0.5), [])
    with pytest.raises(ResultsFileError, match=r"has columns \[.*'p_lower'.*\], expected \[.*'k', 'counts'\]") as e:
        read(p, dssn)
    assert "written for another method or by another version; certify into another directory" in str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)
    write(p, NoBox(0.5), [])
    with pytest.raises(ResultsFileError, match="has columns"):
        read(p, Uniform(0.5))
    assert read(p, NoBox(0.5)) == {}


def bad_dssn(tmp_path, dssn, row, line=2, **kw):
    p = tmp_path / "certificates.csv"
    write(p, dssn, [dssn_row(dssn, 7, 0, [20, 7]), row] if line == 3 else [row])
    with pytest.raises(ResultsFileError) as e:
        read(p, dssn, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{p} line {line}: ") or msg.startswith(f"{p}: ")
    return msg


@pytest.mark.parametrize(
    "change, why",
    [
        ({"index": -1}, "index, label, prediction and correct disagree"),
        ({"label": -1, "correct": 0}, "index, label, prediction and correct disagree"),
        ({"prediction": -1, "correct": 0}, "index, label, prediction and correct disagree"),
        ({"correct": 2}, "index, label, prediction and correct disagree"),
        ({"correct": 0}, "index, label, prediction and correct disagree"),
        ({"label": 1}, "index, label, prediction and correct disagree"),  # correct 1 but prediction 0 != label 1
        ({"radius": "nan"}, "radius and seconds must be finite"),
        ({"radius": "inf"}, "radius and seconds must be finite"),
        ({"seconds": "inf"}, "radius and seconds must be finite"),
        ({"seconds": -0.001}, "radius and seconds must be finite"),
        ({"counts": "0:20 1:-7"}, "bad counts entry '1:-7'"),
        ({"counts": "0:21 1:7"}, "counts sum to 28, not L = 27"),
        ({"counts": "0:20"}, "counts sum to 20, not L = 27"),
        ({"k": 7}, "prediction, k and radius do not follow from the counts"),
        ({"radius": 0.25}, "prediction, k and radius do not follow from the counts"),
        ({"counts": "0:7 1:20"}, "prediction, k and radius do not follow from the counts"),
        ({"index": "x"}, "invalid literal for int() with base 10: 'x'"),
        ({"k": ""}, "invalid literal for int() with base 10: ''"),
        ({"seconds": "-0.0"}, None),
        ({"seconds": 0.0}, None),
    ],
)
def test_each_inconsistency_of_a_dssn_row_is_named(tmp_path, dssn, change, why):
    row = {**dssn_row(dssn, 3, 0, [20, 7]), **change}
    if why is None:  # zero seconds (a fast example) is fine
        assert sorted(read(write(tmp_path / "certificates.csv", dssn, [row]), dssn)) == [3]
        return
    msg = bad_dssn(tmp_path, dssn, row)
    assert msg == f"{tmp_path / 'certificates.csv'} line 2: malformed certificate row ({why})"


def test_the_sum_of_counts_is_checked_with_votes_spread_over_many_classes(tmp_path, dssn):
    row = dssn_row(dssn, 0, 9, [0] * 9 + [27])
    p = write(tmp_path / "certificates.csv", dssn, [row])
    assert sorted(read(p, dssn)) == [0]  # class 9 without num_classes: counts may name any class
    with pytest.raises(ResultsFileError, match=r"line 2: malformed certificate row \(class outside \[0, 5\)\)"):
        read(p, dssn, num_classes=5)
    row = dssn_row(dssn, 0, 2, [27, 0, 0])
    p = write(tmp_path / "certificates.csv", dssn, [row])
    with pytest.raises(ResultsFileError, match=r"class outside \[0, 2\)"):
        read(p, dssn, num_classes=2)  # the label is outside, the prediction (0) inside
    row = dssn_row(dssn, 0, 0, [0, 0, 27])
    p = write(tmp_path / "certificates.csv", dssn, [row])
    with pytest.raises(ResultsFileError, match=r"class outside \[0, 2\)"):
        read(p, dssn, num_classes=2)  # the prediction is outside
    p = write(tmp_path / "certificates.csv", dssn, [dssn_row(dssn, 0, 0, [20, 0, 7])])
    with pytest.raises(ResultsFileError, match=r"bad counts entry '2:7'"):
        read(p, dssn, num_classes=2)  # a vote for a class the data set does not have


def test_a_row_with_too_many_or_too_few_fields(tmp_path, dssn):
    p = tmp_path / "certificates.csv"
    good = dssn_row(dssn, 0, 0, [20, 7])
    line = ",".join(str(good[c]) for c in columns_for(dssn))
    p.write_text(",".join(columns_for(dssn)) + "\n" + line + ",extra\n")
    with pytest.raises(ResultsFileError, match=r"line 2: malformed certificate row \(wrong number of fields\)"):
        read(p, dssn)
    p.write_text(",".join(columns_for(dssn)) + "\n" + line.rsplit(",", 1)[0] + "\n")
    with pytest.raises(ResultsFileError, match=r"line 2: malformed certificate row \(wrong number of fields\)"):
        read(p, dssn)


def test_the_line_of_the_bad_row_is_named(tmp_path, dssn):
    row = {**dssn_row(dssn, 3, 0, [20, 7]), "k": 9}
    assert "line 3: malformed" in bad_dssn(tmp_path, dssn, row, line=3)


def test_rows_of_other_examples_and_second_rows_are_refused(tmp_path, dssn):
    p = write(tmp_path / "certificates.csv", dssn, [dssn_row(dssn, 0, 0, [20, 7]), dssn_row(dssn, 4, 0, [20, 7])])
    with pytest.raises(
        ResultsFileError,
        match=r"line 3: example 4 is not one this certification selects \(skip/max_examples/data set differ\); "
        r"certify into another directory$",
    ):
        read(p, dssn, allowed=[0, 1, 2])
    assert sorted(read(p, dssn, allowed=[0, 4])) == [0, 4]
    assert sorted(read(p, dssn, allowed=iter([0, 4]))) == [0, 4]  # any iterable, read once
    with pytest.raises(ResultsFileError, match=r"line 2: example 0 is not one"):
        read(p, dssn, allowed=[])
    p = write(tmp_path / "certificates.csv", dssn, [dssn_row(dssn, 2, 0, [20, 7])] * 2)
    with pytest.raises(ResultsFileError, match=r"line 3: a second row for example 2$"):
        read(p, dssn)


def test_labels_are_checked_against_the_data_set_in_index_order(tmp_path, dssn):
    rows = [dssn_row(dssn, 5, 1, [7, 20]), dssn_row(dssn, 2, 0, [20, 7])]
    p = write(tmp_path / "certificates.csv", dssn, rows)
    asked = []

    def labels(idx):
        asked.append(list(idx))
        return [{2: 0, 5: 1}[i] for i in idx]

    assert sorted(read(p, dssn, labels=labels)) == [2, 5] and asked == [[2, 5]]
    with pytest.raises(
        ResultsFileError,
        match=r": the row of example 5 has label 1 but the data set's label is 0: the file belongs to other data or "
        r"was edited; certify into another directory$",
    ):
        read(p, dssn, labels=lambda idx: [0 for _ in idx])
    with pytest.raises(ValueError):  # a labels function that answers for fewer examples is a bug, not a file fault
        read(p, dssn, labels=lambda idx: [0])
    p.write_text(",".join(columns_for(dssn)) + "\n")
    assert read(p, dssn, labels=lambda idx: pytest.fail("asked for no rows")) == {}


# ------------------------------------------------------------------------------ randomized-method rows


def test_uniform_rows_with_votes_for_class_0_and_prediction_0_are_accepted(tmp_path):
    u = Uniform(0.5)
    rows = [
        uniform_row(u, 0, 0, [N, 0, 0]),  # every vote for class 0: p_lower > 1/2
        uniform_row(u, 1, 1, [30, 20, 0]),  # prediction 0, wrong
        uniform_row(u, 2, 2, [10, 5, 35], box_extra=0.0),  # radius_box == radius is fine
        uniform_row(u, 3, 1, [0, 25, 25]),  # a tie, p_lower < 1/2: negative radius (radius_box the same)
    ]
    assert rows[3]["radius"] < 0
    p = write(tmp_path / "certificates.csv", u, rows)
    assert sorted(read(p, u, n=N, alpha=ALPHA, num_classes=3)) == [0, 1, 2, 3]


def test_a_resume_with_another_alpha_checks_p_lower_at_that_alpha(tmp_path):
    u = Uniform(0.5)
    p = write(tmp_path / "certificates.csv", u, [uniform_row(u, 0, 0, [40, 10], alpha=0.05)])
    assert sorted(read(p, u, n=N, alpha=0.05)) == [0]
    with pytest.raises(ResultsFileError, match=r"line 2: .*\(p_lower does not follow from the counts of the pred"):
        read(p, u, n=N, alpha=ALPHA)
    p = write(tmp_path / "certificates.csv", u, [uniform_row(u, 0, 0, [40, 10])])
    with pytest.raises(ResultsFileError, match=r"p_lower does not follow from the counts of the prediction"):
        read(p, u, n=N, alpha=0.05)


@pytest.mark.parametrize(
    "change, why",
    [
        ({"p_lower": 1.5, "radius": 2.0 * 0.5 * 3**0.5 * 1.0}, "p_lower and radius disagree"),
        ({"p_lower": -0.25, "radius": 2.0 * 0.5 * 3**0.5 * -0.75}, "p_lower and radius disagree"),
        ({"p_lower": "nan"}, "p_lower and radius disagree"),
        ({"radius": 0.1}, "p_lower and radius disagree"),
        ({"counts": "0:39 1:10"}, "counts sum to 49, not N = 50"),
        ({"counts": "0:40 1:11"}, "counts sum to 51, not N = 50"),
        ({"counts": "0:39 1:11"}, "p_lower does not follow from the counts of the prediction"),
        ({"counts": "0:40 1:-10"}, "bad counts entry '1:-10'"),
        ({"radius_box": -1.0}, "radius_box is below radius"),
        ({"radius_box": "nan"}, "radius_box is below radius"),
    ],
)
def test_each_inconsistency_of_a_uniform_row_is_named(tmp_path, change, why):
    u = Uniform(0.5)
    row = {**uniform_row(u, 0, 0, [40, 10]), **change}
    p = write(tmp_path / "certificates.csv", u, [row])
    with pytest.raises(ResultsFileError, match=re.escape(f"{p} line 2: malformed certificate row ({why})")):
        read(p, u, n=N, alpha=ALPHA)


def test_the_radius_check_is_relative_for_large_radii(tmp_path):
    u = NoBox(1e6)  # lam ~ 1.7e6: radius ~ 1e6, a 1e-9 relative tolerance ~ 1e-3
    row = uniform_row(u, 0, 0, [N, 0])
    row["radius"] = row["radius"] * (1 + 5e-10)
    p = write(tmp_path / "certificates.csv", u, [row])
    assert sorted(read(p, u)) == [0]
    row["radius"] = row["radius"] * (1 + 5e-9)
    write(p, u, [row])
    with pytest.raises(ResultsFileError, match="p_lower and radius disagree"):
        read(p, u)
    small = uniform_row(u := NoBox(1e-3), 0, 0, [30, 20])  # radius ~ 1e-4: the tolerance is absolute, 1e-9
    small["radius"] += 5e-10
    write(p, u, [small])
    assert sorted(read(p, u)) == [0]
    small["radius"] += 1e-9  # 1.5e-9 off: above 1e-9 * max(1, |radius|)
    write(p, u, [small])
    with pytest.raises(ResultsFileError, match="p_lower and radius disagree"):
        read(p, u)


def test_radius_box_may_equal_radius_and_be_a_hair_below(tmp_path):
    u = Uniform(0.5)
    row = uniform_row(u, 0, 0, [40, 10])
    p = tmp_path / "certificates.csv"
    cases = ((0.0, True), (-5e-13, True), (-1e-12, True), (-2e-12, False), (0.3, True), (1.0, False), (1e308, False))
    for delta, ok in cases:
        row["radius_box"] = row["radius"] + delta  # -1e-12: the edge itself, exactly
        write(p, u, [row])
        if ok:
            assert sorted(read(p, u)) == [0], delta
        else:  # bounded from both sides: above, by the most the box certificate gives for this p_lower
            with pytest.raises(ResultsFileError, match="radius_box is below radius|radius_box .* is above"):
                read(p, u)


def test_p_lower_is_checked_to_1e_12(tmp_path):
    u = NoBox(0.5)
    row = uniform_row(u, 0, 0, [40, 10])
    p = tmp_path / "certificates.csv"
    for delta, ok in ((5e-13, True), (-5e-13, True), (3e-12, False), (-3e-12, False)):
        r = {**row, "p_lower": row["p_lower"] + delta}
        r["radius"] = 2.0 * u.lam * (r["p_lower"] - 0.5)
        write(p, u, [r])
        if ok:
            assert sorted(read(p, u, n=N, alpha=ALPHA)) == [0], delta
        else:
            with pytest.raises(ResultsFileError, match="p_lower does not follow"):
                read(p, u, n=N, alpha=ALPHA)


def test_p_lower_at_its_ends_is_accepted(tmp_path):
    u = NoBox(0.5)
    p = tmp_path / "certificates.csv"
    # the selection samples chose class 0, which then got no vote of the N: p_lower = 0 exactly
    row = {**uniform_row(u, 0, 0, [0, N]), "prediction": 0, "correct": 1, "p_lower": 0.0, "radius": -u.lam}
    write(p, u, [row])
    assert sorted(read(p, u)) == [0]


# ------------------------------------------------------------------------------------------ merge_shards


def test_merge_shards_joins_ranks_and_an_earlier_merge_by_index(tmp_path, dssn):
    earlier = [dssn_row(dssn, 0, 0, [20, 7]), dssn_row(dssn, 4, 1, [20, 7])]
    write(tmp_path / "certificates.csv", dssn, earlier)
    write(tmp_path / "certificates.rank0.csv", dssn, [dssn_row(dssn, 2, 0, [27, 0]), dssn_row(dssn, 4, 0, [7, 20])])
    write(tmp_path / "certificates.rank1.csv", dssn, [])  # a rank without examples
    write(tmp_path / "certificates.rank2.csv", dssn, [dssn_row(dssn, 1, 1, [1, 26])])  # an earlier run's third rank
    (tmp_path / "certificates.rank.csv.bak").write_text("a user's file\n")
    path = merge_shards(tmp_path, 2, record(dssn))
    assert path == tmp_path / "certificates.csv"
    got = read(path, dssn)
    assert list(got) == [0, 1, 2, 4]  # sorted by index
    assert got[4]["label"] == "0"  # the shard's row replaces the earlier one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certificates.csv", "certificates.rank.csv.bak"]


def test_merge_shards_refuses_a_missing_shard_and_keeps_the_others(tmp_path, dssn):
    write(tmp_path / "certificates.rank0.csv", dssn, [dssn_row(dssn, 2, 0, [27, 0])])
    with pytest.raises(ResultsFileError, match=r"certificates\.rank1\.csv is missing: rank 1 did not finish its shard"):
        merge_shards(tmp_path, 2, record(dssn))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certificates.rank0.csv"]
    merge_shards(tmp_path, 1, record(dssn))
    assert list(read(tmp_path / "certificates.csv", dssn)) == [2]


# ------------------------------------------------------------------------------ summarize, format_table


META = {
    "q": 16,
    "dataset": "digits",
    "training": "noise",
    "seed": 3,
    "model": "lenet",
    "levels": 999,
    "n0": 10,
    "checkpoint": "/ckpt/last.ckpt",
    "ckpt_format": "lightning",
    "unknown": "not copied",
}


def test_summarize_a_dssn_run(tmp_path, dssn):
    rows = [
        dssn_row(dssn, 0, 0, [27, 0], seconds=0.25),  # k = 13: rho 0.8125
        dssn_row(dssn, 1, 1, [20, 7], seconds=0.75),  # wrong
        dssn_row(dssn, 2, 1, [4, 23], seconds=0.5),  # k = 9: rho 0.5625
        dssn_row(dssn, 3, 0, [14, 13], seconds=0.5),  # k = 0: rho 0
    ]
    assert [r["k"] for r in rows] == [13, 6, 9, 0]
    write(tmp_path / "certificates.csv", dssn, rows)
    m = summarize(tmp_path, record(dssn), dict(META, arithmetic="float32"), radii=[0.0, 0.5625, 0.6, 1.0], plot=False)
    assert m["method"] == "dssn" and m["sigma"] == 0.5 and m["lambda"] == dssn.lam and m["q"] == 16
    assert list(m)[:6] == ["method", "label", "procedure", "sigma", "lambda", "q"]
    assert (m["dataset"], m["training"], m["denoiser"], m["seed"]) == ("digits", "noise", "none", 3)
    assert m["n_examples"] == 4 and m["clean_accuracy"] == 0.75
    assert m["certified_accuracy"] == {"0": 0.75, "0.5625": 0.5, "0.6": 0.25, "1": 0.0}
    assert m["acr"] == pytest.approx((13 + 9) / 16 / 4)
    assert m["seconds_per_example"] == 0.5 and m["forward_passes_per_example"] == 27
    assert m["levels"] == 27 and m["arithmetic"] == "exact" and m["model"] == "lenet"
    assert "n0" not in m  # exact enumeration has no sample counts: a meta n0 is not copied into metrics.json
    assert m["checkpoint"] == "/ckpt/last.ckpt" and m["ckpt_format"] == "lightning" and "unknown" not in m
    assert "certified_accuracy_box" not in m and "acr_box" not in m
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert not (tmp_path / "certified_accuracy.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "certificates.csv",
        "certificates.locuslab.tsv",
        "metrics.json",
    ]


def test_the_locuslab_file_reads_as_locuslab_reads_it_with_abstentions_wrong(tmp_path, dssn):
    from helpers import locuslab_accuracy

    u = Uniform(0.5)
    rows = [
        uniform_row(u, 0, 0, [N, 0], seconds=0.5),
        uniform_row(u, 1, 0, [N // 2 + 1, N // 2 - 1], seconds=3723.25),  # abstains: correct = 1 in our CSV
        uniform_row(u, 2, 1, [40, 10]),  # wrong
    ]
    assert rows[1]["radius"] < 0 and rows[1]["correct"] == 1
    write(tmp_path / "certificates.csv", u, rows)
    radii = [0.0, 0.25, 0.5, 1.0]
    m = summarize(tmp_path, record(u), META, radii=radii, plot=False)
    # the run's identity first, each key once, as documented (a noise's describe() adds only its own extras); the
    # data's quantisation q is recorded for every noise, not only for DSSN's lattice
    assert list(m)[:6] == ["method", "label", "procedure", "sigma", "lambda", "q"] and m["q"] == META["q"]
    assert (m["method"], m["sigma"], m["lambda"]) == ("uniform", 0.5, u.lam)
    path = tmp_path / "certificates.locuslab.tsv"
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    assert [line[2] for line in lines[1:]] == ["0", "-1", "0"] and [line[4] for line in lines[1:]] == ["1", "0", "0"]
    assert [line[5] for line in lines[1:3]] == ["0:00:00.500000", "1:02:03.250000"]  # str(timedelta)
    assert locuslab_accuracy(path, radii) == m["certified_accuracy"]
    assert locuslab_accuracy(path, [-1.0]) == {"-1": 1 / 3}  # an abstention is never counted correct
    # exact certificates: radius k / q, and the same accuracies
    rows = [dssn_row(dssn, 0, 0, [27, 0]), dssn_row(dssn, 1, 1, [20, 7]), dssn_row(dssn, 2, 1, [4, 23])]
    write(tmp_path / "certificates.csv", dssn, rows)
    radii = [0.0, 0.5625, 0.6, 0.8125, 1.0]
    m = summarize(tmp_path, record(dssn), META, radii=radii, plot=False)
    assert (
        locuslab_accuracy(path, radii)
        == m["certified_accuracy"]
        == {"0": 2 / 3, "0.5625": 2 / 3, "0.6": 1 / 3, "0.8125": 1 / 3, "1": 0.0}
    )


def test_the_locuslab_file_needs_a_radius_and_a_correct_flag_per_row(tmp_path, dssn):
    rows = [dssn_row(dssn, 0, 0, [20, 7]), dssn_row(dssn, 1, 1, [20, 7])]
    for correct, rho in (([True], [0.5, 0.5]), ([True, False], [0.5])):
        with pytest.raises(ValueError):
            write_locuslab(tmp_path / "l.tsv", rows, correct, rho)
    assert list(tmp_path.iterdir()) == []


def test_summarize_decides_dssn_radii_exactly_from_k(tmp_path, dssn):
    # the k/q radius in the file is a float; metrics come from k: 0.1 + 0.2 must not drop k = 5 (0.3125)
    write(tmp_path / "certificates.csv", dssn, [{**dssn_row(dssn, 0, 0, [19, 8]), "radius": 99.0}])
    m = summarize(tmp_path, record(dssn), META, radii=[0.1 + 0.2], plot=False)
    assert m["certified_accuracy"] == {"0.3": 1.0}


def test_summarize_a_uniform_run_with_box_radii_and_a_selection(tmp_path):
    u = Uniform(0.5)
    rows = [
        uniform_row(u, 0, 0, [N, 0], box_extra=1.0, seconds=0.1),
        uniform_row(u, 1, 0, [0, N], box_extra=0.0, seconds=0.2),  # wrong
        uniform_row(u, 2, 1, [5, 45], box_extra=0.5, seconds=0.3),
        uniform_row(u, 7, 1, [5, 45], box_extra=0.5, seconds=100.0),  # not selected
    ]
    write(tmp_path / "certificates.csv", u, rows)
    meta = {"dataset": "digits", "training": "noise", "n0": 10, "n": N, "alpha": ALPHA, "denoiser": "mse", "levels": 4}
    r0, r2 = rows[0]["radius"], rows[2]["radius"]
    m = summarize(tmp_path, record(u, n0=10), meta, radii=[0.0, r2, r0, r0 + 0.75], plot=False, indices=[2, 0, 1])
    assert m["n_examples"] == 3 and m["clean_accuracy"] == pytest.approx(2 / 3)
    assert m["denoiser"] == "mse" and m["q"] is None and m["seed"] is None
    assert m["seconds_per_example"] == pytest.approx(0.2) and m["forward_passes_per_example"] == 10 + N
    assert m["n"] == N and m["alpha"] == ALPHA and m["levels"] == 4 and "arithmetic" not in m
    meta["arithmetic"] = "float64"
    assert summarize(tmp_path, record(u), meta, radii=[0.0], plot=False, indices=[0])["arithmetic"] == "float64"
    assert list(m["certified_accuracy"].values()) == pytest.approx([2 / 3, 2 / 3, 1 / 3, 0.0])
    assert list(m["certified_accuracy_box"].values()) == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1 / 3])
    assert m["acr"] == pytest.approx((r0 + r2) / 3)
    assert m["acr_box"] == pytest.approx((r0 + 1.0 + r2 + 0.5) / 3)
    with pytest.raises(ResultsFileError, match=r"2 selected examples have no certificate in .* \(e\.g\. \[3, 4\]\)"):
        summarize(tmp_path, record(u), meta, radii=[0.0], plot=False, indices=[0, 3, 4])
    with pytest.raises(
        ResultsFileError, match=r"^6 selected examples have no certificate in .* \(e\.g\. \[3, 4, 5, 6, 8\]\)$"
    ):
        summarize(tmp_path, record(u), meta, radii=[0.0], plot=False, indices=[0, 3, 4, 5, 6, 8, 9])


def test_summarize_without_certificates_is_an_error(tmp_path, dssn):
    with pytest.raises(
        ResultsFileError, match="^no certificates in " + re.escape(str(tmp_path / "certificates.csv")) + "$"
    ):
        summarize(tmp_path, record(dssn), META, radii=[0.5], plot=False)
    write(tmp_path / "certificates.csv", dssn, [])
    with pytest.raises(ResultsFileError, match="no certificates in"):
        summarize(tmp_path, record(dssn), META, radii=[0.5], plot=False)
    write(tmp_path / "certificates.csv", dssn, [dssn_row(dssn, 1, 0, [27, 0])])
    with pytest.raises(ResultsFileError, match="no certificates in"):
        summarize(tmp_path, record(dssn), META, radii=[0.5], plot=False, indices=[])


def test_summarize_draws_the_run_curve_by_default(tmp_path, dssn):
    from ssn_exp.lightning.accuracy_curve import plot_run_curve

    write(tmp_path / "certificates.csv", dssn, [dssn_row(dssn, 0, 0, [27, 0]), dssn_row(dssn, 1, 0, [19, 8])])
    m = summarize(tmp_path, record(dssn), META, radii=[0.5])
    png = tmp_path / "certified_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = ["certificates.csv", "certificates.locuslab.tsv", "certified_accuracy.png", "metrics.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    # the figure of the k's with their q (the step curve), not of floats
    plot_run_curve([True, True], np.array([13, 5]), 16, m, tmp_path / "direct.png")
    assert (tmp_path / "direct.png").read_bytes() == png.read_bytes()
    plot_run_curve([True, True], np.array([13, 5]) / 16, None, m, tmp_path / "floats.png")
    assert (tmp_path / "floats.png").read_bytes() != png.read_bytes()


def test_summarize_draws_the_box_curve_of_a_uniform_run(tmp_path):
    from ssn_exp.lightning.accuracy_curve import plot_run_curve

    u = Uniform(0.5)
    rows = [uniform_row(u, 0, 0, [N, 0], box_extra=0.5), uniform_row(u, 1, 1, [5, 45], box_extra=0.25)]
    write(tmp_path / "certificates.csv", u, rows)
    m = summarize(tmp_path, record(u), {"n0": 1, "n": N, "dataset": "digits", "training": "noise"}, radii=[0.5])
    radius = np.array([rows[0]["radius"], rows[1]["radius"]])
    box = np.array([rows[0]["radius_box"], rows[1]["radius_box"]])
    plot_run_curve([True, True], radius, None, m, tmp_path / "direct.png", extra={"box": box})
    assert (tmp_path / "direct.png").read_bytes() == (tmp_path / "certified_accuracy.png").read_bytes()
    plot_run_curve([True, True], radius, None, m, tmp_path / "nobox.png")
    assert (tmp_path / "nobox.png").read_bytes() != (tmp_path / "certified_accuracy.png").read_bytes()


def metrics(acc, box=None, **kw):
    m = {
        "method": "dssn",
        "sigma": 0.5,
        "dataset": "digits",
        "training": "noise",
        "clean_accuracy": 0.875,
        "acr": 0.4321,
        "n_examples": 8,
        "seconds_per_example": 0.5,
        "certified_accuracy": acc,
    }
    if box is not None:
        m["certified_accuracy_box"] = box
        m["acr_box"] = 0.5
    return {**m, **kw}


def test_the_console_table_stops_at_the_first_zero():
    table = format_table(metrics({"0.5": 0.75, "1": 0.125, "1.5": 0.0, "2": 0.0}))
    assert table.splitlines() == [
        "dssn sigma=0.5 on digits (noise training): clean 87.5%, ACR 0.432, n=8, 500.0 ms/example",
        "| radius | 0.5 | 1 | 1.5 |",
        "|---|---|---|---|",
        "| certified accuracy (%) | 75.0 | 12.5 | 0.0 |",
    ]


def test_the_console_table_without_a_zero_shows_every_radius_and_the_box_row_decides_the_cut():
    table = format_table(metrics({"0.5": 0.5, "1": 0.25}))
    assert table.splitlines()[1:] == [
        "| radius | 0.5 | 1 |",
        "|---|---|---|",
        "| certified accuracy (%) | 50.0 | 25.0 |",
    ]
    table = format_table(metrics({"0": 0.0, "0.5": 0.0, "1": 0.0}, box={"0": 0.5, "0.5": 0.25, "1": 0.0}))
    lines = table.splitlines()
    assert lines[0].endswith("ACR 0.432 (box 0.500), n=8, 500.0 ms/example")
    assert lines[1:] == [
        "| radius | 0 | 0.5 | 1 |",
        "|---|---|---|---|",
        "| certified accuracy (%) | 0.0 | 0.0 | 0.0 |",
        "| box (%) | 50.0 | 25.0 | 0.0 |",
    ]
    assert format_table(metrics({"0": 0.0})).splitlines()[1] == "| radius | 0 |"


def test_model_fingerprint_is_stable_across_versions():
    # metrics.json keeps it and a resume compares it: the same weights must give the same 16 hex digits forever
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
        m.bias.copy_(torch.tensor([0.25, 3.0]))
    m.register_buffer("count", torch.tensor([7], dtype=torch.int64))
    m.register_buffer("empty", torch.zeros(0, 3))
    assert model_fingerprint(m) == "680e9a3517af1513"


def test_without_num_classes_votes_may_name_classes_up_to_4096_beyond_the_row(tmp_path, dssn):
    # a row names its classes; its votes may go to up to 4096 classes more (an unchecked resume of a wide model)
    p = tmp_path / "certificates.csv"
    row = dssn_row(dssn, 0, 0, [27, 0])  # prediction and label 0: classes below max(0, 0, 1) + 1 + 4096 = 4098
    write(p, dssn, [{**row, "counts": "0:27 4097:0"}])
    assert sorted(read(p, dssn)) == [0]
    write(p, dssn, [{**row, "counts": "0:27 4098:0"}])
    with pytest.raises(ResultsFileError, match=r"bad counts entry '4098:0'"):
        read(p, dssn)
    row = dssn_row(dssn, 0, 2, [0, 0, 27])  # classes below 2 + 1 + 4096
    write(p, dssn, [{**row, "counts": "2:27 4098:0"}])
    assert sorted(read(p, dssn)) == [0]
    write(p, dssn, [{**row, "counts": "2:27 4099:0"}])
    with pytest.raises(ResultsFileError, match=r"bad counts entry '4099:0'"):
        read(p, dssn)


def test_the_class_allowance_counts_from_the_larger_of_prediction_and_label(tmp_path, dssn):
    p = tmp_path / "certificates.csv"
    wrong = dssn_row(dssn, 0, 3000, [27, 0])  # label 3000, prediction 0: classes below 3000 + 1 + 4096
    write(p, dssn, [{**wrong, "counts": "0:27 7000:0"}])
    assert sorted(read(p, dssn)) == [0]
    wrong = dssn_row(dssn, 0, 0, [0] * 5000 + [27])  # prediction 5000, label 0: classes below 5000 + 1 + 4096
    write(p, dssn, [{**wrong, "counts": "5000:27 9000:0"}])
    assert sorted(read(p, dssn)) == [0]


def test_metrics_name_the_noise_and_procedure_and_count_a_zero_radius_as_certified(tmp_path, dssn):
    """A zero radius is a certificate, not an abstention (radius < 0): it counts in neither abstain_rate nor as
    predict = -1 in the locuslab file; metrics name the noise's label and the procedure."""
    u = Uniform(0.5)
    rows = [uniform_row(u, 0, 0, [N, 0]), uniform_row(u, 1, 0, [N // 2 + 1, N // 2 - 1]), uniform_row(u, 2, 0, [N, 0])]
    rows[2]["radius"] = 0.0  # (summarize reads the radius column as written)
    assert rows[1]["radius"] < 0
    write(tmp_path / "certificates.csv", u, rows)
    m = summarize(tmp_path, record(u), META, radii=[0.0], plot=False)
    assert (m["method"], m["label"], m["procedure"]) == ("uniform", u.label, "fixed")
    assert m["abstain_rate"] == pytest.approx(1 / 3) and m["certified_accuracy"] == {"0": 2 / 3}
    lines = [line.split("\t") for line in (tmp_path / "certificates.locuslab.tsv").read_text().splitlines()[1:]]
    assert [(line[2], line[4]) for line in lines] == [("0", "1"), ("-1", "0"), ("0", "1")]
    write(tmp_path / "certificates.csv", dssn, [dssn_row(dssn, 0, 0, [14, 13])])  # k = 0
    m = summarize(tmp_path, record(dssn), META, radii=[0.0], plot=False)
    assert (m["label"], m["procedure"], m["abstain_rate"]) == (dssn.label, "exact", 0.0)


def test_data_dependent_forward_passes_are_the_samples_mean_median_and_90th_percentile(tmp_path):
    from ssn_exp.certify.procedures_sequential import Sequential
    from ssn_exp.lightning.results import _forward_passes

    u = Uniform(0.5)
    rec = CertificateRecord(u, Sequential(n=1000))
    samples = [96, 160, 288, 544, 96, 96, 1056, 2080, 96, 160, 4128]
    rows = [{"samples": str(s)} for s in samples]
    got = _forward_passes(rec, rows)
    assert got == {"forward_passes_per_example": float(np.mean(samples)),
                   "forward_passes_median": float(np.median(samples)),
                   "forward_passes_p90": float(np.percentile(samples, 90))}  # fmt: skip
    assert got["forward_passes_p90"] != float(np.percentile(samples, 91))
    fixed = _forward_passes(record(u, n0=10), rows)
    assert fixed == {
        "forward_passes_per_example": 10 + N,
        "forward_passes_median": 10 + N,
        "forward_passes_p90": 10 + N,
    }

    class Unknown(Sequential):
        name = "unknown"

        def columns(self, noise):
            return ["p_lower", *noise.extra_columns]

    with pytest.raises(
        ValueError, match=r"^Unknown\.forward_passes gives no count and its rows have no samples column$"
    ):
        _forward_passes(CertificateRecord(u, Unknown(n=1000)), rows)
