"""Lightning and Hydra conventions: the user's callbacks and several loggers from config, a per-machine local config,
the accelerator that is there; log lines above a live progress bar."""

from __future__ import annotations

import io
import logging
import os
import textwrap

import pytest

from helpers import read_csv, run_cli
from ssn_exp.lightning.quiet import BarSafeHandler

CALLBACK = """
from pathlib import Path

import pytorch_lightning as pl


class Mark(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        Path(self.path).write_text(f"{trainer.current_epoch}\\n")
"""


@pytest.mark.slow
def test_user_callbacks_two_loggers_and_the_local_config_run_together(tmp_path):
    code, conf = tmp_path / "code", tmp_path / "conf"
    (code).mkdir()
    (conf / "local").mkdir(parents=True)
    (code / "mycb.py").write_text(textwrap.dedent(CALLBACK))
    # a local/default.yaml on the search path is the optional local config: its settings apply to every run
    (conf / "local" / "default.yaml").write_text("# @package _global_\ntag: here\n")
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": str(code) + (os.pathsep + path if path else "")}
    p = run_cli(
        "ssn_exp",
        "debug=fast",
        "certify.max_examples=4",
        "logger=[csv,wandb]",
        "callbacks=[lr_monitor,model_checkpoint]",
        "+callbacks.mark._target_=mycb.Mark",
        "+callbacks.mark.path=${hydra:runtime.output_dir}/mark.txt",
        f"hydra.searchpath=[file://{conf}]",
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "outputs" / "debug" / "digits" / "dssn-standard-none" / "sigma0.5-seed0-here"  # local's tag
    assert (run / "mark.txt").read_text() == "1\n"  # the user's own callback ran (after the one epoch)
    assert len(list((run / "best_checkpoints").glob("*.ckpt"))) == 1  # a second ModelCheckpoint, in the run dir
    assert (run / "checkpoints" / "last.ckpt").is_file()  # beside the run's own
    rows = read_csv(run / "csv" / "metrics.csv")  # the csv logger, with the LearningRateMonitor's column
    assert any(r.get("lr-SGD") not in (None, "") for r in rows)
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))  # and wandb, offline, at the same time
    assert (run / "metrics.json").is_file()
    # the certify entry point prints none of Lightning's advertisements
    c = run_cli("ssn_exp.certify", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "certify.max_examples=2",
                "logger=none", f"hydra.run.dir={tmp_path / 'cert'}", cwd=tmp_path)  # fmt: skip
    assert c.returncode == 0, c.stderr[-3000:]
    assert "Tip" not in c.stdout + c.stderr and "litmodels" not in c.stdout + c.stderr


def test_a_callback_entry_that_is_no_callback_is_one_error_line(tmp_path):
    p = run_cli("ssn_exp", "debug=fast", "+callbacks.x._target_=collections.OrderedDict", f"run_root={tmp_path}")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "callbacks.x" in lines[0] and "not a Lightning callback" in lines[0]
    assert not any(tmp_path.rglob("*.ckpt"))


def test_a_callback_that_lightning_finds_misconfigured_is_one_error_line(tmp_path):
    """Lightning's own "configured wrong" (here a LearningRateMonitor with no logger, found when training starts) is
    the user's mistake: one line, exit 2, the run folder undone."""
    p = run_cli("ssn_exp", "debug=fast", "callbacks=[lr_monitor]", "logger=none", f"run_root={tmp_path}")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("error: ") and "LearningRateMonitor" in lines[0] and "logger" in lines[0]
    assert not any(tmp_path.rglob("*.ckpt"))


def test_the_default_trainer_takes_the_accelerator_that_is_there():
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator

    from test_config import _compose

    cfg = _compose([])
    assert cfg.trainer.accelerator == "auto"
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    want = CUDAAccelerator if torch.cuda.is_available() else CPUAccelerator
    assert isinstance(trainer.accelerator, want) and trainer.num_devices == 1
    assert trainer.precision == "32-true"  # on the CPU the same run as trainer=cpu


def test_the_user_callbacks_are_not_trusted_for_files():
    """A checkpoint's stored config may not build what the user's callbacks name (they run in this process only)."""
    from ssn_exp.cli.common import run_trust
    from test_config import _compose

    cfg = _compose(["+callbacks.x._target_=collections.OrderedDict"])
    assert not run_trust(cfg)._may_import("collections")
    assert run_trust(_compose(["+model.extra._target_=collections.OrderedDict"]))._may_import("collections")


def test_a_log_line_goes_above_a_live_bar_not_onto_its_end():
    from tqdm import tqdm

    stream = io.StringIO()
    handler = BarSafeHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("ssn_exp", logging.INFO, __file__, 1, "epoch 1/2 done", None, None)
    bar = tqdm(total=10, file=stream, desc="training", mininterval=0)
    bar.update(3)
    handler.emit(record)
    bar.update(3)
    bar.close()
    before = stream.getvalue().split("epoch 1/2 done")[0]
    # what the line starts after: a cleared line (after the last carriage return or newline), not the bar's text
    assert before.replace("\n", "\r").rsplit("\r", 1)[-1].strip() == "", repr(before[-80:])
    handler.emit(record)  # no bar: a plain line
    assert stream.getvalue().endswith("\nepoch 1/2 done\n")


def test_a_spawned_rank_installs_the_filters_when_it_unpickles_its_callbacks():
    import pickle
    import warnings

    from ssn_exp.lightning.callbacks import QuietRanks

    blob = pickle.dumps(QuietRanks())  # what ddp_spawn sends a rank with the Trainer
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()  # a fresh process: no filters
        warnings.simplefilter("always")
        assert isinstance(pickle.loads(blob), QuietRanks)
        warnings.warn(
            "The `srun` command is available on your system but is not used. HINT: ...", UserWarning, stacklevel=1
        )
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]
