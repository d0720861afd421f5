"""What a new user sees: plain progress lines outside a terminal, no library chatter, an explained summary."""

from __future__ import annotations

import logging

import pytest

from helpers import run_cli
from ssn_exp.lightning import progress
from ssn_exp.lightning.results import format_table


def test_outside_a_terminal_progress_is_occasional_plain_lines(caplog, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="ssn_exp"):
        update = progress.progress_reporter(total=100, initial=0, desc="certify x", unit="img")
        for _ in range(10):  # 10 images every 10 s
            now[0] += 10.0
            update(10)
        update(0, close=True)
    lines = [r.getMessage() for r in caplog.records]
    # a line per 30 s while running (not one per update) and the last one at the end
    assert [ln.split(",")[0] for ln in lines] == [
        "certify x: 30/100 img (30%)",
        "certify x: 60/100 img (60%)",
        "certify x: 90/100 img (90%)",
        "certify x: 100/100 img (100%)",
    ]
    assert lines[1] == "certify x: 60/100 img (60%), 0:01:00 elapsed, ETA 0:00:40"
    assert all("\r" not in ln for ln in lines)


def test_a_disabled_reporter_says_nothing(caplog, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="ssn_exp"):
        update = progress.progress_reporter(total=5, initial=0, desc="d", unit="img", enabled=False)
        update(5)
        update(0, close=True)
    assert caplog.records == []


def _metrics(**extra):
    return {
        "method": "uniform",
        "sigma": 0.5,
        "dataset": "digits",
        "training": "standard",
        "clean_accuracy": 0.953,
        "n_examples": 360,
        "seconds_per_example": 0.01,
        "acr": 0.5,
        "certified_accuracy": {"0": 0.925, "0.5": 0.6, "1": 0.0},
        **extra,
    }


def test_the_summary_says_the_smoothed_classifier_abstains():
    text = format_table(_metrics(abstain_rate=0.031))
    assert "abstains on 3.1% of the examples" in text
    assert "abstains" not in format_table(_metrics(abstain_rate=0.0))
    assert "abstains" not in format_table(_metrics())  # metrics.json of an older run


@pytest.mark.slow
def test_a_run_and_its_resume_print_no_bar_redraws_and_no_library_chatter(tmp_path):
    args = [
        "debug=fast",
        "trainer.enable_progress_bar=true",
        "certify.progress=true",
        "method=uniform",
        f"run_root={tmp_path}",
    ]
    first = run_cli("ssn_exp", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    out = first.stdout + first.stderr
    assert "\r" not in out  # no progress-bar redraws in a log
    assert "litlogger" not in out
    assert "abstains on" in out  # a randomized run's summary explains clean vs radius 0
    resumed = run_cli("ssn_exp", *args)  # the same command again: a resume over an existing checkpoint folder
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = resumed.stdout + resumed.stderr
    assert "exists and is not empty" not in out
    assert "\r" not in out
