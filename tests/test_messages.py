"""Messages that say what was wrong (issue 23 section 7): a string where a list is expected, an unset ``ckpt``, an
unknown sweep, a run or sweep folder that is a file, a bare ``KeyError``/``TypeError``, a byte-order mark."""

from __future__ import annotations

import contextlib
import errno
import io

import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from helpers import one_error_line, run_cli
from ssn_exp.certify.procedures import ProcedureError, check_radii
from ssn_exp.certify.procedures_sequential import Sequential
from ssn_exp.cli.config import ConfigError, build, check_certify_config
from ssn_exp.cli.messages import one_line
from ssn_exp.cli.run_dir import _make_dirs
from ssn_exp.exceptions import OptionError, describe, instantiation_message


@pytest.mark.parametrize("value", ["0.5", "[0.5]", 0.5, 1, {"a": 0.5}, b"0.5"])
def test_a_value_where_a_list_of_radii_is_expected_is_refused_as_given(value):
    for make, key in (
        (lambda: Sequential(radii=value), "procedure.radii"),
        (lambda: check_radii(value, "certify.radii"), "certify.radii"),
    ):
        with pytest.raises(OptionError) as info:
            make()
        assert str(info.value) == f"{key} must be a list, e.g. {key}=[0.5]; got {value!r}"
    assert Sequential(radii=OmegaConf.create([0.5, 0.25])).radii == [0.25, 0.5]
    with pytest.raises(ProcedureError, match=r"finite numbers, got \['0', '\.', '5'\]"):  # a list of strings
        check_radii(list("0.5"), "procedure.radii")


def test_certify_radii_given_as_a_string_is_refused_as_given():
    from hydra import compose, initialize_config_dir

    from ssn_exp.cli.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["certify.radii='0.5'"])
    with pytest.raises(
        ConfigError, match=r"^certify\.radii must be a list, e\.g\. certify\.radii=\[0\.5\]; got '0\.5'$"
    ):
        check_certify_config(cfg)


def test_a_data_shape_given_as_a_string_is_refused_as_given():
    from ssn_exp.lightning.data import DigitsData

    with pytest.raises(OptionError, match=r"^data\.shape must be a list, e\.g\. data\.shape=\[3,32,32\]; got '188'$"):
        DigitsData(name="digits", q=16, num_classes=10, shape="188", mean=[0.5], std=[0.25])


@pytest.mark.parametrize(
    "exc, text",
    [
        (KeyError("x"), "no entry 'x' (KeyError)"),
        (KeyError(3), "no entry 3 (KeyError)"),
        (KeyError("no certified accuracy at radius 1.0"), "no certified accuracy at radius 1.0"),
        (TypeError(), "TypeError (without a message)"),
        (TypeError("'NoneType' object is not subscriptable"), "TypeError: 'NoneType' object is not subscriptable"),
        (ValueError("bad value\nsecond line"), "bad value"),
    ],
)
def test_an_exception_becomes_a_sentence_that_names_what_was_wrong(exc, text):
    assert describe(exc) == text
    if isinstance(exc, KeyError) or not str(exc):
        assert one_line(exc) == text


def missing_key(key):
    """A ``_target_`` that fails as a lookup does (``{}[key]``)."""
    return {}[key]


def test_a_target_that_raises_a_bare_key_error_is_named():
    node = OmegaConf.create({"_target_": f"{__name__}.missing_key", "_args_": ["x"]})
    with pytest.raises(ConfigError, match=r"cannot build model from .*: no entry 'x' \(KeyError\)$"):
        build(node, "model")
    try:
        missing_key("x")
    except KeyError as cause:
        wrapped = InstantiationException("Error in call to target 'missing_key':\nKeyError('x')")
        wrapped.__cause__ = cause
    assert instantiation_message(wrapped) == "no entry 'x' (KeyError)"


def test_a_run_or_sweep_folder_that_is_a_file_is_named_as_such(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    with pytest.raises(NotADirectoryError) as info:
        _make_dirs(afile)
    assert info.value.errno == errno.ENOTDIR and info.value.filename == str(afile)
    message = f"cannot write or read {afile}: a file is there, not a folder; give a run or sweep folder"
    assert one_line(info.value) == message
    with pytest.raises(NotADirectoryError, match="Not a directory"):  # a file on the way: as mkdir says it
        _make_dirs(afile / "below")
    assert afile.read_text() == "keep"


def test_a_run_or_a_sweep_into_a_file_says_so_and_that_no_job_ran(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for args in (
        ["--multirun", "debug=fast", "sigma=0.5,1.0", f"hydra.sweep.dir={afile}"],
        ["debug=fast", f"hydra.run.dir={afile}"],
    ):
        line = one_error_line(run_cli("ssn_exp", *args))
        assert "a file is there, not a folder" in line and "other jobs ran" not in line and "File exists" not in line
    assert afile.read_text() == "keep"


def test_certify_without_ckpt_asks_for_ckpt():
    line = one_error_line(run_cli("ssn_exp.certify"))
    assert line == "error: ckpt is not set: give ckpt=... on the command line"


def test_an_unknown_sweep_is_exit_status_2_in_one_line():
    from ssn_exp.cli.sweep import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["nosuch"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: unknown sweep 'nosuch'; choose one of ")


def test_a_missing_value_is_named_where_omegaconf_names_it_and_said_plainly_where_it_does_not():
    """``???`` as a key's value names the key; ``???`` inside a list (OmegaConf gives no key, only an index) is
    still a sentence about a missing value, never a made-up key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    cfg = OmegaConf.create({"procedure": {"n": "???"}, "radii": ["???"]})
    with pytest.raises(MissingMandatoryValue) as info:
        cfg.procedure.n  # noqa: B018 - reading it raises
    assert one_line(info.value) == "procedure.n is not set: give procedure.n=... on the command line"
    with pytest.raises(MissingMandatoryValue) as info:
        list(cfg.radii)
    assert one_line(info.value) == (
        "a config value is not set (Missing value at index 0): ??? must be given on the command line"
    )
