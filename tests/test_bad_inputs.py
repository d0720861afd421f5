"""Issue 16 section 4: every bad input (config values, data roots, user models, run-folder files, report inputs) gets
one ``error:`` line and a non-zero exit; no certificate is written and nothing is left that blocks the corrected
command. The CLI cases run concurrently (one process each); the rest is checked in-process."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import one_error_line, run_cli_many, write_tiny_imagefolder
from ssn_exp.cli.config import ConfigError, check_certify_config
from ssn_exp.cli.messages import is_user_error, one_line
from ssn_exp.exceptions import UserError

FAST = ["debug=fast", "trainer.enable_progress_bar=false"]


def _no_results(run) -> bool:
    """Nothing that looks like a run (or blocks the same command again) was left in the run directory."""
    return not run.exists() or not any(
        (run / name).exists() for name in ("certificates.csv", "metrics.json", "certify_settings.json", "checkpoints")
    )


@pytest.mark.slow
def test_bad_inputs_on_the_command_line_are_one_line_and_leave_nothing(tmp_path):
    """Each case in its own process, all at once: NaN radii, a noise batch no memory holds, a corrupt image in an
    ImageFolder data root, a user model that changes its input in place, a noise of another sigma than the run's."""
    train, val = write_tiny_imagefolder(tmp_path / "train"), write_tiny_imagefolder(tmp_path / "val", seed=1)
    (val / "n00000001" / "img_2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "inplace.yaml").write_text(
        "_target_: torch.nn.Sequential\n_args_:\n  - _target_: torch.nn.ReLU\n    inplace: true\n"
        "  - _target_: torch.nn.Flatten\n  - _target_: torch.nn.Linear\n    in_features: 64\n    out_features: 10\n"
    )
    folder = ["data=imagenet", f"data.train_root={train}", f"data.val_root={val}", "data.num_classes=3"]
    folder += ["data.image_size=16", "data.resize=18", "data.num_workers=0", "data.test_every=1", "model=digits_cnn"]
    cases = {
        "radii": (["certify.radii=[nan,0.5]"], ["certify.radii must be a list of non-negative finite numbers"]),
        "sigma": (
            ["method.sigma=2.0", "sigma=0.5"],
            ["error: method.sigma=2.0 conflicts with sigma=0.5; set sigma=2.0"],
        ),
        "noise_batch": (["certify.noise_batch=2000000000"], ["certify.noise_batch=2000000000 needs at least", "GiB"]),
        "image": (folder, ["cannot read image", "img_2.png", "remove or replace the file"]),
        "inplace": (
            ["model=inplace", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
            ["the model from", "inplace.yaml", "modifies its input in place"],
        ),
    }
    runs = {name: tmp_path / "runs" / name for name in cases}
    calls = [("ssn_exp", [*FAST, *ov, f"hydra.run.dir={runs[name]}"]) for name, (ov, _) in cases.items()]
    for (name, (_, words)), p in zip(cases.items(), run_cli_many(calls, workers=2), strict=True):
        line = one_error_line(p)
        for word in words:
            assert word in line, (name, line)
        assert _no_results(runs[name]) or name == "image", name
    # the corrupt image is found by the first validation pass: no certificate exists
    assert not (runs["image"] / "certificates.csv").exists() and not (runs["image"] / "metrics.json").exists()


def _cfg(*overrides, **certify):
    from hydra import compose, initialize_config_dir

    from ssn_exp.cli.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, *(f"certify.{k}={v}" for k, v in certify.items())])
    return cfg


def _procedure_cfg(procedure, key, value):
    return _cfg("method=uniform", f"procedure={procedure}", f"procedure.{key}={value}")


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("radii", "[nan,0.5]", "certify.radii must be a list of non-negative finite numbers, got [nan, 0.5]"),
        ("radii", "[inf]", "certify.radii must be a list of non-negative finite numbers"),
        ("radii", "3", "certify.radii must be a list"),
        ("noise_batch", "9223372036854775808", "certify.noise_batch must be an integer in [1, 2147483647]"),
        ("compile", "maybe", "certify.compile must be true or false, got 'maybe'"),
        ("skip", "'${nope}'", "certify.skip: Interpolation key 'nope' not found"),
    ],
)
def test_certify_settings_refuse_in_one_line(key, value, words):
    with pytest.raises(ConfigError) as info:
        check_certify_config(_cfg(**{key: value}))
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("procedure", ["auto", "fixed", "sequential"])
@pytest.mark.parametrize(
    "key,value,words",
    [
        ("n", "100000000000000000000", "procedure.n must be an integer in [1, 9007199254740992]"),
        ("n0", "0", "procedure.n0 must be an integer >= 1, got 0"),
        ("alpha", "nan", "procedure.alpha must lie in (0, 1), got nan"),
        ("n", "'${nope}'", "Interpolation key 'nope' not found"),
    ],
)
def test_procedure_settings_refuse_in_one_line_naming_the_procedure_key(procedure, key, value, words):
    from ssn_exp.cli.common import build_procedure

    if procedure == "sequential" and value.startswith("1000"):  # its schedule's own bound comes first
        words = "procedure.n: a cap of 100000000000000000000 samples takes"
    with pytest.raises(ConfigError) as info:  # checked once, by the procedure, whatever the noise
        build_procedure(_procedure_cfg(procedure, key, value))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_fixed_alpha_too_small_for_the_two_sided_bound_is_refused():  # alpha / 2 underflows
    from ssn_exp.cli.common import build_procedure

    with pytest.raises(ConfigError, match=r"procedure\.alpha=5e-324 is too small"):
        build_procedure(_procedure_cfg("fixed", "alpha", "5e-324"))


def test_a_noise_batch_larger_than_memory_is_refused_before_anything_is_written(tmp_path):
    from ssn_exp.lightning.certification import open_certifier
    from ssn_exp.lightning.memory import MemoryLimitError, host_memory, noise_batch_bytes
    from ssn_exp.noises import Uniform

    shape = (3, 224, 224)
    too_many = host_memory(available=False) // noise_batch_bytes(1, shape) + 1
    with pytest.raises(MemoryLimitError, match=f"certify.noise_batch={too_many} needs at least"):
        check_certify_config(_cfg(noise_batch=too_many), shape=shape)
    check_certify_config(_cfg(noise_batch=too_many - 1), shape=shape)  # one less fits in the host's memory
    data = torch.utils.data.TensorDataset(torch.rand(4, *shape), torch.zeros(4, dtype=torch.long))
    out = tmp_path / "cert"
    kw = dict(num_classes=2, n0=2, n=2**40, noise_batch=2**31 - 1, device="cpu")
    with pytest.raises(MemoryLimitError) as info:  # n and noise_batch both huge: one batch is noise_batch inputs
        open_certifier(nn.Flatten(), Uniform(0.5), data, out, **kw)
    assert "certify.noise_batch=2147483647" in str(info.value) and "set certify.noise_batch=" in str(info.value)
    assert list(out.iterdir()) == []  # no settings, no certificates: the corrected command just runs
    # a small n bounds the batch (batch_size x max(n0, n) inputs): the same noise_batch is then fine
    open_certifier(nn.Flatten(), Uniform(0.5), data, out, **{**kw, "n": 2})


class _Allocates(nn.Module):
    """A model whose forward asks for more memory than any host has (a real allocation failure)."""

    def forward(self, x):
        torch.empty(2**60, dtype=torch.uint8)
        return x.flatten(1)[:, :2]


def test_an_allocation_failure_during_certification_names_noise_batch(tmp_path):
    from ssn_exp.lightning.certification import open_certifier
    from ssn_exp.noises import Uniform

    data = torch.utils.data.TensorDataset(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    cert = open_certifier(_Allocates(), Uniform(0.5), data, tmp_path, num_classes=2, n0=2, n=4, noise_batch=8)
    with pytest.raises(UserError) as info:
        cert.run("cpu", progress=False)
    assert "out of memory certifying test example(s) [0]" in one_line(info.value)
    assert "certify.noise_batch=8" in str(info.value)
    assert (tmp_path / "certificates.csv").read_text().count("\n") == 1  # the header only: no certificate


@pytest.mark.parametrize("content", ["[1]", '"settings"', "3", "null"])
def test_certify_settings_json_that_is_not_an_object_is_one_line(tmp_path, content):
    from ssn_exp.lightning.certification import open_certifier
    from ssn_exp.lightning.results import ResultsFileError
    from ssn_exp.noises import Uniform

    data = torch.utils.data.TensorDataset(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    kw = dict(num_classes=2, n0=2, n=4, noise_batch=8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    open_certifier(net, Uniform(0.5), data, tmp_path, **kw).run("cpu", progress=False)
    (tmp_path / "certify_settings.json").write_text(content)
    certificates = (tmp_path / "certificates.csv").read_bytes()
    assert certificates.count(b"\n") == 3
    with pytest.raises(ResultsFileError) as info:
        open_certifier(net, Uniform(0.5), data, tmp_path, **kw)
    assert "certify_settings.json holds a JSON" in str(info.value) and "another directory" in str(info.value)
    assert "\n" not in one_line(info.value)
    assert (tmp_path / "certificates.csv").read_bytes() == certificates  # nothing of the user's is lost


# ---------------------------------------------------------------------------------------------------------------
# user models (check_network: run at the start of every training run)


class _IntLogits(nn.Module):
    def forward(self, x):
        return (x.flatten(1)[:, :10] * 100).long()


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        x.mul_(2.0)  # changes the caller's tensor
        return self.lin(x.flatten(1))


class _BatchDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin((x - x.mean(0, keepdim=True)).flatten(1))  # batch statistics in eval mode


class _Random(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)) + torch.rand(x.shape[0], 10)


class _Fine(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.bn = nn.BatchNorm1d(10)  # eval mode: running statistics, the same alone and in a batch

    def forward(self, x):
        return self.bn(self.lin(x.flatten(1)))


@pytest.fixture(scope="module")
def digits():
    from ssn_exp.lightning.data import DigitsData

    return DigitsData(name="digits", q=16, num_classes=10, shape=[1, 8, 8], mean=[0.3], std=[0.4])


@pytest.mark.parametrize(
    "net,words",
    [
        (_IntLogits(), "gives int64 logits; they must be floating-point"),
        (_InPlace(), "modifies its input in place"),
        (_BatchDependent(), "gives an example a different output alone than in a batch"),
        (_Random(), "gives an example a different output alone than in a batch (or random outputs)"),
    ],
)
def test_bad_user_models_are_refused_in_one_line(digits, net, words):
    from ssn_exp.cli.common import check_network
    from ssn_exp.models import normalized

    for wrapped in (net, normalized(net, digits.mean, digits.std)):  # alone and inside the normalisation wrapper
        with pytest.raises(UserError) as info:
            check_network(wrapped, digits, "model")
        assert words in str(info.value) and "\n" not in str(info.value)
        assert is_user_error(info.value)


def test_a_good_model_passes_and_keeps_its_mode(digits):
    from ssn_exp.cli.common import check_network
    from ssn_exp.models import DigitsCNN, normalized

    for net in (_Fine(), normalized(DigitsCNN(), digits.mean, digits.std)):
        net.train()
        check_network(net, digits, "model")
        assert net.training


def test_a_denoiser_that_changes_its_input_is_refused(digits):
    from ssn_exp.cli.common import check_network

    class Den(nn.Module):
        def forward(self, x):
            return x.clamp_(0.25, 0.75)

    with pytest.raises(ConfigError, match="modifies its input in place"):
        check_network(Den(), digits, "denoiser", denoiser=True)


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder data roots


def _folder_data(root, **kw):
    from ssn_exp.lightning.data import ImageFolderData

    args = dict(name="tiny", q=255, num_classes=3, shape=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3)
    args.update(image_size=16, resize=18, test_every=1, train_root=str(root / "train"), val_root=str(root / "val"))
    return ImageFolderData(**{**args, **kw})


def test_a_corrupt_image_is_one_line_naming_it_also_from_a_loader_worker(tmp_path):
    from ssn_exp.lightning.data import DataError

    write_tiny_imagefolder(tmp_path / "train", size=20)
    write_tiny_imagefolder(tmp_path / "val", size=20, seed=1)
    bad = tmp_path / "train" / "n00000002" / "img_1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    (tmp_path / "val" / "n00000000" / "img_3.png").write_bytes(b"")  # empty
    dm = _folder_data(tmp_path, num_workers=1, batch_size=12)
    dm.setup("fit")
    with pytest.raises(DataError) as info:
        dm.certify_set()[3]
    assert f"cannot read image {tmp_path / 'val' / 'n00000000' / 'img_3.png'}" in str(info.value)
    with pytest.raises(DataError) as info:  # torch re-raises a worker's error with the worker's traceback
        for _ in torch.utils.data.DataLoader(dm.train_set, batch_size=12, num_workers=1):
            pass
    assert one_line(info.value).startswith(f"cannot read image {bad} (")
    assert "Traceback" not in str(info.value)


def test_train_and_val_with_other_class_folders_are_refused(tmp_path):
    from ssn_exp.lightning.data import DataError

    write_tiny_imagefolder(tmp_path / "train", size=20)
    write_tiny_imagefolder(tmp_path / "val", size=20, seed=1)
    (tmp_path / "val" / "n00000002").rename(tmp_path / "val" / "zebra")
    with pytest.raises(DataError, match="differ .*n00000002, zebra"):
        _folder_data(tmp_path).setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# the report's inputs


def _run(root, metrics: dict | str, csv_text: str):
    root.mkdir(parents=True)
    (root / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    (root / "certificates.csv").write_text(csv_text)
    return root


GOOD_METRICS = {"dataset": "digits", "method": "dssn", "training": "standard", "sigma": 0.5, "q": 16, "n_examples": 2}
GOOD_CSV = "index,label,prediction,correct,radius,k\n0,1,1,1,0.25,4\n1,2,3,0,0.0,0\n"


@pytest.mark.parametrize(
    "metrics,csv_text,words",
    [
        ("[1]", GOOD_CSV, "metrics.json: holds a JSON list"),
        ("{not json", GOOD_CSV, "metrics.json: not valid JSON"),
        ({**GOOD_METRICS, "sigma": "big"}, GOOD_CSV, "'sigma' must be a finite number, got 'big'"),
        ({**GOOD_METRICS, "method": ["dssn"]}, GOOD_CSV, "'method' must be a non-empty string"),
        ({**GOOD_METRICS, "q": None}, GOOD_CSV, "'q' must be an integer, got None"),
        (GOOD_METRICS, GOOD_CSV.replace("1,2,3,0,0.0,0", "1,2,3"), "line 3: 6 fields expected"),
        (GOOD_METRICS, GOOD_CSV.replace("0,1,1,1,0.25,4", "0,1,1,1,0.25,4.5"), "line 2: k must be an integer"),
        (GOOD_METRICS, GOOD_CSV.replace("1,2,3,0", "0,2,3,0"), "an example index occurs twice"),
        (GOOD_METRICS, "index,label\n0,1\n", "no column prediction, k"),
    ],
)
def test_the_report_names_an_unusable_run_and_exits_non_zero(tmp_path, capsys, metrics, csv_text, words):
    from ssn_exp.report import main

    good = _run(tmp_path / "runs" / "good", GOOD_METRICS, GOOD_CSV)
    bad = _run(tmp_path / "runs" / "bad", metrics, csv_text)
    rc = main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: partial results"), err
    missing = (tmp_path / "out" / "missing.txt").read_text()
    assert f"unreadable or ignored: {bad}: unreadable" in missing and words in missing, missing
    assert str(good) not in missing
    # only the bad run: no results at all, one line, exit 2, nothing written
    rc = main([str(bad), "--out", str(tmp_path / "out2"), "--no-plots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: no results found") and words in err[0]
    assert not (tmp_path / "out2").exists()


def test_the_report_refuses_an_out_that_is_a_file_or_a_link(tmp_path, capsys):
    from ssn_exp.report import main

    run = _run(tmp_path / "run", GOOD_METRICS, GOOD_CSV)
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for out, words in ((afile, "is a file, not a folder"), (afile / "sub", "is a file, not a folder"),
                       (tmp_path / "link", "is a symbolic link")):  # fmt: skip
        assert main([str(run), "--out", str(out), "--no-plots"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --out") and words in err[0], err
    assert afile.read_text() == "mine\n" and not (tmp_path / "elsewhere").exists()


def test_the_reports_own_argument_errors_are_one_error_line(capsys):
    from ssn_exp.report import main

    for argv in (["--radii", "x"], ["--nope"], ["--radii", "nan", "--published", "levine2021"]):
        with pytest.raises(SystemExit) as info:
            rc = main(argv)
            raise SystemExit(rc)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)


def test_the_sweeps_argument_errors_are_one_error_line(capsys):
    from ssn_exp.cli.sweep import main

    for argv in (["smoke", "--launcher", "nope"], [], ["smoke", "--nope"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)


def test_user_errors_stay_one_line_through_one_line():
    assert one_line(ConfigError("a\nb")) == "a b"
