"""The library chatter ssn_exp silences (layer 2, imports nothing heavy): warnings that say nothing to a user and bury
its one-line errors, and Lightning's advertisements; and the console log handler that keeps log lines off the progress
bar. Installed by the entry points and, through
:class:`ssn_exp.lightning.callbacks.QuietRanks`, in every spawned DDP process (which does not inherit them)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["quiet_known_warnings", "BarSafeHandler"]

_MESSAGES = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning vs torch internals
    r".*smaller than the logging interval.*",  # short debug runs; ssn_exp logs one row per epoch itself
    r".*does not have many workers which may be a bottleneck.*",  # digits are in memory
    r".*`self\.log\(\)` but the `self\.trainer` reference is not registered.*",
    # on every resume: ssn_exp itself decides whether a run directory may be continued (resume=, tag=)
    r"Checkpoint directory .* exists and is not empty",
    r".*predict returned None.*",  # certification writes its rows itself; the predict loop returns nothing
    # wherever Slurm is installed (every login node): hydra/launcher=slurm starts the jobs through srun itself
    r"The `srun` command is available on your system but is not used.*",
)


def _drop_tips(record: logging.LogRecord) -> bool:
    """Drop the advertisements Lightning logs for every Trainer ("💡 Tip: ... litlogger / litmodels ...")."""
    return "Tip:" not in str(record.msg)


def quiet_known_warnings() -> None:
    """Install the filters in this process (idempotent)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    # a process started from scratch gets the simplest ones from the environment before anything runs
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore:Checkpoint directory")
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _drop_tips not in tips.filters:
        tips.addFilter(_drop_tips)


class BarSafeHandler(logging.StreamHandler):
    """The console log handler (``hydra.job_logging`` in conf/config.yaml): while a progress bar (tqdm, Lightning's
    included) is live, a log line is written with ``tqdm.write``, which clears the bar, prints the line on a line of
    its own and redraws the bar below it; else like ``logging.StreamHandler``."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
        if not getattr(tqdm, "_instances", None):  # no live bar (tqdm not even imported)
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)
