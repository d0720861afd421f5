"""The Slurm launcher of ``hydra/launcher=slurm`` (layer 3): hydra-submitit-launcher's, which submits the sweep's
jobs as one Slurm array and waits for their results; with ``SSN_EXP_SUBMIT_ONLY=1`` in the environment (what
``python -m ssn_exp.sweep NAME --launcher slurm`` sets unless ``--wait``) it returns once they are submitted,
printing their job ids. Results land in the job directories as the jobs run; the report names the missing ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from unittest import mock

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

__all__ = ["SubmitLauncher", "SUBMIT_ONLY"]

#: The environment variable that makes the launcher return after submitting.
SUBMIT_ONLY = "SSN_EXP_SUBMIT_ONLY"


class _Submitted:
    """A submitted job as the plugin's ``launch`` sees it: its result is "submitted", asked for without waiting."""

    def __init__(self, job):
        self.job_id = job.job_id

    def results(self) -> list[JobReturn]:
        ret = JobReturn()
        ret.status, ret.return_value = JobStatus.COMPLETED, None
        return [ret]


class SubmitLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if os.environ.get(SUBMIT_ONLY) != "1":
            return super().launch(job_overrides, initial_job_idx)
        import submitit

        submitted: list[_Submitted] = []
        map_array = submitit.AutoExecutor.map_array

        def submit(executor, fn, *iterables):  # the plugin's one call: submit, then hand back without waiting
            submitted.extend(_Submitted(j) for j in map_array(executor, fn, *iterables))
            return submitted

        with mock.patch.object(submitit.AutoExecutor, "map_array", submit):
            returns = super().launch(job_overrides, initial_job_idx)
        ids = [s.job_id for s in submitted]
        print(f"submitted {len(ids)} Slurm job(s): {' '.join(ids)}", flush=True)
        return returns
