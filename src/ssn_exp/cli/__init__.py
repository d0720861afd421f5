"""Hydra entry points (layer 3): thin wiring of configs to the Lightning layer and the library.

- ``python -m ssn_exp [overrides]`` (:mod:`ssn_exp.cli.train`): train, then certify the test split;
- ``python -m ssn_exp.certify ckpt=PATH`` (:mod:`ssn_exp.cli.certify`): certify a checkpoint;
- ``python -m ssn_exp.sweep NAME`` (:mod:`ssn_exp.cli.sweep`): a named sweep, then its report.

Every mistake a user can make is answered with one line starting with ``error:`` and exit status 2
(Ctrl-C: exit 130), before any work where it can be checked up front (:func:`run_entry`).
"""
