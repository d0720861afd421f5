"""Bad input gets one line starting with ``error:`` and a non-zero exit, before any work where it can be
checked up front; faults lose nothing; failed runs leave no directory that looks like a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, one_error_line, read_metrics, run_cli, run_cli_many

FAST = ["debug=fast", "trainer.enable_progress_bar=false"]


BAD_SETTINGS = [
    (["sigma=1e9"], ["sigma=1e+09 needs L =", "choose a smaller sigma"]),
    (["sigma=abc"], ["sigma must be a positive finite number, got 'abc'"]),
    (["seed=-1"], ["seed must be an integer in [0, 2**32), got -1"]),
    (["procedure.n0=-5"], ["procedure.n0 must be an integer >= 1, got -5"]),
    (["procedure.alpha=1.5"], ["procedure.alpha must lie in (0, 1)"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs must be an integer >= 1, got 0"]),
    (["+trainer.max_epochs=0"], ["Could not append to config", "trainer.max_epochs"]),
    (["tag=a/b"], ["tag='a/b' may only contain"]),
    (["data.q=255"], ["data.q=255 does not match DigitsData"]),
    (["model=nope"], ["Could not find 'model/nope'", "digits_cnn, resnet50, wrn40_2"]),
]


def test_bad_settings_are_one_line_and_leave_no_run_directory(tmp_path):
    runs = [tmp_path / "runs" / str(i) / "run" for i in range(len(BAD_SETTINGS))]
    calls = [("ssn_exp", [*FAST, *ov, f"hydra.run.dir={run}"]) for (ov, _), run in zip(BAD_SETTINGS, runs, strict=True)]
    for (overrides, words), run, p in zip(BAD_SETTINGS, runs, run_cli_many(calls), strict=True):
        line = one_error_line(p)
        for word in words:
            assert word in line, (overrides, line)
        assert not run.exists(), overrides


def test_a_refused_setting_does_not_block_the_corrected_command(tmp_path):
    run = tmp_path / "run"
    assert "procedure.n must be an integer >= 1, got 0" in one_error_line(
        run_cli("ssn_exp", *FAST, "method=uniform", "procedure.n=0", f"hydra.run.dir={run}")
    )
    p = run_cli("ssn_exp", *FAST, "method=uniform", "procedure.n=64", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert read_metrics(run)["n"] == 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    p = run_cli("ssn_exp", *FAST, "certify.enabled=false", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    return run / "checkpoints" / "last.ckpt"


def test_bad_checkpoints_are_one_line(trained, tmp_path):
    good = torch.load(trained, weights_only=True)
    files = {}
    files["truncated"] = trained.read_bytes()[:5000]
    files["random"] = os.urandom(3000)
    files["text"] = b"this is not a checkpoint\n"
    (tmp_path / "ckpt").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "ckpt" / "plain.pt")
    files["plain"] = (tmp_path / "ckpt" / "plain.pt").read_bytes()
    import argparse

    torch.save({**good, "extra": argparse.Namespace(x=1)}, tmp_path / "ckpt" / "pickled.pt")
    files["pickled"] = (tmp_path / "ckpt" / "pickled.pt").read_bytes()
    unknown = {**good, "hyper_parameters": {**good["hyper_parameters"], "model": {"_target_": "nope.Net"}}}
    torch.save(unknown, tmp_path / "ckpt" / "unknown.pt")
    files["unknown"] = (tmp_path / "ckpt" / "unknown.pt").read_bytes()
    sd = dict(good["state_dict"])
    key = next(k for k in sd if k.endswith("weight") and sd[k].dim() == 2)
    sd[key] = torch.zeros(3, 3)
    torch.save({**good, "state_dict": sd}, tmp_path / "ckpt" / "shapes.pt")
    files["shapes"] = (tmp_path / "ckpt" / "shapes.pt").read_bytes()
    expected = {
        "truncated": "cannot read checkpoint",
        "random": "cannot read checkpoint",
        "text": "cannot read checkpoint",
        "plain": "neither an ssn_exp checkpoint nor",
        "pickled": "holds a pickled Python object (argparse.Namespace), which ssn_exp refuses to load",
        "unknown": "cannot rebuild the model of",
        "shapes": f"do not fit its model: size mismatch for {key}",
    }
    calls = []
    for name, data in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(data)
        calls.append(
            ("ssn_exp.certify", [f"ckpt={tmp_path / f'{name}.ckpt'}", f"hydra.run.dir={tmp_path / 'out' / name}"])
        )
    calls.append(("ssn_exp.certify", [f"hydra.run.dir={tmp_path / 'out' / 'none'}"]))
    expected["none"] = "give the checkpoint to certify: python -m ssn_exp.certify ckpt=PATH"
    for name, p in zip([*files, "none"], run_cli_many(calls), strict=True):
        line = one_error_line(p)
        assert expected[name] in line, (name, line)
        assert not (tmp_path / "out" / name).exists()


def test_a_malicious_pickle_in_a_data_folder_does_not_run(tmp_path):
    import pickle

    from helpers import write_tiny_cifar10

    folder = write_tiny_cifar10(tmp_path / "c10")
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": Payload(), "labels": [0]}, fh)
    line = one_error_line(
        run_cli(
            "ssn_exp",
            *FAST,
            "data=cifar10",
            f"data.root={tmp_path / 'c10'}",
            "data.num_workers=0",
            "model=digits_cnn",
            f"hydra.run.dir={tmp_path / 'run'}",
        )  # fmt: skip
    )
    assert "refusing to load" in line and "test_batch" in line and "system" in line
    assert not marker.exists()


def test_an_image_folder_with_other_classes_than_configured_is_one_line(tmp_path):
    from helpers import write_tiny_imagefolder

    write_tiny_imagefolder(tmp_path / "train")
    write_tiny_imagefolder(tmp_path / "val", seed=1)
    line = one_error_line(
        run_cli(
            "ssn_exp",
            *FAST,
            "data=imagenet",
            f"data.train_root={tmp_path / 'train'}",
            "data.num_classes=5",
            f"data.val_root={tmp_path / 'val'}",
            "data.image_size=16",
            "data.resize=18",
            "data.num_workers=0",
            "model=digits_cnn",
            f"hydra.run.dir={tmp_path / 'run'}",
        )  # fmt: skip
    )
    assert "has 3 class folders but data.num_classes=5" in line


def test_an_unwritable_output_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_error_line(run_cli("ssn_exp", *FAST, f"hydra.run.dir={blocker / 'run'}"))
    assert str(blocker) in line and "Not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_output_directory_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = one_error_line(run_cli("ssn_exp", *FAST, f"hydra.run.dir={ro / 'run'}"))
        assert "Permission denied" in line
    finally:
        ro.chmod(0o700)


@pytest.mark.slow
def test_a_nan_producing_model_gets_no_certificate(tmp_path):
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    # finite on the blank start-up check (normalised 0.5 > 0.5), NaN where a normalised pixel is <= 0.5
    (conf / "nan_net.yaml").write_text(
        "_target_: torch.nn.Sequential\n_args_:\n  - _target_: torch.nn.Flatten\n"
        "  - _target_: torch.nn.Threshold\n    threshold: 0.5\n    value: .nan\n"
        "  - _target_: torch.nn.Linear\n    in_features: 64\n    out_features: 10\n"
    )
    run = tmp_path / "run"
    p = run_cli(
        "ssn_exp", *FAST, "model=nan_net", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={run}"
    )
    line = one_error_line(p)
    assert "NaN or infinite logits" in line and "test example(s) [0, 1, 2, 3, 4, 5, 6, 7]" in line
    assert not (run / "metrics.json").exists()
    assert (run / "certificates.csv").read_text().count("\n") == 1  # the header only: nothing certified


@pytest.mark.slow
def test_a_second_process_in_the_same_run_directory_is_refused(tmp_path):
    from ssn_exp.cli.run_dir import RunLock

    run = tmp_path / "run"
    args = ["training.epochs=200", "data.batch_size=8", "certify.enabled=false", f"hydra.run.dir={run}"]
    first = subprocess.Popen([sys.executable, "-m", "ssn_exp", *args, "trainer.enable_progress_bar=false"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        t0 = time.monotonic()
        while not (run / "checkpoints").is_dir():  # training has started, under the lock
            assert first.poll() is None and time.monotonic() - t0 < 60
            time.sleep(0.05)
        line = one_error_line(run_cli("ssn_exp", *args))
        assert f"another ssn_exp process (pid {first.pid}) is running in {run}" in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    with RunLock(run):  # a killed process holds no lock: the same command can resume
        pass


@pytest.mark.slow
def test_a_dying_ddp_rank_is_one_line_naming_the_rank(tmp_path):
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "bomb.yaml").write_text("_target_: rank_bomb.FailOnRank\nrank: 1\nhow: die\n")
    p = run_cli(
        "ssn_exp", *FAST, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model=bomb",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPATH": str(ROOT / "tests" / "plugins")},
    )  # fmt: skip
    # (the other rank, stopped with SIGTERM while gloo reports the dead peer, may print its teardown: a race
    # inside torch/Lightning; the answer to the user is the last line, and it is the only error line)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == "error: DDP rank 1 died (signal SIGKILL); the other ranks were stopped"
    assert sum(line.startswith("error:") for line in p.stderr.splitlines()) == 1


def test_a_rank_that_raises_is_named_in_one_line():
    import torch.multiprocessing  # noqa: F401 - torch's own exception types, as a DDP launcher raises them
    from torch.multiprocessing.spawn import ProcessRaisedException

    from ssn_exp.cli.messages import is_user_error, one_line

    msg = "\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n  ...\n"
    exc = ProcessRaisedException(msg + "RuntimeError: boom on rank 1\n", error_index=1, error_pid=123)
    assert is_user_error(exc)
    assert one_line(exc) == "DDP rank 1 failed: RuntimeError: boom on rank 1"


def test_a_sweep_whose_every_job_failed_says_so(tmp_path):
    p = run_cli("ssn_exp.sweep", "smoke", *FAST, "method=dssn", "sigma=-1", "--out", str(tmp_path / "sw"))
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: all 1 jobs of sweep smoke failed"), p.stderr[-2000:]
    (job,) = [d for d in (tmp_path / "sw").iterdir() if (d / ".hydra").is_dir()]
    assert "sigma must be a positive finite number" in (job / "error.txt").read_text()


@pytest.mark.slow
def _ctrl_c_works():
    """In the child, before exec: Ctrl-C's default action, as in a terminal. A test run started in the background
    (``make test &``, some CI runners) has SIGINT ignored, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_a_sweep_is_one_line_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "sw"
    args = [sys.executable, "-m", "ssn_exp.sweep", "smoke", *FAST, "method=dssn", "--out", str(out), "--no-report"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env, preexec_fn=_ctrl_c_works)  # fmt: skip
    t0 = time.monotonic()
    while not list(out.glob("*/metrics.json")):
        assert proc.poll() is None and time.monotonic() - t0 < 120
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "interrupted after" in lines[0] and "run the same command again to resume" in lines[0]
    done = len(list(out.glob("*/metrics.json")))
    assert 1 <= done < 3
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list(out.glob("*/metrics.json"))) == 3
